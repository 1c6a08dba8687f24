"""DualPrompt: a shared G-prompt and task-specific E-prompts, both as attention prefixes of a frozen ViT."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .._validation import check_non_negative
from ..catalog import HParam, MethodSpec, register
from ..functional.prompts import key_pull, key_similarity, select_prompts
from ._prompt import Injection
from ._prompt_floor import PromptFloor
from ._prompted import (
    CURRENT_LOSS_HPARAM,
    TRAIN_MASK_HPARAM,
    PromptMethod,
    check_bool,
    check_pool,
    uniform_parameter,
)

__all__ = ["DualPrompt", "parse_layers"]

Layers = Union[str, Sequence[int]]


def parse_layers(name: str, layers: Layers) -> Tuple[int, ...]:
    """Block indices from ``"0,1"`` (the CLI's form; ``""``: none) or a sequence of ints, checked to be
    distinct non-negative ints (the model's depth is checked when the method is built)."""
    if isinstance(layers, str):
        try:
            parsed = tuple(int(part) for part in layers.split(",") if part.strip())
        except ValueError:
            raise ValueError(f"{name} must be block indices such as '0,1', got {layers!r}") from None
    elif isinstance(layers, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        parsed = tuple(layers)
    else:
        raise TypeError(f"{name} must be a str such as '0,1' or a sequence of ints, got {layers!r}")
    if any(i < 0 for i in parsed) or len(set(parsed)) != len(parsed):
        raise ValueError(f"{name} must be distinct non-negative block indices, got {layers!r}")
    return parsed


def task_prompts_in_pool(task: int, top_k: int, pool_size: int) -> bool:
    """Whether task ``task``'s own E-prompts, ``task*top_k ... (task+1)*top_k - 1``, are in a pool of ``pool_size``
    (past it, ``use_prompt_mask`` gives way to the key match)."""
    return (task + 1) * top_k <= pool_size


class DualPrompt(PromptMethod):
    """DualPrompt (Wang et al. 2022, "DualPrompt: Complementary Prompting for Rehearsal-free Continual
    Learning", ECCV; code: ``JH-LEE-KR/dualprompt-pytorch``).

    The backbone is frozen. Two kinds of prompts enter as prefix keys and values of the attention of chosen
    blocks: a G-prompt shared by every task, in ``g_prompt_layers``, and a pool of E-prompts with keys, in
    ``e_prompt_layers``. Training on task ``t`` uses E-prompt ``t`` (task identity, ``use_prompt_mask``),
    which starts as a copy of task ``t - 1``'s; at test each sample takes the E-prompt whose key is most
    cosine-similar to its query (the un-prompted model's pre-logits). The loss is L2P's with the task's
    E-prompt: with ``current_loss='method'`` it replaces the loss passed to :meth:`backward`, with
    ``'user'`` that loss stands in for its cross-entropy. Give the optimizer :meth:`trainable_parameters`.
    The prefixes, the loss, the authors' values and training loop: docs/methods/pretrained.md, "Prompts:
    L2P and DualPrompt".

    Deviations from the authors' code (each explained in the method page):

    * The E-prompt's keys and values are its two halves for every sample (the authors' ``reshape`` mixes
      the batch and key/value axes for batches of more than one).
    * The query is the same model run without prompts (the authors build a second copy).
    * ``train_mask`` masks the classes of the task's batches so far, not the task's full class list.
    * On a tie in batch-wise counts the lower prompt index wins.
    * Every parameter but the head is frozen (the authors leave ``fc_norm``, an identity, trainable).

    Args:
        model: a timm ``VisionTransformer`` with a linear head of one output per class, at least as deep
            as the deepest prompted block; every parameter outside the head is frozen.
        pool_size: E-prompts in the pool (authors' CIFAR-100 config: 10).
        prompt_length: tokens per E-prompt (5).
        top_k: E-prompts per sample (1).
        g_prompt_length: tokens of the G-prompt (5).
        g_prompt_layers: blocks with the G-prompt, ``"0,1"`` or a sequence of ints (``"0,1"``).
        e_prompt_layers: blocks with the E-prompt (``"2,3,4"``).
        pull_constraint: ``lambda`` (1.0).
        batchwise_prompt: at test, every sample of a batch uses the batch's most frequent E-prompts (True).
        use_prompt_mask: train task ``t`` on E-prompts ``t*top_k ... (t+1)*top_k - 1`` (True); past the pool, or
            False, select by the query as at test.
        shared_prompt_pool: a task's first training forward copies the previous task's E-prompt into its
            own (True).
        train_mask: mask the logits of classes outside the current task in the loss (True).
        current_loss: ``'method'`` (the method's loss replaces the one passed to ``backward``) or ``'user'``
            (that loss stands in for the masked cross-entropy; the pull is added to it).
        scaler: a ``torch.amp.GradScaler`` for mixed precision; pass the unscaled loss to ``backward``.

    Example:
        >>> import timm
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8,
        ...                           depth=5, embed_dim=32, num_heads=2, num_classes=10)
        >>> dual = DualPrompt(model)
        >>> x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
        >>> dual.backward(torch.nn.functional.cross_entropy(model(x), y), y, x=x)
        >>> dual.last_selection[0]  # task 0 trains E-prompt 0
        tensor([0])
    """

    acts_at_task_end = True  # a task end moves training to the next E-prompt

    def __init__(
        self,
        model: nn.Module,
        pool_size: int = 10,
        prompt_length: int = 5,
        top_k: int = 1,
        g_prompt_length: int = 5,
        g_prompt_layers: Layers = "0,1",
        e_prompt_layers: Layers = "2,3,4",
        pull_constraint: float = 1.0,
        *,
        batchwise_prompt: bool = True,
        use_prompt_mask: bool = True,
        shared_prompt_pool: bool = True,
        train_mask: bool = True,
        current_loss: str = "method",
        scaler: Optional[torch.amp.GradScaler] = None,
    ) -> None:
        check_pool(pool_size, prompt_length, top_k)
        check_non_negative("g_prompt_length", g_prompt_length)
        if isinstance(g_prompt_length, bool) or not isinstance(g_prompt_length, int):
            raise TypeError(f"g_prompt_length must be an int, got {g_prompt_length!r}")
        g_layers = parse_layers("g_prompt_layers", g_prompt_layers) if g_prompt_length else ()
        e_layers = parse_layers("e_prompt_layers", e_prompt_layers)
        if set(g_layers) & set(e_layers):
            both = sorted(set(g_layers) & set(e_layers))
            raise ValueError(f"a block takes the G-prompt or an E-prompt, not both: blocks {both} are in both")
        check_bool("batchwise_prompt", batchwise_prompt)
        check_bool("use_prompt_mask", use_prompt_mask)
        check_bool("shared_prompt_pool", shared_prompt_pool)
        super().__init__(
            model,
            pull_constraint=pull_constraint,
            train_mask=train_mask,
            current_loss=current_loss,
            prefix_blocks=(*g_layers, *e_layers),
            scaler=scaler,
        )
        self.pool_size, self.prompt_length, self.top_k = pool_size, prompt_length, top_k
        self.g_prompt_length, self.g_layers, self.e_layers = g_prompt_length, g_layers, e_layers
        self.batchwise_prompt, self.use_prompt_mask = batchwise_prompt, use_prompt_mask
        self.shared_prompt_pool = shared_prompt_pool
        d = self.embed_dim
        # U(-1, 1) each, made in the authors' order: the G-prompt, the E-prompts, their keys.
        self.g_prompt = uniform_parameter(len(g_layers), 2, g_prompt_length, d, device=self.device)
        self.e_prompt = uniform_parameter(len(e_layers), 2, pool_size, prompt_length, d, device=self.device)
        self.key = uniform_parameter(pool_size, self.feature_dim, device=self.device)
        self._add_parameter_state("g_prompt", (len(g_layers), 2, g_prompt_length, d))
        self._add_parameter_state("e_prompt", (len(e_layers), 2, pool_size, prompt_length, d))
        self._add_parameter_state("key", (pool_size, self.feature_dim))
        self._task_prompts: Dict[Tuple[int, torch.device], Tensor] = {}
        self.started_task = 0  # the last task whose start (the E-prompt copy) is done
        self.add_value("started_task", int)

    def _own_parameters(self) -> List[nn.Parameter]:
        return [self.g_prompt, self.e_prompt, self.key]

    def select(self, query: Tensor, training: bool = False) -> Tensor:
        """The E-prompt indices ``(batch, top_k)``: the current task's in a training forward with
        ``use_prompt_mask`` (while the pool has them), else by matching ``query`` to the keys."""
        task = self.num_tasks_ended
        if training and self.use_prompt_mask and task_prompts_in_pool(task, self.top_k, self.pool_size):
            key = (task, query.device)
            if key not in self._task_prompts:
                start = task * self.top_k
                self._task_prompts[key] = torch.arange(start, start + self.top_k, device=query.device)[None]
            return self._task_prompts[key].expand(query.shape[0], -1)
        return select_prompts(key_similarity(query, self.key), self.top_k, self.batchwise_prompt)

    def prefixes(self, idx: Tensor, shared: bool) -> Dict[int, Tuple[Tensor, Tensor]]:
        """The prefix ``(keys, values)`` of each prompted block for E-prompt indices ``idx``; with ``shared``
        (every row of ``idx`` alike) one row serves the whole batch."""
        out: Dict[int, Tuple[Tensor, Tensor]] = {}
        for j, layer in enumerate(self.g_layers):
            out[layer] = (self.g_prompt[j, 0][None], self.g_prompt[j, 1][None])
        rows = idx[:1] if shared else idx
        for j, layer in enumerate(self.e_layers):
            chosen = self.e_prompt[j][:, rows].flatten(2, 3)  # (2, rows, top_k * length, D)
            out[layer] = (chosen[0], chosen[1])
        return out

    def _inject(self, query: Tensor, training: bool) -> Tuple[Injection, Tensor, Tensor]:
        if training:
            self._start_task()
        idx = self.select(query, training)
        masked = (
            training and self.use_prompt_mask and task_prompts_in_pool(self.num_tasks_ended, self.top_k, self.pool_size)
        )
        injection = Injection(prefixes=self.prefixes(idx, shared=masked or self.batchwise_prompt))
        return injection, idx, key_pull(query, self.key, idx)

    @torch.no_grad()
    def _start_task(self) -> None:
        """At the current task's first training forward: the start of each task since the last one started,
        in order, as the authors' ``train_and_evaluate`` makes it at each task's start (``shared_prompt_pool``:
        task ``t``'s E-prompt becomes a copy of task ``t - 1``'s, while both are in the pool)."""
        k = self.top_k
        for task in range(self.started_task + 1, self.num_tasks_ended + 1):
            if self.shared_prompt_pool and task_prompts_in_pool(task, k, self.pool_size):
                self.e_prompt[:, :, task * k : (task + 1) * k] = self.e_prompt[:, :, (task - 1) * k : task * k]
        self.started_task = self.num_tasks_ended


class DualPromptFloor(PromptFloor):
    """The query forward, the E-prompts of the task the benchmark times (after its two task ends): that task's own
    while the pool has them (``use_prompt_mask``), else the key match's; with the G-prompt as prefixes in the
    prompted forward, the masked cross-entropy and the key pull, one backward."""

    task = 2  # the task after the benchmark's two task ends (as _GEMFloor's past_tasks)

    def setup(self, dim: int, embed_dim: int) -> None:
        hp = self.hp
        self.g_layers = parse_layers("g", hp["g_prompt_layers"])
        self.e_layers = parse_layers("e", hp["e_prompt_layers"])
        g_shape = (len(self.g_layers), 2, hp["g_prompt_length"], embed_dim)
        self.g_prompt = nn.Parameter(torch.empty(g_shape).uniform_(-1, 1))
        shape = (len(self.e_layers), 2, hp["pool_size"], hp["prompt_length"], embed_dim)
        self.e_prompt = nn.Parameter(torch.empty(shape).uniform_(-1, 1))
        self.key = nn.Parameter(torch.empty(hp["pool_size"], dim).uniform_(-1, 1))
        self.extra = [self.g_prompt, self.e_prompt, self.key]
        self.masked = hp["use_prompt_mask"] and task_prompts_in_pool(self.task, hp["top_k"], hp["pool_size"])
        k = hp["top_k"]
        self.task_idx = torch.arange(self.task * k, (self.task + 1) * k, device=self.one.device)[None]

    def prompted(self, x: Tensor, query: Tensor) -> Tuple[Tensor, Tensor]:
        k = self.hp["top_k"]
        if self.masked:
            idx, rows = self.task_idx.expand(query.shape[0], -1), self.task_idx
        else:
            idx = select_prompts(key_similarity(query, self.key), k, self.hp["batchwise_prompt"])
            rows = idx[:1] if self.hp["batchwise_prompt"] else idx
        prefixes = {g: (self.g_prompt[j, 0][None], self.g_prompt[j, 1][None]) for j, g in enumerate(self.g_layers)}
        for j, layer in enumerate(self.e_layers):
            chosen = self.e_prompt[j][:, rows].flatten(2, 3)
            prefixes[layer] = (chosen[0], chosen[1])
        return self.forward_with(x, prefixes=prefixes), key_pull(query, self.key, idx)


register(
    MethodSpec(
        "dualprompt",
        DualPrompt,
        family="pretrained",
        display="DualPrompt",
        paper="Wang et al. 2022, DualPrompt: Complementary Prompting for Rehearsal-free Continual Learning (ECCV)",
        summary="frozen ViT; a shared G-prompt and per-task E-prompts (chosen by key-query matching at test) as "
        "attention prefixes",
        hparams=(
            HParam("pool_size", int, 10, "E-prompts in the pool", low=1),
            HParam("prompt_length", int, 5, "tokens per E-prompt", low=1),
            HParam("top_k", int, 1, "E-prompts per sample (at most pool_size)", low=1),
            HParam("g_prompt_length", int, 5, "tokens of the G-prompt (0: none)", low=0),
            HParam("g_prompt_layers", str, "0,1", "blocks with the G-prompt, comma-separated"),
            HParam("e_prompt_layers", str, "2,3,4", "blocks with the E-prompt, comma-separated"),
            HParam("pull_constraint", float, 1.0, "weight of the key-query pull", low=0.0),
            HParam("batchwise_prompt", bool, True, "at test, every sample uses its batch's most frequent E-prompt"),
            HParam("use_prompt_mask", bool, True, "train task t on E-prompt t (task identity)"),
            HParam("shared_prompt_pool", bool, True, "a task starts its E-prompt as a copy of the previous task's"),
            TRAIN_MASK_HPARAM,
            CURRENT_LOSS_HPARAM,
        ),
        toy="vit",
        # Two E-prompts: the second task's first step copies the first into the second, which a test match may pick.
        harness_hparams={
            "pool_size": 2,
            "prompt_length": 2,
            "g_prompt_length": 2,
            "g_prompt_layers": "0",
            "e_prompt_layers": "1",
        },
        floor=DualPromptFloor,
    )
)
