"""What every method on a pretrained backbone shares: the feature/head split read from the model, a frozen
backbone, and the features of the forward the user just ran.

The split is the model's own: a timm model names its classifier (``get_classifier()``), and the features
are that classifier's input -- for a ViT the pre-logits (the normed [CLS] token, or the pooled tokens,
as the model is configured); for a ResNet the pooled map. Any other model's head is its last
``nn.Linear``. Nothing here imports timm: a model is read through those names only.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional, Tuple

from torch import Tensor, nn

__all__ = ["FeatureTap", "find_head", "float_features", "freeze_backbone", "refuse_ddp_wrapped"]


def find_head(model: nn.Module) -> nn.Linear:
    """The model's classifier: ``model.get_classifier()`` where the model has one (timm), else its last
    ``nn.Linear``. Raises ``ValueError`` when neither is a linear layer."""
    getter = getattr(model, "get_classifier", None)
    head = getter() if callable(getter) else None
    if head is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"model's classifier must be an nn.Linear (model.get_classifier() or its last nn.Linear), got "
            f"{type(head).__name__}: build the model with num_classes > 0"
        )
    return head


def check_same_head(model: nn.Module, head: nn.Linear, who: str) -> None:
    """Raise when ``model``'s classifier is no longer ``head``, the layer ``who`` was built on (replaced by
    ``reset_classifier``, say): the method would read, train or hand the optimizer the old one."""
    try:
        now: Optional[nn.Module] = find_head(model)
    except ValueError:
        now = None
    if now is not head:
        got = f"{now.out_features} outputs" if isinstance(now, nn.Linear) else "no linear layer"
        raise ValueError(
            f"{who} was built on the model's head of {head.out_features} outputs, but the model's head is now another "
            f"layer ({got}): a head replaced after the method was built is not the one it reads, trains or names in "
            "trainable_parameters(). Build the method after replacing the head (and the optimizer after the method)"
        )


def refuse_ddp_wrapped(model: nn.Module, who: str) -> None:
    """Raise when ``model`` is already a ``DistributedDataParallel``: DDP reduces the parameters that were
    trainable when it was built, so a backbone frozen afterwards fails at the first backward pass, with an
    error that does not name the cause."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(
            f"{who} freezes the model's backbone: build it on the model before wrapping the model in "
            f"DistributedDataParallel (DDP reduces the parameters that were trainable when it was built), e.g. "
            f"method = {who}(model); model = DistributedDataParallel(model)"
        )


def freeze_backbone(model: nn.Module, head: nn.Module) -> None:
    """Stop gradients in every parameter outside ``head``: the backward pass of the user's loss then
    reaches the head only."""
    owned = {id(p) for p in head.parameters()}
    for p in model.parameters():
        if id(p) not in owned:
            p.requires_grad_(False)
            p.grad = None


class FeatureTap:
    """A forward pre-hook on the head that keeps its input, detached: the features of the model's latest
    forward, at no extra forward. The hook holds the tap weakly, so a copy of the model (a deep copy
    copies the hook) or a collected method leaves an inert hook behind."""

    def __init__(self, head: nn.Module) -> None:
        self.features: Optional[Tensor] = None
        ref = weakref.ref(self)

        def hook(module: nn.Module, args: Tuple[Any, ...]) -> None:
            tap = ref()
            if tap is not None and args and isinstance(args[0], Tensor):
                tap.features = args[0].detach()

        self._handle = head.register_forward_pre_hook(hook)

    def take(self) -> Optional[Tensor]:
        """The features of the latest forward, once (a second call without a new forward gives None)."""
        features, self.features = self.features, None
        return features

    def remove(self) -> None:
        self._handle.remove()
        self.features = None


def float_features(features: Tensor) -> Tensor:
    """``features`` flattened to ``(batch, dim)`` in float32 (autocast may hand the head half precision)."""
    return features.reshape(features.shape[0], -1).float()
