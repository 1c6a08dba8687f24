"""The reservoir policy: a uniform sample of the stream (Vitter's Algorithm R), decided on the host."""

from __future__ import annotations

from bisect import bisect_left
from typing import List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..buffer import Buffer, indices_on
from ..functional import last_wins, reservoir_draws, reservoir_plan

__all__ = ["ReservoirBuffer"]

# Replacement draws do not depend on how the stream is cut into batches, so they are made for this
# many future items at once; a batch then only looks up which of its items replace a slot.
DRAW_BLOCK = 4096


class ReservoirBuffer(Buffer):
    """A fixed-capacity reservoir sample (Vitter's Algorithm R) of a stream of batches.

    Storage and sampling are :class:`Buffer`'s. Which slot each new item takes is decided on the host,
    where the number of items seen already lives: the random draws need no device values, so insertion
    never synchronises host and device, and it launches one gather and one scatter per field -- none at
    all for the many batches that replace nothing once the stream is long. (CPU storage of
    numpy-compatible dtypes is written through numpy views instead: for the one or two rows a batch
    typically replaces, numpy's indexing costs a fraction of a torch operator's dispatch.) After ``n``
    insertions each item is present with probability ``capacity / n``; minibatches are sampled without
    replacement.

    Args:
        capacity: the number of items kept.
        seed: seed of the buffer's own generator. By default it is drawn from torch's global RNG when
            the buffer is created, so ``torch.manual_seed`` makes the buffer deterministic.

    Example:
        >>> buf = ReservoirBuffer(100)
        >>> buf.add({"x": torch.randn(8, 3), "y": torch.arange(8)})
        >>> len(buf)
        8
        >>> idx = buf.sample_indices(4)          # (1, 4), without replacement
        >>> batch = buf.gather(idx[0])           # {"x": (4, 3), "y": (4,)}
    """

    policy = "reservoir"

    def __init__(self, capacity: int, *, seed: Optional[int] = None) -> None:
        super().__init__(capacity, seed=seed)
        self._draws: Optional[np.ndarray] = None  # uniforms of stream items _draws_first, _draws_first + 1, ...
        self._draws_first = 0
        self._hit_offsets: List[int] = []  # the drawn items that replace a slot, as offsets from _draws_first
        self._hit_slots: List[int] = []  # and the slot each replaces
        self.add_state(
            "draws",
            dtype=torch.float64,
            shape=(DRAW_BLOCK,),
            optional=True,
            host=True,
            get=lambda: None if self._draws is None else torch.from_numpy(self._draws.copy()),
            stash=True,
        )
        self.add_value("draws_first", int, attr="_draws_first")

    def __len__(self) -> int:
        return min(self.num_seen, self.capacity)

    # ------------------------------------------------------------------ mutation
    def add(self, items: Mapping[str, Tensor], *, validate: bool = True) -> None:
        """Offer a batch to the reservoir (``validate=False`` skips a check the caller already made)."""
        batch = self.check_batch(items) if validate else next(iter(items.values())).shape[0]
        if not self._storage:
            self._allocate(items)
        slots, rows = self._plan(batch)
        self.num_seen += batch
        if not slots:
            return  # nothing replaced: no device work at all
        if self.num_seen <= self.capacity:  # still filling: row i goes to slot num_seen + i, a slice copy
            for name, value in items.items():
                self._storage[name][slots[0] : slots[0] + batch] = self._clean(value.detach())
            return
        if self._host is not None:  # CPU storage (so CPU items): numpy indexing costs a fraction of a torch op
            for name, value in items.items():
                self._write_host_rows(self._host[name], slots, value.detach().numpy(), rows)
            return
        assert self._device is not None
        both = indices_on(np.array(slots + rows), self._device)  # one host-to-device copy for both
        slot_index, row_index = both[: len(slots)], both[len(slots) :]
        for name, value in items.items():
            self._storage[name].index_copy_(0, slot_index, self._clean(value.detach().index_select(0, row_index)))

    def _plan(self, batch: int) -> Tuple[List[int], List[int]]:
        """``(slots, rows)`` for the next batch (see :func:`synapse.functional.reservoir_plan`)."""
        n = self.num_seen
        if n < self.capacity or batch > DRAW_BLOCK:  # filling: a one-off plan
            return reservoir_plan(n, batch, self.capacity, self._rng)
        if self._draws is None or n + batch > self._draws_first + len(self._draws):
            self._set_draws(n, self._rng.random(DRAW_BLOCK))
        # Python lists and bisect: the common batch that replaces nothing costs two C-level lookups, and
        # one that replaces a few slots no numpy call.
        start = n - self._draws_first
        lo, hi = bisect_left(self._hit_offsets, start), bisect_left(self._hit_offsets, start + batch)
        slots, rows = self._hit_slots[lo:hi], [offset - start for offset in self._hit_offsets[lo:hi]]
        return last_wins(slots, rows) if len(slots) > 1 else (slots, rows)

    def _set_draws(self, first: int, uniforms: np.ndarray) -> None:
        self._draws, self._draws_first = uniforms, first
        offsets, slots = reservoir_draws(first, uniforms, self.capacity)
        self._hit_offsets, self._hit_slots = offsets.tolist(), slots.tolist()

    # ------------------------------------------------------------------ state
    def _after_load(self) -> None:
        super()._after_load()
        draws = self._stashed("draws")
        if draws is None:
            self._draws = None
        else:
            self._set_draws(self._draws_first, draws.numpy())
