"""Preallocated flat workspaces with per-parameter views, so no step concatenates all parameters."""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor, nn


class FlatSpace:
    """One contiguous float tensor and a view of it shaped like each parameter."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.numel = sum(p.numel() for p in params)
        device = params[0].device
        self.flat = torch.zeros(self.numel, dtype=torch.float32, device=device)
        self.views: List[Tensor] = []
        offset = 0
        for p in params:
            self.views.append(self.flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
