"""A per-task episodic memory: one fixed budget of items, shared evenly by the tasks seen so far."""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ._device import to_device
from ._state import int_list
from ._validation import check_positive_int
from .buffer import Buffer
from .functional import distinct_subsets, reservoir_plan

__all__ = ["EpisodicMemory"]


class EpisodicMemory(Buffer):
    """Items of named tensors kept per task, in ``capacity`` rows allocated once on the data's device.

    GEM (Lopez-Paz & Ranzato 2017) and A-GEM (Chaudhry et al. 2019) keep an episodic memory per task.
    Their code knows the number of tasks in advance and gives each task a fixed share; a user's loop
    need not know it, so here the budget is split evenly among the tasks seen so far:

    * while task ``T`` runs (``T`` tasks finished before it), every task's share is
      ``m = capacity // (T + 1)``; the running task's items enter a reservoir sample (Vitter's Algorithm
      R) of size ``m``, so at its end the memory holds a uniformly random ``m``-subset of that task's
      stream (all of it, if it was shorter);
    * :meth:`end_task` closes the running task;
    * when the next task's first batch arrives, every finished task shrinks to the new share
      ``capacity // (T + 2)`` by keeping a uniformly random subset of its items (a random subset of a
      random subset is a random subset of the stream). Shrinking waits for that batch, so ending the
      last task of a run loses nothing.

    Past task ``i`` lies in rows ``[i * m, i * m + size_i)`` and the running task in
    ``[T * m, T * m + m)``. The slots each batch takes are drawn on the host, where the counters live,
    so insertion never synchronises host and device; floating-point values that are not finite are
    stored as 0. A task that stored nothing (``end_task`` with no batch since the last one) takes no
    share. With more tasks than ``capacity`` items there is no share left: the first batch of the
    task that would get none is rejected.

    Storage, validation, device moves and the state dict are :class:`~synapse.buffer.Buffer`'s; here
    ``num_seen`` counts the running task's items.

    Args:
        capacity: the number of items kept, over all tasks.
        seed: seed of the memory's own generator; by default drawn from torch's global RNG, so that
            ``torch.manual_seed`` makes the memory deterministic.

    Example:
        >>> memory = EpisodicMemory(100)
        >>> memory.add({"x": torch.randn(8, 3), "y": torch.arange(8)})
        >>> memory.end_task()
        >>> memory.task_sizes
        (8,)
        >>> memory.sample_tasks()[0]["x"].shape      # every item of task 0
        torch.Size([8, 3])
    """

    policy = "episodic"
    draws_ahead = False  # sample() draws per call: no pre-drawn block in the state

    def __init__(self, capacity: int, *, seed: Optional[int] = None) -> None:
        super().__init__(capacity, seed=seed)
        self._share = capacity  # the rows each task may use in the current layout
        self._task_sizes: List[int] = []  # items of each finished task
        self.add_value("share", int, attr="_share")
        self.add_value("task_sizes", list, get=lambda: list(self._task_sizes), convert=int_list, attr="_task_sizes")

    # ------------------------------------------------------------------ inspection
    @property
    def num_tasks(self) -> int:
        """Finished tasks held in memory."""
        return len(self._task_sizes)

    @property
    def task_sizes(self) -> Tuple[int, ...]:
        """The number of items of each finished task."""
        return tuple(self._task_sizes)

    @property
    def current_size(self) -> int:
        """Items of the running task held so far."""
        return min(self.num_seen, self._share)

    @property
    def share(self) -> int:
        """The rows each task may use in the current layout."""
        return self._share

    def __len__(self) -> int:
        return sum(self._task_sizes) + self.current_size

    def __repr__(self) -> str:
        return f"EpisodicMemory(capacity={self.capacity}, task_sizes={self.task_sizes}, current={self.current_size})"

    # ------------------------------------------------------------------ validation
    def check_batch(self, items: Mapping[str, Tensor], partial: bool = False) -> int:
        """Raise unless ``items`` can be added (there is a share left for their task); return the batch size."""
        batch = super().check_batch(items, partial)
        if self._next_share() == 0:
            raise ValueError(
                f"an episodic memory of capacity {self.capacity} has no room for task {self.num_tasks + 1}: "
                f"{self.num_tasks} tasks already share it; give it at least one item per task"
            )
        return batch

    def _next_share(self) -> int:
        """The share of every task once the running task (or the next one) stores its first item."""
        return self.capacity // (self.num_tasks + 1)

    # ------------------------------------------------------------------ mutation
    def add(self, items: Mapping[str, Tensor], *, validate: bool = True) -> None:
        """Offer a batch of the running task (``validate=False`` skips a check the caller already made)."""
        batch = self.check_batch(items) if validate else next(iter(items.values())).shape[0]
        if not self._storage:
            self._allocate(items)
        elif self.num_seen == 0 and self._next_share() < self._share:
            self._shrink(self._next_share())
        slots, rows = reservoir_plan(self.num_seen, batch, self._share, self._rng)
        self.num_seen += batch
        if not slots:
            return
        base = self.num_tasks * self._share
        if rows == list(range(len(rows))) and slots == list(range(slots[0], slots[0] + len(slots))):
            first = base + slots[0]  # still filling: a slice copy
            for name, value in items.items():
                self._storage[name][first : first + len(rows)] = self._clean(value.detach()[: len(rows)])
            return
        both = to_device(torch.tensor([base + s for s in slots] + rows, dtype=torch.int64), self._storage_device())
        slot_index, row_index = both[: len(slots)], both[len(slots) :]
        for name, value in items.items():
            self._storage[name].index_copy_(0, slot_index, self._clean(value.detach().index_select(0, row_index)))

    def end_task(self) -> None:
        """Close the running task: its items become a finished task's (nothing happens if it stored none)."""
        if self.num_seen == 0:
            return
        self._task_sizes.append(self.current_size)
        self.num_seen = 0

    def _shrink(self, share: int) -> None:
        """Keep a uniformly random ``min(size, share)`` of each finished task, re-laid out at ``share`` rows."""
        sources, targets, sizes = [], [], []
        for i, size in enumerate(self._task_sizes):
            keep = min(size, share)
            picked = np.sort(self._rng.choice(size, keep, replace=False)) if keep < size else np.arange(size)
            sources.append(i * self._share + picked)
            targets.append(i * share + np.arange(keep))
            sizes.append(keep)
        both = to_device(torch.from_numpy(np.concatenate(sources + targets).astype(np.int64)), self._storage_device())
        source, target = both[: len(both) // 2], both[len(both) // 2 :]
        for stored in self._storage.values():
            stored.index_copy_(0, target, stored.index_select(0, source))  # the gather copies first
        self._task_sizes, self._share = sizes, share

    def _storage_device(self) -> torch.device:
        device = self.device
        assert device is not None
        return device

    # ------------------------------------------------------------------ reading
    def _rows(self) -> np.ndarray:
        """The rows of every item held: the finished tasks', then the running task's."""
        sizes = [*self._task_sizes, self.current_size]
        return np.concatenate([i * self._share + np.arange(size) for i, size in enumerate(sizes)])

    def stored(self, names: Optional[Iterable[str]] = None) -> Dict[str, Tensor]:
        """Every item held, finished tasks first (a gather: copies, unlike a stream memory's views)."""
        return self.gather(to_device(torch.from_numpy(self._rows().astype(np.int64)), self._storage_device()), names)

    def task(self, i: int, names: Optional[Sequence[str]] = None) -> Dict[str, Tensor]:
        """Every item of finished task ``i`` (views of the storage: do not write to them)."""
        if not 0 <= i < self.num_tasks:
            raise IndexError(f"task {i} is not in memory: {self.num_tasks} finished tasks are")
        start = i * self._share
        return {k: self._storage[k][start : start + self._task_sizes[i]] for k in (names or self._storage)}

    def sample_tasks(self, k: Optional[int] = None, names: Optional[Sequence[str]] = None) -> List[Dict[str, Tensor]]:
        """One batch per finished task: all of its items (``k=None``, or ``k`` at least its size), or ``k``
        distinct ones drawn uniformly at random. One gather per field serves every task."""
        if k is not None:
            check_positive_int("k", k)
        if k is None or all(size <= k for size in self._task_sizes):
            return [self.task(i, names) for i in range(self.num_tasks)]
        picks = [
            i * self._share + (distinct_subsets(self._rng, size, k, 1)[0] if size > k else np.arange(size))
            for i, size in enumerate(self._task_sizes)
        ]
        index = to_device(torch.from_numpy(np.concatenate(picks).astype(np.int64)), self._storage_device())
        gathered = {n: self._storage[n].index_select(0, index) for n in (names or self._storage)}
        counts = [len(p) for p in picks]
        return [dict(zip(gathered, parts)) for parts in zip(*(v.split(counts) for v in gathered.values()))]

    def sample(self, k: int, num_minibatches: int = 1, names: Optional[Iterable[str]] = None) -> Dict[str, Tensor]:
        """``num_minibatches`` minibatches of ``min(k, n)`` distinct items, each drawn uniformly from the ``n``
        items of all finished tasks, one after the other along dim 0."""
        check_positive_int("k", k)
        n = sum(self._task_sizes)
        if n == 0:
            raise RuntimeError("no finished task in memory to sample from")
        flat = distinct_subsets(self._rng, n, min(k, n), num_minibatches).reshape(-1)
        starts = np.cumsum([0, *self._task_sizes])
        task = np.searchsorted(starts, flat, side="right") - 1  # flat position -> its task
        rows = task * self._share + flat - starts[task]
        return self.gather(to_device(torch.from_numpy(rows.astype(np.int64)), self._storage_device()), names)

    def sample_indices(self, k: int, num_minibatches: int = 1) -> Tensor:
        raise TypeError("an episodic memory samples finished tasks' items: use sample(k) or sample_tasks(k)")
