"""L2P: Learning to Prompt, a pool of prompts chosen by key-query matching for a frozen ViT."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..catalog import HParam, MethodSpec, register
from ..functional.prompts import key_pull, key_similarity, select_prompts
from ._prompt import Injection
from ._prompt_floor import PromptFloor
from ._prompted import CURRENT_LOSS_HPARAM, TRAIN_MASK_HPARAM, PromptMethod, check_bool, check_pool, uniform_parameter

__all__ = ["L2P"]

HEAD_TYPES = ("prompt", "token")


class L2P(PromptMethod):
    """L2P (Wang et al. 2022, "Learning to Prompt for Continual Learning", CVPR; code:
    ``JH-LEE-KR/l2p-pytorch``).

    The backbone is frozen. A pool of ``pool_size`` prompts with keys is learned; each sample's query (the
    frozen, un-prompted model's pre-logits) selects the ``top_k`` prompts of the most cosine-similar keys,
    which are inserted after [CLS]; with ``head_type='prompt'`` the head reads the mean of the prompt
    tokens' outputs. With ``current_loss='method'`` the loss passed to :meth:`backward` is checked, then
    replaced by the cross-entropy masked to the current task's classes minus ``pull_constraint`` times the
    key-query pull. Give the optimizer :meth:`trainable_parameters`; evaluate with ``predict`` or ``model``
    in eval mode. The loss, the authors' values and training loop: docs/methods/pretrained.md, "Prompts:
    L2P and DualPrompt".

    Deviations from the authors' code (each explained in the method page):

    * The query is the same model run without prompts (the authors build a second copy).
    * ``train_mask`` masks the classes of the task's batches so far, not the task's full class list.
    * On a tie in batch-wise counts the lower prompt index wins.
    * Position dropout does not reach the prompt tokens (the authors' config has none).
    * Every parameter but the head is frozen (the authors leave ``fc_norm``, an identity, trainable).

    Args:
        model: a timm ``VisionTransformer`` with a linear head of one output per class; every parameter
            outside the head is frozen.
        pool_size: prompts in the pool (authors' CIFAR-100 config: 10).
        prompt_length: tokens per prompt (5).
        top_k: prompts per sample (5).
        pull_constraint: ``lambda``, the weight of the key-query pull (0.1).
        batchwise_prompt: every sample of a batch uses the batch's most frequent prompts, at training and at
            test (True).
        head_type: ``'prompt'``: the head reads the mean of the prompt tokens' outputs (authors' config);
            ``'token'``: the model's own pooling ([CLS] for ``global_pool='token'``).
        train_mask: mask the logits of classes outside the current task in the loss (True).
        current_loss: ``'method'`` (the method's loss replaces the one passed to ``backward``) or ``'user'``
            (that loss stands in for the masked cross-entropy; the pull is added to it).
        scaler: a ``torch.amp.GradScaler`` for mixed precision; pass the unscaled loss to ``backward``.

    Example:
        >>> import timm
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8,
        ...                           depth=2, embed_dim=32, num_heads=2, num_classes=10)
        >>> l2p = L2P(model)
        >>> optimizer = torch.optim.Adam(l2p.trainable_parameters(), lr=0.001875)
        >>> x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
        >>> l2p.backward(torch.nn.functional.cross_entropy(model(x), y), y, x=x)
        >>> l2p.last_selection.shape
        torch.Size([8, 5])
    """

    def __init__(
        self,
        model: nn.Module,
        pool_size: int = 10,
        prompt_length: int = 5,
        top_k: int = 5,
        pull_constraint: float = 0.1,
        *,
        batchwise_prompt: bool = True,
        head_type: str = "prompt",
        train_mask: bool = True,
        current_loss: str = "method",
        scaler: Optional[torch.amp.GradScaler] = None,
    ) -> None:
        check_pool(pool_size, prompt_length, top_k)
        check_bool("batchwise_prompt", batchwise_prompt)
        if head_type not in HEAD_TYPES:
            raise ValueError(f"head_type must be one of {HEAD_TYPES}, got {head_type!r}")
        super().__init__(
            model,
            pull_constraint=pull_constraint,
            train_mask=train_mask,
            current_loss=current_loss,
            prompt_tokens=True,
            pool_prompts=head_type == "prompt",
            scaler=scaler,
        )
        self.pool_size, self.prompt_length, self.top_k = pool_size, prompt_length, top_k
        self.batchwise_prompt, self.head_type = batchwise_prompt, head_type
        self.prompt = uniform_parameter(pool_size, prompt_length, self.embed_dim, device=self.device)
        self.key = uniform_parameter(pool_size, self.feature_dim, device=self.device)
        self._add_parameter_state("prompt", (pool_size, prompt_length, self.embed_dim))
        self._add_parameter_state("key", (pool_size, self.feature_dim))

    def _own_parameters(self) -> List[nn.Parameter]:
        return [self.prompt, self.key]

    def select(self, query: Tensor) -> Tensor:
        """The prompt indices ``(batch, top_k)`` for query features ``(batch, feature_dim)``."""
        return select_prompts(key_similarity(query, self.key), self.top_k, self.batchwise_prompt)

    def _inject(self, query: Tensor, training: bool) -> Tuple[Injection, Tensor, Tensor]:
        idx = self.select(query)
        tokens = self.prompt[idx].flatten(1, 2)  # (batch, top_k * length, D), in selection order
        return Injection(tokens=tokens), idx, key_pull(query, self.key, idx)


class L2PFloor(PromptFloor):
    """The query forward, top-k matching, the prompted forward with the mean of the prompt tokens as the
    head's input, the masked cross-entropy and the key pull, one backward."""

    def setup(self, dim: int, embed_dim: int) -> None:
        hp = self.hp
        self.prompt = nn.Parameter(torch.empty(hp["pool_size"], hp["prompt_length"], embed_dim).uniform_(-1, 1))
        self.key = nn.Parameter(torch.empty(hp["pool_size"], dim).uniform_(-1, 1))
        self.extra = [self.prompt, self.key]

    def prompted(self, x: Tensor, query: Tensor) -> Tuple[Tensor, Tensor]:
        idx = select_prompts(key_similarity(query, self.key), self.hp["top_k"], self.hp["batchwise_prompt"])
        tokens = self.prompt[idx].flatten(1, 2)
        return self.forward_with(x, tokens=tokens, pool_tokens=True), key_pull(query, self.key, idx)


register(
    MethodSpec(
        "l2p",
        L2P,
        family="pretrained",
        display="L2P",
        paper="Wang et al. 2022, Learning to Prompt for Continual Learning (CVPR)",
        summary="frozen ViT; a pool of prompts chosen per sample by key-query matching, prepended to the tokens",
        hparams=(
            HParam("pool_size", int, 10, "prompts in the pool", low=1),
            HParam("prompt_length", int, 5, "tokens per prompt", low=1),
            HParam("top_k", int, 5, "prompts per sample (at most pool_size)", low=1),
            HParam("pull_constraint", float, 0.1, "weight of the key-query pull", low=0.0),
            HParam("batchwise_prompt", bool, True, "every sample uses its batch's most frequent prompts"),
            HParam(
                "head_type",
                str,
                "prompt",
                "head input: mean of the prompt tokens, or the model's pooling",
                choices=HEAD_TYPES,
            ),
            TRAIN_MASK_HPARAM,
            CURRENT_LOSS_HPARAM,
        ),
        toy="vit",
        # The head on the [CLS] token: a random tiny ViT's mean prompt token barely separates classes within
        # the harness's few steps (the contract variants still run head_type='prompt').
        harness_hparams={"pool_size": 4, "prompt_length": 2, "top_k": 2, "head_type": "token"},
        floor=L2PFloor,
    )
)
