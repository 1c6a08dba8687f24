"""Per-step random draws made many steps at a time, bit-identical to drawing step by step: a numpy call
inside every training step costs a small (CPU MLP) step several times the draw itself."""

from __future__ import annotations

from typing import Any, Callable, Generic, Hashable, Mapping, Sequence, TypeVar

import numpy as np

__all__ = ["STEPS", "DrawAhead"]

STEPS = 64  # the steps whose draws are made at once
_Row = TypeVar("_Row")


class DrawAhead(Generic[_Row]):
    """A numpy generator whose per-step draws are made :data:`STEPS` steps at a time.

    A step asks for its row of draws with :meth:`peek`, naming what it draws with a key, and takes it with
    :meth:`consume` once the step succeeded (:meth:`take` does both); a row peeked and not consumed is handed
    out again. From the second step in a row with the same key on, the next ``steps`` rows are drawn at
    once. Every other use of the generator goes through :meth:`generator`, which puts it where step-by-step
    draws would have left it (the consumed rows drawn, no more) and drops the rows drawn ahead.

    Args:
        rng: the generator; from now on used only through this object.
        steps: rows drawn at once while the key repeats (1: one row per step).

    Example:
        >>> ahead = DrawAhead(np.random.default_rng(0))
        >>> row = ahead.take("pair", lambda rng, steps: rng.random((steps, 2)))

    ``draw(rng, steps)`` returns ``steps`` steps' rows and must use ``rng`` exactly as ``steps`` calls of
    ``draw(rng, 1)`` in turn would. The generator is put back by restoring its state from before the rows and
    drawing the consumed ones again: a cost paid only when a partly used block is dropped (a key change, a
    checkpoint, another use), never per step, and exact for any bit generator.
    """

    def __init__(self, rng: np.random.Generator, steps: int = STEPS) -> None:
        self._rng = rng
        self.steps = steps
        self._key: Hashable = None  # the key of the rows drawn (after them, of the last draw: a streak)
        self._rows: Sequence[_Row] = ()  # one per step
        self._used = 0  # rows consumed
        self._start: Mapping[str, Any] = {}  # the generator's state before the rows
        self._draw: Callable[[np.random.Generator, int], Sequence[_Row]] = lambda rng, steps: ()

    def peek(self, key: Hashable, draw: Callable[[np.random.Generator, int], Sequence[_Row]]) -> _Row:
        """This step's row, drawn by ``draw`` (see above) for ``key``; a different key drops the rows ahead."""
        if key != self._key or self._used == len(self._rows):
            streak = key == self._key
            rng = self.generator()
            self._start, self._draw, self._key = rng.bit_generator.state, draw, key
            self._rows, self._used = draw(rng, self.steps if streak else 1), 0
        return self._rows[self._used]

    def consume(self) -> None:
        """The row :meth:`peek` gave was used: the step succeeded."""
        if self._used == len(self._rows):  # generator() ran since the peek and dropped the row
            raise RuntimeError("consume() without a peeked row: the generator was used after the peek")
        self._used += 1

    def take(self, key: Hashable, draw: Callable[[np.random.Generator, int], Sequence[_Row]]) -> _Row:
        """:meth:`peek`, then :meth:`consume`: for a draw no step can take back."""
        row = self.peek(key, draw)
        self._used += 1
        return row

    def generator(self) -> np.random.Generator:
        """The generator, where drawing step by step would have left it; the rows drawn ahead are dropped."""
        if self._used < len(self._rows):
            self._rng.bit_generator.state = self._start
            if self._used:
                self._draw(self._rng, self._used)
        self._rows, self._used, self._key = (), 0, None  # another use ends a streak
        return self._rng
