"""Structural regularisation: importance-weighted penalties on the weights. Synaptic Intelligence."""

from .si import SI

__all__ = ["SI"]
