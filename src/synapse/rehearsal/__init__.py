"""Rehearsal: replay from a memory. Experience Replay, Dark Experience Replay (DER, DER++), ER-ACE."""

from .er import ER

__all__ = ["ER"]
