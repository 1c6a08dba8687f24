"""Gradient constraints and projection: A-GEM, GEM."""

from .agem import AGEM
from .gem import GEM

__all__ = ["AGEM", "GEM"]
