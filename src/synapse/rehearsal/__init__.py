"""Rehearsal: replay from a memory. Experience Replay, Dark Experience Replay (DER, DER++), ER-ACE."""

from .bic import BiC
from .er import DER, ER, CustomER, DERpp
from .er_ace import ERACE
from .gdumb import GDumb
from .icarl import ICaRL
from .mir import MIR
from .xder import XDER

__all__ = ["BiC", "CustomER", "DER", "DERpp", "ER", "ERACE", "GDumb", "ICaRL", "MIR", "XDER"]
