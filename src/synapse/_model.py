"""Model helpers below the methods and the memories: the module that really runs, what enters its head,
and the distributed world size. Both ``_base`` and the memory policies import them; they import neither."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Union

import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["FeaturesFn", "distributed_world", "head_input_features", "unwrap_model"]

FeaturesFn = Callable[[Dict[str, Tensor]], Tensor]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that really runs ``forward``: through DDP/DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def distributed_world() -> int:
    """The world size when torch.distributed is running, else 1."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def head_input_features(model: nn.Module, head: Union[str, nn.Module]) -> FeaturesFn:
    """A feature extractor "the model minus its head": ``fn(inputs)`` runs ``model(**inputs)`` and returns
    what entered ``head`` (flattened to ``(batch, d)``).

    Args:
        model: the model (DDP- and ``torch.compile``-wrapped models work: the head is found in the
            module that runs).
        head: the head, as a submodule or its attribute path (``"fc"``, ``"classifier.3"``, or ``"4"`` for
            the last layer of an ``nn.Sequential`` of five); it must run once per forward.

    Example:
        >>> features = head_input_features(model, "fc")
        >>> features({"inputs": inputs}).shape  # (batch, d): what model.fc receives
        torch.Size([10, 16])
    """
    module = unwrap_model(model)
    if isinstance(head, str):
        try:
            head_module = module.get_submodule(head)
        except AttributeError:
            names = [n for n, _ in module.named_modules() if n]
            raise ValueError(f"the model has no submodule {head!r}; it has {names}") from None
    elif isinstance(head, nn.Module):
        if not any(m is head for m in module.modules()):
            raise ValueError("head must be a submodule of the model")
        head_module = head
    else:
        raise TypeError(f"head must be a submodule or its name, got {type(head).__name__}")

    def features(inputs: Dict[str, Tensor]) -> Tensor:
        seen: List[Tensor] = []

        def grab(_: nn.Module, args: Sequence[Any]) -> None:
            seen.append(args[0])

        handle = head_module.register_forward_pre_hook(grab)
        try:
            model(**inputs)
        finally:
            handle.remove()
        if len(seen) != 1:
            raise RuntimeError(f"the head ran {len(seen)} times in one forward; it must run exactly once")
        return seen[0].flatten(1)

    return features
