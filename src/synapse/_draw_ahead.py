"""Per-step draws of a numpy generator made many steps at a time, bit-identical to step-by-step draws (the
technique, and why it restores the generator as it does: docs/architecture.md, "Draws made ahead")."""

from __future__ import annotations

from typing import Any, Callable, Generic, Hashable, Mapping, Sequence, TypeVar

import numpy as np

__all__ = ["STEPS", "DrawAhead"]

STEPS = 64  # the steps whose draws are made at once
_Row = TypeVar("_Row")
# draw(rng, steps): one row per step, using rng exactly as `steps` calls of draw(rng, 1) in turn would
Draw = Callable[[np.random.Generator, int], Sequence[_Row]]


class DrawAhead(Generic[_Row]):
    """A numpy generator whose per-step draws are made ``steps`` at a time once a step's key repeats the
    last one's. A step peeks its row and consumes it once it succeeded; every other use of the generator
    goes through :meth:`generator`, which leaves it where step-by-step draws would have.

    Args:
        rng: the generator, from now on used only through this object.
        steps: rows drawn at once while the key repeats (1: none ahead).

    Example:
        >>> ahead = DrawAhead(np.random.default_rng(0))
        >>> row = ahead.peek("pair", lambda rng, steps: rng.random((steps, 2)))
        >>> ahead.consume()
    """

    def __init__(self, rng: np.random.Generator, steps: int = STEPS) -> None:
        self._rng, self.steps = rng, steps
        self._key: Hashable = None  # the rows' key (once they are used up, the last step's: a streak)
        self._rows: Sequence[_Row] = ()  # one per step
        self._used = 0  # rows consumed
        self._start: Mapping[str, Any] = {}  # the generator's state before the rows
        self._draw: Draw[_Row] = lambda rng, steps: ()  # what drew them

    def peek(self, key: Hashable, draw: Draw[_Row]) -> _Row:
        """This step's row for ``key``, drawn by ``draw``; a key other than the rows' drops them."""
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

    def generator(self) -> np.random.Generator:
        """The generator where step-by-step draws would have left it; the rows not consumed are dropped."""
        if self._used < len(self._rows):  # back to before the rows, then draw the consumed ones again
            self._rng.bit_generator.state = self._start
            if self._used:
                self._draw(self._rng, self._used)
        self._rows, self._used, self._key = (), 0, None  # another use ends a streak
        return self._rng
