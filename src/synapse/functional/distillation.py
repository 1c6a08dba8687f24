"""Distillation losses on the outputs: matching an earlier model's softened predictions."""

from __future__ import annotations

__all__: list = []
