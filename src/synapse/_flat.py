"""Preallocated flat workspaces with per-parameter views, so no step concatenates all parameters."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn


class FlatSpace:
    """One contiguous float32 tensor, and a view of it shaped like each parameter.

    Args:
        params: the parameters whose shapes the views take.
        data: an existing flat tensor to wrap (e.g. from a state dict); zeros by default.
    """

    def __init__(self, params: Sequence[nn.Parameter], data: Optional[Tensor] = None) -> None:
        numel = sum(p.numel() for p in params)
        if data is None:
            data = torch.zeros(numel, dtype=torch.float32, device=params[0].device)
        elif data.shape != (numel,):
            raise ValueError(f"flat state has shape {tuple(data.shape)}, but the parameters hold {numel} values")
        self.flat = data
        self.views: List[Tensor] = []
        offset = 0
        for p in params:
            self.views.append(self.flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
