"""Rehearsal: replay from a memory. Experience Replay, Dark Experience Replay (DER, DER++), ER-ACE."""

from .er import ER
from .er_ace import ERACE

__all__ = ["ER", "ERACE"]
