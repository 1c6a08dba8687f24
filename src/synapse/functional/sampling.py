"""Reservoir slots and replay minibatches, decided on the host (no device values are read)."""

from __future__ import annotations

from typing import Iterable, List, Tuple

import numpy as np

__all__ = ["reservoir_plan", "reservoir_draws", "last_wins", "distinct_subsets"]


def reservoir_draws(first: int, uniforms: np.ndarray, capacity: int) -> Tuple[np.ndarray, np.ndarray]:
    """Algorithm R's replacements for the stream items ``first, first + 1, ...`` (one uniform each).

    Item ``t >= capacity`` draws ``j = floor(u_t * (t + 1))``, uniform on ``{0..t}``, and replaces slot
    ``j`` if ``j < capacity`` (float64 keeps this exact far beyond any realistic stream). Items below
    ``capacity`` fill their own slot and are not listed.

    Returns:
        ``(offsets, slots)``: the replacing items as offsets from ``first`` (ascending), and their slots.
    """
    t = first + np.arange(len(uniforms))
    drawn = (uniforms * (t + 1)).astype(np.int64)
    offsets = np.flatnonzero((drawn < capacity) & (t >= capacity))
    return offsets, drawn[offsets]


def last_wins(slots: Iterable[int], rows: Iterable[int]) -> Tuple[List[int], List[int]]:
    """Keep, for each slot written more than once by one batch, only the last row (as sequential
    insertion would); ``rows`` must be in stream order."""
    last = dict(zip(slots, rows))  # a later row overwrites an earlier one's entry
    return list(last), list(last.values())


def reservoir_plan(num_seen: int, batch: int, capacity: int, rng: np.random.Generator) -> Tuple[List[int], List[int]]:
    """Which rows of the next batch enter the reservoir, and where (Algorithm R, vectorised on the host).

    Item ``t`` (0-based over the whole stream) fills slot ``t`` while ``t < capacity``; afterwards it
    replaces a slot as :func:`reservoir_draws` says. When several rows of the batch pick the same slot
    the last one wins, exactly as one-at-a-time insertion would.

    Returns:
        ``(slots, rows)``: distinct slots, and for each the batch row that ends up there.
    """
    filling = min(max(capacity - num_seen, 0), batch)  # rows that take the next free slots
    rows = list(range(filling))
    slots = list(range(num_seen, num_seen + filling))
    if filling == batch:
        return slots, rows
    hits, drawn = reservoir_draws(num_seen + filling, rng.random(batch - filling), capacity)
    return last_wins(slots + drawn.tolist(), rows + (hits + filling).tolist())


def distinct_subsets(rng: np.random.Generator, n: int, k: int, rows: int) -> np.ndarray:
    """``rows`` independent, uniformly random ``k``-subsets of ``range(n)``, as a ``(rows, k)`` array.

    Small ``k`` draws ``k`` integers per row and redraws the rows that repeat one (rejection keeps the
    distribution exactly uniform over subsets, and is cheap while ``k * k <= 2 n``); larger ``k`` takes
    the ``k`` smallest of ``n`` uniforms per row.
    """
    if k == n:
        return rng.permuted(np.broadcast_to(np.arange(n), (rows, n)), axis=1)
    if k * k > 2 * n:
        return np.argpartition(rng.random((rows, n)), k - 1, axis=1)[:, :k]
    picks = rng.integers(0, n, size=(rows, k))
    redo = np.arange(rows)
    while len(redo):
        ordered = np.sort(picks[redo], axis=1)
        redo = redo[(ordered[:, 1:] == ordered[:, :-1]).any(axis=1)]
        picks[redo] = rng.integers(0, n, size=(len(redo), k))
    return picks
