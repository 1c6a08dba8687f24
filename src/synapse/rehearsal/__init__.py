"""Rehearsal: replay from a memory. Experience Replay, Dark Experience Replay (DER, DER++), ER-ACE."""

from .er import ER
from .er_ace import ERACE
from .mir import MIR
from .xder import XDER

__all__ = ["ER", "ERACE", "MIR", "XDER"]
