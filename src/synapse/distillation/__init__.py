"""Distillation: regularising the outputs against an earlier model."""

from .lwf import LwF

__all__ = ["LwF"]
