"""CODA-Prompt: prompts assembled from a growing pool of components, weighted by attention to the query."""

from __future__ import annotations

from typing import Any, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .._base import Synapse, TaskBatch
from .._classes import ClassHistory
from .._validation import check_class_indices, check_non_empty, check_non_negative, check_positive_int
from ..buffer import fresh_seed
from ..catalog import HParam, MethodSpec, register
from ..functional import asymmetric_cross_entropy
from ..functional.coda import (
    coda_assemble_prompt,
    coda_component_weights,
    coda_gram_schmidt,
    coda_ortho_penalty,
    coda_split_prefix,
)
from ._backbone import check_same_head, find_head, freeze_backbone
from ._prompt import Injection, PromptedViT, find_vit
from ._prompt_floor import PromptFloor
from ._prompted import CURRENT_LOSS_HPARAM, average_over_ranks, declare_parameter

__all__ = ["CODAPrompt"]

PARTS = ("keys", "attention", "components")  # the order of the authors' Gram-Schmidt draws at a task end


class CODAPrompt(Synapse):
    """CODA-Prompt (Smith et al. 2023, "CODA-Prompt: COntinual Decomposed Attention-based Prompting for
    Rehearsal-Free Continual Learning", CVPR; code: ``GT-RIPL/CODA-Prompt``).

    The backbone, a timm ``VisionTransformer``, is frozen; its first ``prompt_layers`` blocks get an
    attention prefix assembled from a pool of prompt components, each weighted by the cosine of the
    attended query (the un-prompted model's pre-logits) and its key. Each task trains its own slice of
    ``pool_size // num_tasks`` components (and the head); :meth:`end_task` freezes it and initialises the
    next by Gram-Schmidt against the earlier ones. With ``current_loss='method'`` the loss passed to
    :meth:`backward` is checked, then replaced by the cross-entropy over the current task's classes.
    Evaluate with :meth:`predict`; build the optimizer on :meth:`trainable_parameters` at each task, as the
    authors do. The equations, the task ends, the authors' values and the check against their code:
    docs/methods/pretrained.md, "CODA-Prompt".

    Deviations from the authors' code (each explained in the method page):

    * The current task's classes are those its batches have shown so far.
    * The query is taken in eval mode (the same without dropout).
    * The Gram-Schmidt draws come from the method's own generator; a zero-length component is skipped.
    * After ``num_tasks`` task ends no components are left to train: ``backward`` then raises.

    Args:
        model: a timm ``VisionTransformer`` with a linear head (one output per class), or a model holding
            one (a wrapper that normalises or resizes the images first). Every parameter outside the head is
            frozen.
        pool_size: components per block over all tasks (the authors' 100).
        prompt_length: tokens per component, split into keys and values (the authors' 8).
        num_tasks: the number of tasks the pool is divided over (``pool_size // num_tasks`` per task).
        prompt_layers: the prefix goes into the first ``prompt_layers`` blocks (the authors' 5: blocks 0-4).
        ortho_mu: weight of the orthogonality penalty (the authors' 0.0).
        current_loss: ``'method'`` (the masked cross-entropy replaces your loss) or ``'user'``.
        scaler: a ``torch.amp.GradScaler`` for mixed precision; pass the unscaled loss to ``backward``.

    Example:
        >>> import timm
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8,
        ...                           depth=2, embed_dim=32, num_heads=2, num_classes=10)
        >>> coda = CODAPrompt(model, pool_size=10, num_tasks=5, prompt_layers=2)
        >>> optimizer = torch.optim.Adam(coda.trainable_parameters(), lr=1e-3)
        >>> x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 2, (8,))
        >>> coda.backward(torch.nn.functional.cross_entropy(model(x), y), y, x=x)
        >>> optimizer.step()
        >>> coda.end_task()
        >>> coda.predict(x=x).shape
        torch.Size([8, 10])
    """

    requires_vit = True

    has_predictor = True
    acts_at_task_end = True  # a new slice of components at each task end
    train_mask = True  # the loss spans the current task's classes (L2P's and DualPrompt's option, always on here)

    def __init__(
        self,
        model: nn.Module,
        pool_size: int = 100,
        prompt_length: int = 8,
        num_tasks: int = 10,
        prompt_layers: int = 5,
        ortho_mu: float = 0.0,
        *,
        current_loss: str = "method",
        scaler: Optional[torch.amp.GradScaler] = None,
    ) -> None:
        for name, value in (
            ("pool_size", pool_size),
            ("prompt_length", prompt_length),
            ("num_tasks", num_tasks),
            ("prompt_layers", prompt_layers),
        ):
            check_positive_int(name, value)
        if pool_size < num_tasks:
            raise ValueError(
                f"pool_size must be at least num_tasks (each task gets pool_size // num_tasks components), got "
                f"pool_size={pool_size} and num_tasks={num_tasks}"
            )
        if prompt_length < 2:
            raise ValueError(f"prompt_length must be at least 2 (half keys, half values), got {prompt_length}")
        check_non_negative("ortho_mu", ortho_mu)
        current_loss = self._check_current_loss(current_loss)
        super().__init__(model, scaler=scaler)
        self.head = find_head(self.module)
        vit = find_vit(self.module)  # the model, or the timm ViT inside a wrapper
        depth = len(vit.blocks)  # type: ignore[arg-type]
        if prompt_layers > depth:
            raise ValueError(f"prompt_layers={prompt_layers}, but the model has {depth} blocks")
        # Validates the model and hooks it; the first change to the model.
        self._prompted = PromptedViT(vit, self._inject, prefix_blocks=range(prompt_layers))
        freeze_backbone(self.module, self.head)
        self.pool_size, self.prompt_length, self.num_tasks = pool_size, prompt_length, num_tasks
        self.prompt_layers, self.ortho_mu, self.current_loss = prompt_layers, float(ortho_mu), current_loss
        self.per_task = pool_size // num_tasks
        self.num_classes = self.head.out_features
        self._reads_outputs = current_loss == "method"
        self._forward = self._capture_forward()

        device, dtype = self.device, self.head.weight.dtype
        embed, key = self._prompted.embed_dim, self.head.in_features  # the query is the head's input
        layers, used = prompt_layers, self.per_task * num_tasks
        shapes = {"keys": (key,), "attention": (key,), "components": (prompt_length, embed)}
        # The slice being trained, and every slice frozen so far (rows [:done] of the frozen store).
        self.keys, self.attention, self.components = (
            nn.Parameter(torch.zeros(layers, self.per_task, *shapes[p], device=device, dtype=dtype)) for p in PARTS
        )
        self.frozen_keys, self.frozen_attention, self.frozen_components = (
            torch.zeros(layers, used, *shapes[p], device=device, dtype=dtype) for p in PARTS
        )
        self.generator = torch.Generator().manual_seed(fresh_seed())  # torch.manual_seed decides the draws
        # The authors' first slice: per block, the components, keys and attention vectors, in that order.
        self._new_slice(0, ("components", "keys", "attention"))
        # Whether the current slice is in use: from the start (the authors' first slice), and after a task end
        # from the next task's first training forward on (the authors' process_task_count at its start).
        self.slice_in_use = True
        self.seen_classes = torch.zeros(self.num_classes, dtype=torch.bool, device=device)
        self.task_classes = torch.zeros(self.num_classes, dtype=torch.bool, device=device)
        self.last_weights: List[Tensor] = []  # alpha per prompted block, of the latest forward

        for name in ("pool_size", "prompt_length", "num_tasks", "prompt_layers"):
            self.add_value(name, int, equal=True)
        for part in PARTS:
            declare_parameter(self, part, (layers, self.per_task, *shapes[part]), dtype)
            self.add_state(f"frozen_{part}", dtype=dtype, shape=(layers, used, *shapes[part]))
        self.add_state("seen_classes", dtype=torch.bool, shape=(self.num_classes,))
        self.add_state("task_classes", dtype=torch.bool, shape=(self.num_classes,))
        self.add_value("slice_in_use", bool)
        self.add_generator("generator", "generator")

    # ------------------------------------------------------------------ public
    def trainable_parameters(self) -> List[nn.Parameter]:
        """The current task's keys, attention vectors and components, then the head's parameters."""
        return [self.keys, self.attention, self.components, *self.head.parameters()]

    @property
    def frozen_count(self) -> int:
        """Components per block frozen so far: ``pool_size // num_tasks`` per task ended."""
        return self.per_task * min(self.num_tasks_ended, self.num_tasks)

    @property
    def pool_exhausted(self) -> bool:
        """Every task's slice is frozen: nothing is left to train."""
        return self.num_tasks_ended >= self.num_tasks

    def pool(self, part: str) -> Tensor:
        """The components in use (``part``: ``'keys'``, ``'attention'`` or ``'components'``), ``(layers, n, ...)``:
        the frozen ones (detached), then the current slice (with grad) once its task has begun training. The
        slice drawn at a task end joins at the next task's first training forward: until then (the
        evaluation of the ended task) the components up to the ended task's are in use, as the authors'."""
        frozen = getattr(self, f"frozen_{part}")[:, : self.frozen_count]
        if self.pool_exhausted or not self.slice_in_use:
            return frozen
        return torch.cat([frozen, getattr(self, part)], dim=1)

    def query(self, **model_inputs: Tensor) -> Tensor:
        """The query features ``(batch, key_dim)`` of ``model_inputs`` (the un-prompted ViT's pre-logits; the
        inputs as the ViT receives them, past any wrapper's preprocessing)."""
        (x,) = model_inputs.values()
        return self._prompted.query(x)

    def weights(self, query: Tensor) -> List[Tensor]:
        """``alpha`` ``(batch, components)`` for each prompted block, of the components in use."""
        keys, attention = self.pool("keys"), self.pool("attention")
        return [coda_component_weights(query, keys[i], attention[i]) for i in range(self.prompt_layers)]

    def prefixes(self, query: Tensor) -> Mapping[int, Tuple[Tensor, Tensor]]:
        """The prefix ``(keys, values)`` of each prompted block for ``query`` (each ``(batch, length/2, D)``)."""
        self._follow_device(query.device)
        components = self.pool("components")
        self.last_weights = self.weights(query)
        return {
            i: coda_split_prefix(coda_assemble_prompt(alpha.to(components.dtype), components[i]))
            for i, alpha in enumerate(self.last_weights)
        }

    @torch.no_grad()
    def predict(self, **model_inputs: Tensor) -> Tensor:
        """The prompted model's logits ``(batch, classes)`` in eval mode, ``-inf`` for classes never seen."""
        logits = super().predict(**model_inputs)
        return logits.masked_fill(~self.seen_classes.to(logits.device), float("-inf"))

    def remove_hooks(self) -> None:
        super().remove_hooks()
        self._prompted.remove()

    # ------------------------------------------------------------------ backward
    def _inject(self, query: Tensor, training: bool) -> Injection:
        if training and not self.pool_exhausted:
            self.slice_in_use = True  # the task's first training forward: its slice joins the pool
        return Injection(prefixes=self.prefixes(query.to(self.keys.dtype)))

    def _check(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        if self._first_step_of_task:
            check_same_head(self.module, self.head, "CODA-Prompt")
        if self.pool_exhausted:
            raise ValueError(
                f"CODA-Prompt was built for num_tasks={self.num_tasks} tasks and all of them have ended: no "
                "components are left to train (build it with a larger num_tasks)"
            )
        check_class_indices(targets, self.num_classes, first_step=self.num_steps == 0)
        if self.current_loss == "method":
            check_non_empty("CODA-Prompt", targets)
            self._forward.checked_outputs("CODA-Prompt", targets.shape[0])

    def _backward(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        self._follow_device(targets.device)
        targets = targets.long()
        task_classes = self.task_classes.clone().index_fill_(0, targets, True)
        root = loss
        if self.current_loss == "method":
            logits = self._forward.outputs
            assert logits is not None  # checked by _check
            root = asymmetric_cross_entropy(logits, targets, task_classes)  # the user's graph is never walked
        terms = [(self.ortho_mu, self._ortho_penalty())] if self.ortho_mu > 0 else []
        self._run_backward(root, terms)
        average_over_ranks((self.keys, self.attention, self.components))
        self._forward.clear()
        self.task_classes = task_classes
        self.seen_classes.index_fill_(0, targets, True)

    def _ortho_penalty(self) -> Tensor:
        """The authors' penalty, summed over the prompted blocks, on the components in use (frozen ones
        without gradient)."""
        pools = [self.pool(part) for part in PARTS]
        return sum(
            (coda_ortho_penalty(pool[i].flatten(1)) for pool in pools for i in range(self.prompt_layers)),
            torch.zeros((), device=self.device),
        )

    # ------------------------------------------------------------------ task ends
    def _end_task(self, data: Optional[Iterable[TaskBatch]]) -> None:
        self._follow_device(self.device)
        task = self.num_tasks_ended  # the task that just ended
        if task < self.num_tasks:
            rows = slice(task * self.per_task, (task + 1) * self.per_task)
            for part in PARTS:
                getattr(self, f"frozen_{part}")[:, rows] = getattr(self, part).detach()
            if task + 1 < self.num_tasks:
                self._new_slice(task + 1, PARTS)  # drawn now, in use from the next task's first training forward
        self.slice_in_use = False
        self.seen_classes = ClassHistory._union_over_ranks(self.seen_classes)
        self.task_classes = torch.zeros_like(self.task_classes)

    @torch.no_grad()
    def _new_slice(self, task: int, order: Tuple[str, ...]) -> None:
        """Task ``task``'s components, Gram-Schmidt against the ``task * per_task`` earlier ones, into the
        trained parameters (in place: an optimizer built on them keeps them). The draws follow the authors'
        order: block by block, in ``order`` within a block, one ``randn`` per component."""
        done = task * self.per_task
        for i in range(self.prompt_layers):
            for part in order:
                target = getattr(self, part)[i]
                earlier = getattr(self, f"frozen_{part}")[i, :done].flatten(1).float()
                draws = torch.stack([torch.randn(earlier.shape[1], generator=self.generator) for _ in target])
                new = coda_gram_schmidt(earlier, draws.to(earlier.device))
                target.copy_(new.view_as(target))

    # ------------------------------------------------------------------ device and state
    def _follow_device(self, device: torch.device) -> None:
        if self.keys.device != device:
            for part in PARTS:
                getattr(self, part).data = getattr(self, part).data.to(device)
                setattr(self, f"frozen_{part}", getattr(self, f"frozen_{part}").to(device))
            self.seen_classes, self.task_classes = self.seen_classes.to(device), self.task_classes.to(device)


class CODAPromptFloor(PromptFloor):
    """The step after two task ends (the benchmark's point): the query forward, the components of the two
    frozen slices and the current one weighted by query attention as prefixes in the prompted forward, the
    masked cross-entropy (and the orthogonality penalty when ``ortho_mu > 0``), one backward."""

    def __init__(
        self, model: nn.Module, buffer_size: int, minibatch: int, item: Tuple[int, ...], hparams: Mapping[str, Any]
    ) -> None:
        super().__init__(model, buffer_size, minibatch, item, {**hparams, "pull_constraint": 0.0})  # no key pull

    def setup(self, dim: int, embed_dim: int) -> None:
        hp = self.hp
        layers, per_task = hp["prompt_layers"], hp["pool_size"] // hp["num_tasks"]
        past = min(2, hp["num_tasks"] - 1) * per_task  # what two task ends froze (none past the pool's end)
        shapes = {"keys": (dim,), "attention": (dim,), "components": (hp["prompt_length"], embed_dim)}
        device = self.one.device
        self.frozen = {part: torch.randn(layers, past, *shape, device=device) for part, shape in shapes.items()}
        self.keys = nn.Parameter(torch.randn(layers, per_task, dim))
        self.attention = nn.Parameter(torch.randn(layers, per_task, dim))
        self.components = nn.Parameter(torch.randn(layers, per_task, hp["prompt_length"], embed_dim))
        self.extra = [self.keys, self.attention, self.components]

    def prompted(self, x: Tensor, query: Tensor) -> Tuple[Tensor, Tensor]:
        keys, attention, components = (
            torch.cat([self.frozen[part], getattr(self, part)], dim=1) for part in ("keys", "attention", "components")
        )
        weights = [coda_component_weights(query, keys[i], attention[i]) for i in range(self.hp["prompt_layers"])]
        prefixes = {i: coda_split_prefix(coda_assemble_prompt(w, components[i])) for i, w in enumerate(weights)}
        return self.forward_with(x, prefixes=prefixes), self.one

    def backward(self, loss: Tensor, targets: Tensor, inputs: Tensor, logits: Tensor) -> None:
        allowed = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device).index_fill_(0, targets, True)
        roots, seeds = [asymmetric_cross_entropy(logits, targets, allowed)], [self.one]
        if self.hp["ortho_mu"] > 0:
            parts = (self.keys, self.attention, self.components)
            roots.append(torch.stack([coda_ortho_penalty(p[i].flatten(1)) for p in parts for i in range(len(p))]).sum())
            seeds.append(self.weight("ortho_mu"))
        self.run_backward(tuple(roots), tuple(seeds))


register(
    MethodSpec(
        "coda-prompt",
        CODAPrompt,
        family="pretrained",
        display="CODA-Prompt",
        paper=(
            "Smith et al. 2023, CODA-Prompt: COntinual Decomposed Attention-based Prompting for Rehearsal-Free "
            "Continual Learning (CVPR)"
        ),
        summary="frozen ViT; prefix prompts summed from a growing pool of components by query attention",
        hparams=(
            HParam("pool_size", int, 100, "prompt components per block over all tasks (the authors' 100)", low=1),
            HParam("prompt_length", int, 8, "tokens per component, half prefix keys, half values", low=2),
            HParam("num_tasks", int, 10, "tasks the pool is divided over (pool_size // num_tasks each)", low=1),
            HParam("prompt_layers", int, 5, "prefix in the first N blocks (the authors' blocks 0-4)", low=1),
            HParam("ortho_mu", float, 0.0, "weight of the orthogonality penalty (the authors' 0.0)", low=0.0),
            CURRENT_LOSS_HPARAM,
        ),
        toy="vit",
        harness_hparams={"pool_size": 10, "num_tasks": 5, "prompt_layers": 2},
        floor=CODAPromptFloor,
    )
)
