"""Structural regularisation: importance-weighted penalties on the weights (SI, EWC, MAS)."""

from .ewc import EWC
from .mas import MAS
from .si import SI

__all__ = ["SI", "EWC", "MAS"]
