"""Gradient constraints and projection: A-GEM."""

from .agem import AGEM

__all__ = ["AGEM"]
