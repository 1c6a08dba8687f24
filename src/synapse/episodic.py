"""A per-task episodic memory: one fixed budget of items, shared evenly by the tasks seen so far."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ._device import to_device
from ._state import Stateful, int_list
from ._validation import check_positive_int
from .buffer import fresh_seed
from .functional import distinct_subsets, reservoir_plan

__all__ = ["EpisodicMemory"]


class EpisodicMemory(Stateful):
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

    def __init__(self, capacity: int, *, seed: Optional[int] = None) -> None:
        check_positive_int("capacity", capacity)
        self.capacity = capacity
        self._rng = np.random.Generator(np.random.PCG64(fresh_seed() if seed is None else int(seed)))
        self._storage: Dict[str, Tensor] = {}
        self._schema: Dict[str, Tuple[tuple, torch.dtype]] = {}
        self._share = capacity  # the rows each task may use in the current layout
        self._task_sizes: List[int] = []  # items of each finished task
        self._num_seen = 0  # items offered by the running task
        self.add_value("capacity", int, equal=True)
        self.add_value("share", int, attr="_share")
        self.add_value("task_sizes", list, attr="_task_sizes", get=lambda: list(self._task_sizes), convert=int_list)
        self.add_value("num_seen", int, attr="_num_seen")
        self.add_tensors("storage", shape=("capacity", ...), attr="_storage")
        self.add_generator("rng_state", "_rng")

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
        return min(self._num_seen, self._share)

    @property
    def share(self) -> int:
        """The rows each task may use in the current layout."""
        return self._share

    def __len__(self) -> int:
        return sum(self._task_sizes) + self.current_size

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(self._storage)

    @property
    def device(self) -> Optional[torch.device]:
        return next(iter(self._storage.values())).device if self._storage else None

    @property
    def bytes_per_item(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self._storage.values())

    @property
    def nbytes(self) -> int:
        """Bytes held by the storage: exactly ``capacity * bytes_per_item`` (0 before the first add)."""
        return sum(t.numel() * t.element_size() for t in self._storage.values())

    def schema(self) -> Dict[str, Tuple[tuple, torch.dtype]]:
        """``{name: (shape of one item, dtype)}`` of the stored fields."""
        return self._schema

    def __repr__(self) -> str:
        return f"EpisodicMemory(capacity={self.capacity}, task_sizes={self.task_sizes}, current={self.current_size})"

    # ------------------------------------------------------------------ validation
    def check_batch(self, items: Mapping[str, Tensor], partial: bool = False) -> int:
        """Raise unless ``items`` can be added; return the batch size. Changes nothing.

        With ``partial``, ``items`` may be a subset of the stored fields (the rest is checked elsewhere).
        """
        if not items:
            raise ValueError("items must hold at least one named tensor")
        sizes = {}
        for name, value in items.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"memory field {name!r} must be a torch.Tensor, got {type(value).__name__}")
            if value.dim() == 0:
                raise ValueError(f"memory field {name!r} must have a batch dimension, got a 0-d tensor")
            sizes[name] = value.shape[0]
        if len(set(sizes.values())) > 1:
            raise ValueError(f"all memory fields need the same batch size, got {sizes}")
        self.check_layout(items, partial)
        if self._next_share() == 0:
            raise ValueError(
                f"an episodic memory of capacity {self.capacity} has no room for task {self.num_tasks + 1}: "
                f"{self.num_tasks} tasks already share it; give it at least one item per task"
            )
        return next(iter(sizes.values()))

    def check_layout(self, items: Mapping[str, Tensor], partial: bool = False) -> None:
        """Raise unless the fields of ``items`` (batches of tensors) match the stored fields' names,
        per-item shapes and dtypes; anything goes before the first :meth:`add`."""
        if not self._schema:
            return
        if not (items.keys() <= self._schema.keys() if partial else items.keys() == self._schema.keys()):
            raise ValueError(f"memory fields {sorted(items)} differ from the stored fields {sorted(self._schema)}")
        for name, value in items.items():
            shape, dtype = self._schema[name]
            if value.shape[1:] != shape or value.dtype != dtype:
                raise ValueError(
                    f"{name!r} has per-item shape {tuple(value.shape[1:])} and dtype {value.dtype}, "
                    f"but the memory holds shape {shape} and dtype {dtype}"
                )

    def _next_share(self) -> int:
        """The share of every task once the running task (or the next one) stores its first item."""
        return self.capacity // (self.num_tasks + 1)

    # ------------------------------------------------------------------ mutation
    def add(self, items: Mapping[str, Tensor], *, validate: bool = True) -> None:
        """Offer a batch of the running task (``validate=False`` skips a check the caller already made)."""
        batch = self.check_batch(items) if validate else next(iter(items.values())).shape[0]
        if not self._storage:
            self._allocate(items)
        elif self._num_seen == 0 and self._next_share() < self._share:
            self._shrink(self._next_share())
        slots, rows = reservoir_plan(self._num_seen, batch, self._share, self._rng)
        self._num_seen += batch
        if not slots:
            return
        base = self.num_tasks * self._share
        if rows == list(range(len(rows))) and slots == list(range(slots[0], slots[0] + len(slots))):
            first = base + slots[0]  # still filling: a slice copy
            for name, value in items.items():
                self._storage[name][first : first + len(rows)] = self._clean(value.detach()[: len(rows)])
            return
        device = self._storage_device()
        both = to_device(torch.tensor([base + s for s in slots] + rows, dtype=torch.int64), device)
        slot_index, row_index = both[: len(slots)], both[len(slots) :]
        for name, value in items.items():
            self._storage[name].index_copy_(0, slot_index, self._clean(value.detach().index_select(0, row_index)))

    def end_task(self) -> None:
        """Close the running task: its items become a finished task's (nothing happens if it stored none)."""
        if self._num_seen == 0:
            return
        self._task_sizes.append(self.current_size)
        self._num_seen = 0

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

    @staticmethod
    def _clean(value: Tensor) -> Tensor:
        return torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0) if value.is_floating_point() else value

    def _allocate(self, items: Mapping[str, Tensor]) -> None:
        self._storage = {
            k: torch.zeros((self.capacity, *v.shape[1:]), dtype=v.dtype, device=v.device) for k, v in items.items()
        }
        self._schema = {k: (tuple(t.shape[1:]), t.dtype) for k, t in self._storage.items()}

    def _storage_device(self) -> torch.device:
        device = self.device
        assert device is not None
        return device

    def to(self, device: torch.device | str) -> EpisodicMemory:
        """Move the storage to ``device``, in place (the generator lives on the host)."""
        device = torch.device(device)
        self._storage = {k: v.to(device) for k, v in self._storage.items()}
        return self

    # ------------------------------------------------------------------ reading
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

    def sample(self, k: int, names: Optional[Sequence[str]] = None) -> Dict[str, Tensor]:
        """``min(k, n)`` distinct items drawn uniformly from the ``n`` items of all finished tasks."""
        check_positive_int("k", k)
        n = sum(self._task_sizes)
        if n == 0:
            raise RuntimeError("no finished task in memory to sample from")
        flat = distinct_subsets(self._rng, n, min(k, n), 1)[0]
        starts = np.cumsum([0, *self._task_sizes])
        task = np.searchsorted(starts, flat, side="right") - 1  # flat position -> its task
        rows = task * self._share + flat - starts[task]
        index = to_device(torch.from_numpy(rows.astype(np.int64)), self._storage_device())
        return {name: self._storage[name].index_select(0, index) for name in (names or self._storage)}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue bit-identically: storage, layout, counters and RNG state."""
        return self._declared_state()

    def load_state_dict(self, state: Mapping[str, Any], device: Optional[torch.device] = None) -> None:
        """Restore a :meth:`state_dict`, onto ``device`` if given (else where it was saved). Strict and all
        or nothing: a state that does not fit raises :class:`~synapse._state.StateError` and changes nothing."""
        self._prepare_state(state, device, "episodic memory state")()

    def _after_load(self) -> None:
        self._schema = {k: (tuple(t.shape[1:]), t.dtype) for k, t in self._storage.items()}
