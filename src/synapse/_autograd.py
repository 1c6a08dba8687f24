"""Backward passes whose seeds are built to match their roots.

``torch.autograd.backward`` and ``torch.autograd.grad`` spend several microseconds per root in Python
normalising and checking the seeds (``_make_grads``: imports, symbolic-shape comparisons) before they
call the engine; on a small model that is a visible share of a training step. Synapse's seeds are
cached tensors made with their root's shape, dtype and device, so plain tensors go straight to the engine
call the public functions end in. Anything else (tensor subclasses, which may override autograd through
``__torch_function__``) takes the public path.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["backward", "grad"]

# Private in torch (the public functions' last step); where a torch lacks it, the public path serves.
_engine: Optional[Callable[..., Any]] = getattr(torch.autograd.graph, "_engine_run_backward", None)


def _plain(roots: Sequence[Tensor]) -> bool:
    return all(type(t) is Tensor for t in roots)


def backward(roots: Sequence[Tensor], seeds: Sequence[Tensor]) -> None:
    """``torch.autograd.backward(roots, seeds)``; each seed must match its root's shape, dtype and device."""
    if _engine is not None and _plain(roots):
        _engine(tuple(roots), tuple(seeds), False, False, (), allow_unreachable=True, accumulate_grad=True)
    else:
        torch.autograd.backward(list(roots), list(seeds))


def grad(root: Tensor, seed: Tensor, inputs: Sequence[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """``torch.autograd.grad(root, inputs, seed, allow_unused=True)``; ``seed`` must match ``root``."""
    if _engine is not None and type(root) is Tensor:
        return _engine((root,), (seed,), False, False, tuple(inputs), True, accumulate_grad=False)
    return torch.autograd.grad(root, list(inputs), seed, allow_unused=True)
