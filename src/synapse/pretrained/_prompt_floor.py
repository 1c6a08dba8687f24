"""The floor step of the prompt methods: the query forward and the prompted forward written out in plain torch
over the timm ViT's parts (no hooks, no checks), then the masked cross-entropy and the key pull."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .._floor import Floor
from ..functional import asymmetric_cross_entropy
from ._backbone import find_head, freeze_backbone
from ._prompt import attention_with_prefix, find_vit

__all__ = ["PromptFloor"]


class PromptFloor(Floor):
    """A prompt method's irreducible step. The ViT's ``forward`` is replaced by :meth:`_forward`: a no-grad
    query forward, then :meth:`prompted` (the subclass's selection and :meth:`forward_with`)."""

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        freeze_backbone(model, find_head(model))
        super().__init__(model, *args, **kwargs)
        vit: Any = find_vit(model)
        self.vit = vit
        self.extra: List[nn.Parameter] = []
        self.n = int(getattr(vit, "num_prefix_tokens", 1))
        embed_dim = vit.blocks[0].attn.qkv.in_features
        self.setup(find_head(model).in_features, embed_dim)
        for p in self.extra:
            p.data = p.data.to(self.one.device)
        self.params += self.extra
        self.minus_pull = -self.weight("pull_constraint")
        self.vit.forward = self._forward  # type: ignore[method-assign]
        self.pull: Optional[Tensor] = None

    @abstractmethod
    def setup(self, dim: int, embed_dim: int) -> None:
        """Make the prompts and keys (``self.extra``) for query features of ``dim`` and tokens of ``embed_dim``."""

    @abstractmethod
    def prompted(self, x: Tensor, query: Tensor) -> Tuple[Tensor, Tensor]:
        """The logits of the prompted forward of ``x`` and the key pull."""

    def _forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            query = self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)
        logits, self.pull = self.prompted(x, query)
        return logits

    def forward_with(
        self,
        x: Tensor,
        tokens: Optional[Tensor] = None,
        prefixes: Mapping[int, Tuple[Tensor, Tensor]] = {},
        pool_tokens: bool = False,
    ) -> Tensor:
        """timm's ViT forward, with ``tokens`` inserted after the prefix tokens and ``prefixes`` in the blocks."""
        v = self.vit
        h = v.patch_drop(v._pos_embed(v.patch_embed(x)))
        if tokens is not None:
            tokens = tokens + v.pos_embed[:, :1]
            h = torch.cat([h[:, : self.n], tokens, h[:, self.n :]], dim=1)
        h = v.norm_pre(h)
        for i, block in enumerate(v.blocks):
            if i in prefixes:
                h = h + block.drop_path1(block.ls1(attention_with_prefix(block.attn, prefixes[i], block.norm1(h))))
                h = h + block.drop_path2(block.ls2(block.mlp(block.norm2(h))))
            else:
                h = block(h)
        h = v.norm(h)
        if pool_tokens:
            assert tokens is not None
            features = h[:, self.n : self.n + tokens.shape[1]].mean(dim=1)
        else:
            features = v.pool(h)
        return v.head(v.head_drop(v.fc_norm(features)))

    def backward(self, loss: Tensor, targets: Tensor, inputs: Tensor, logits: Tensor) -> None:
        allowed = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device).index_fill_(0, targets, True)
        current = asymmetric_cross_entropy(logits, targets, allowed)
        assert self.pull is not None
        self.run_backward((current, self.pull), (self.one, self.minus_pull))
