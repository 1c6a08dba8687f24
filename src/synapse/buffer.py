"""Memories of named tensors, preallocated on the model's device: the shared :class:`Buffer` interface. The
policies (reservoir, class-balanced, herding) live in :mod:`synapse.memory`, one module each, next to
:func:`~synapse.memory.make_buffer`; ``synapse.buffer.ReservoirBuffer`` stays importable from here."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ._device import to_device
from ._draw_ahead import STEPS, DrawAhead
from ._state import StateError, Stateful
from ._validation import check_positive_int
from .functional import distinct_subsets

__all__ = ["Buffer", "fresh_seed"]

# Once the buffer is full its population is fixed, so replay indices are drawn for this many steps at
# a time: one generator call and one host-to-device copy instead of one per step.
SAMPLE_BLOCK = 64
# Dtypes a CPU tensor can share with numpy (no bfloat16, no complex: those take the torch path).
_NUMPY_DTYPES = frozenset(
    {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}
    | {torch.float16, torch.float32, torch.float64}
)


def fresh_seed() -> int:
    """A seed drawn from torch's global RNG, so that ``torch.manual_seed`` decides the buffer's randomness."""
    return int(torch.randint(0, 2**62, (1,)).item())


def _zero_non_finite(array: np.ndarray) -> np.ndarray:
    """Set non-finite floats of ``array`` to 0, in place; return it."""
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        array[~np.isfinite(array)] = 0
    return array


def indices_on(indices: np.ndarray, device: torch.device) -> Tensor:
    """Host indices as an int64 tensor on ``device``."""
    return to_device(torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64)), device)


class Buffer(Stateful, ABC):
    """The interface every memory policy shares: named tensors in ``capacity`` rows allocated once.

    Each item is a row across a set of named tensors (for example ``inputs``, ``targets`` and
    ``logits``). Storage is allocated on the first :meth:`add` (or fill), with the shape, dtype and
    device of that batch, and never grows afterwards: ``nbytes == capacity * bytes_per_item``. Inputs
    keep their dtype (uint8 images stay uint8); non-finite floating values are stored as 0, so a diverged
    step cannot poison the memory. The stored items are rows ``[0, len)``.

    A policy decides which items stay (:meth:`add`, and ``__len__``); this base holds what they share:
    validation, the storage and its device, uniform replay sampling without replacement (drawn on the
    host, from the memory's own generator), field growth, and the state dict.

    Args:
        capacity: the number of items kept.
        seed: seed of the memory's own generator. By default it is drawn from torch's global RNG when
            the memory is created, so ``torch.manual_seed`` makes the memory deterministic.
    """

    policy = ""  # the name make_buffer knows this policy by
    draws_ahead = True  # replay indices drawn ahead: SAMPLE_BLOCK steps once full, STEPS while unchanged

    def __init__(self, capacity: int, *, seed: Optional[int] = None) -> None:
        check_positive_int("capacity", capacity)
        self.capacity = capacity
        self.num_seen = 0
        self._rng = np.random.Generator(np.random.PCG64(fresh_seed() if seed is None else int(seed)))
        self._storage: Dict[str, Tensor] = {}
        self._schema: Dict[str, Tuple[tuple, torch.dtype]] = {}
        self._block: Optional[Tensor] = None  # (SAMPLE_BLOCK, num_minibatches, k) pre-drawn indices
        self._block_rows: Tuple[Tensor, ...] = ()  # the block's rows, one per step
        self._block_pos = 0
        self._host: Optional[Dict[str, np.ndarray]] = None  # see _storage_changed
        self._device: Optional[torch.device] = None
        self.add_value("capacity", int, equal=True)
        self.add_value("num_seen", int)
        self.add_tensors("storage", shape=("capacity", ...), attr="_storage")
        self.add_generator("rng_state", "_rng")
        if self.draws_ahead:
            self._declare_block()

    def _declare_block(self) -> None:
        # The block is saved on the host and follows the storage's device once loaded (_after_load).
        self.add_state(
            "sample_block",
            dtype=torch.int64,
            shape=(SAMPLE_BLOCK, None, None),
            optional=True,
            host=True,
            get=lambda: None if self._block is None else self._block.cpu(),
            stash=True,
        )
        self.add_value("sample_block_pos", int, attr="_block_pos")

    # ------------------------------------------------------------------ inspection
    @abstractmethod
    def __len__(self) -> int:
        """The items stored (rows ``[0, len)``)."""

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(self._storage)

    @property
    def device(self) -> Optional[torch.device]:
        return self._device

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
        return f"{type(self).__name__}(capacity={self.capacity}, len={len(self)}, num_seen={self.num_seen})"

    # ------------------------------------------------------------------ validation
    def check_batch(self, items: Mapping[str, Tensor], partial: bool = False) -> int:
        """Raise unless ``items`` can be added; returns the batch size. Changes nothing.

        With ``partial``, ``items`` may be a subset of the stored fields (the rest is checked elsewhere).
        """
        if not items:
            raise ValueError("items must hold at least one named tensor")
        batch = None
        for name, value in items.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"buffer field {name!r} must be a torch.Tensor, got {type(value).__name__}")
            if value.dim() == 0:
                raise ValueError(f"buffer field {name!r} must have a batch dimension, got a 0-d tensor")
            if batch is not None and value.shape[0] != batch:
                sizes = {k: v.shape[0] for k, v in items.items()}
                raise ValueError(f"all buffer fields need the same batch size, got {sizes}")
            batch = value.shape[0]
        self.check_layout(items, partial)
        assert batch is not None
        return batch

    def check_layout(self, items: Mapping[str, Tensor], partial: bool = False) -> None:
        """Raise unless the fields of ``items`` (batches of tensors) match the stored fields' names,
        per-item shapes and dtypes; anything goes before the first :meth:`add`."""
        if not self._schema:
            return
        if not (items.keys() <= self._schema.keys() if partial else items.keys() == self._schema.keys()):
            raise ValueError(f"buffer fields {sorted(items)} differ from the stored fields {sorted(self._schema)}")
        for name, value in items.items():
            shape, dtype = self._schema[name]
            if value.shape[1:] != shape or value.dtype != dtype:
                raise ValueError(
                    f"{name!r} has per-item shape {tuple(value.shape[1:])} and dtype {value.dtype}, "
                    f"but the buffer holds shape {shape} and dtype {dtype}"
                )

    # ------------------------------------------------------------------ mutation
    @abstractmethod
    def add(self, items: Mapping[str, Tensor], *, validate: bool = True) -> None:
        """Offer a batch to the memory (``validate=False`` skips a check the caller already made)."""

    @staticmethod
    def _write_host_rows(storage: np.ndarray, slots: List[int], values: np.ndarray, rows: List[int]) -> None:
        """``storage[slots] = values[rows]``, non-finite floats as 0."""
        if len(slots) == 1:  # the common case: plain indexing, cheaper than any gather
            storage[slots[0]] = values[rows[0]]
            _zero_non_finite(storage[slots[0] : slots[0] + 1])  # a view (even of a 1-d field): cleans the storage
        else:
            storage[slots] = _zero_non_finite(values.take(rows, axis=0))

    @staticmethod
    def _clean(value: Tensor) -> Tensor:
        return torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0) if value.is_floating_point() else value

    def _allocate(self, items: Mapping[str, Tensor]) -> None:
        self._storage = {
            k: torch.zeros((self.capacity, *v.shape[1:]), dtype=v.dtype, device=v.device) for k, v in items.items()
        }
        self._storage_changed()

    def _storage_changed(self) -> None:
        self._schema = {k: (tuple(t.shape[1:]), t.dtype) for k, t in self._storage.items()}
        self._device = next(iter(self._storage.values())).device if self._storage else None
        # numpy views of CPU storage, for the few-row writes of insertion; None where numpy cannot help
        host = all(t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES for t in self._storage.values())
        self._host = {k: t.numpy() for k, t in self._storage.items()} if host and self._storage else None

    def add_field(self, name: str, fill: Tensor) -> None:
        """Add field ``name`` to every item, each set to ``fill`` (a tensor of one item's shape)."""
        if name in self._storage:
            raise ValueError(f"buffer field {name!r} exists already")
        if self._storage:
            device = self.device
            self._storage[name] = fill.to(device).expand(self.capacity, *fill.shape).clone()
            self._storage_changed()

    def widen(self, name: str, width: int) -> None:
        """Zero-pad field ``name`` along its last dimension to ``width`` (for heads that grow)."""
        old = self._storage[name]
        if width < old.shape[-1]:
            raise ValueError(f"cannot narrow {name!r} from {old.shape[-1]} to {width}")
        self._storage[name] = _zero_pad(old, width)
        self._storage_changed()

    def to(self, device: torch.device | str) -> Buffer:
        """Move the storage to ``device``, in place (the generator lives on the host and is unaffected)."""
        device = torch.device(device)
        if self._storage and self.device != device:
            self._storage = {k: v.to(device) for k, v in self._storage.items()}
            self._storage_changed()
            self._set_block(None if self._block is None else self._block.to(device))
        return self

    # ------------------------------------------------------------------ sampling
    def sample_indices(self, k: int, num_minibatches: int = 1) -> Tensor:
        """Indices of ``num_minibatches`` independent minibatches of ``min(k, len)`` distinct items.

        Returns a ``(num_minibatches, min(k, len(self)))`` int64 tensor on the buffer's device.
        """
        return self._next_indices(k, num_minibatches).view(num_minibatches, -1)

    @property
    def _rng(self) -> np.random.Generator:
        """The memory's generator, where step-by-step draws would have left it (see :class:`DrawAhead`)."""
        return self._draws_ahead.generator()

    @_rng.setter
    def _rng(self, rng: np.random.Generator) -> None:
        self._draws_ahead: DrawAhead[Any] = DrawAhead(rng, STEPS if self.draws_ahead else 1)

    def sample(self, k: int, num_minibatches: int = 1, names: Optional[Iterable[str]] = None) -> Dict[str, Tensor]:
        """``num_minibatches`` independent minibatches as by :meth:`sample_indices`, gathered and stacked
        along dim 0 (minibatch ``i`` is rows ``i * k' : (i + 1) * k'`` with ``k' = min(k, len)``)."""
        return self.gather(self._next_indices(k, num_minibatches), names)

    def _population_fixed(self, n: int) -> bool:
        """Whether the rows that may be sampled stay ``[0, n)`` from one step to the next (true once a
        stream memory is full), so that indices may be drawn ahead, :data:`SAMPLE_BLOCK` steps at a time."""
        return n == self.capacity

    def _next_indices(self, k: int, num_minibatches: int) -> Tensor:
        """The next minibatches' indices, flat: ``num_minibatches * min(k, len)`` of them."""
        n = len(self)
        if n == 0:
            raise RuntimeError("cannot sample from an empty buffer")
        k = min(k, n)
        device = self._device
        assert device is not None
        if not self._population_fixed(n):  # still filling: the population may change with every batch
            return self._step_indices(n, k, num_minibatches, device)
        block = self._block
        if block is None or block.shape[1:] != (num_minibatches, k) or self._block_pos == len(block):
            picks = distinct_subsets(self._rng, n, k, SAMPLE_BLOCK * num_minibatches)
            self._set_block(indices_on(picks.reshape(SAMPLE_BLOCK, num_minibatches, k), device))
            self._block_pos = 0
        self._block_pos += 1
        return self._block_rows[self._block_pos - 1]

    def _step_indices(self, n: int, k: int, num_minibatches: int, device: torch.device) -> Tensor:
        """One step's draw from a population that may change, drawn ahead while it does not (X-DER's memory
        between task ends, which is not full): see :class:`DrawAhead`."""

        def draw(rng: np.random.Generator, steps: int) -> Tuple[Tensor, ...]:
            # One distinct_subsets call per step: one call for all would redraw the repeats in another order.
            picks = [distinct_subsets(rng, n, k, num_minibatches).reshape(-1) for _ in range(steps)]
            return indices_on(np.stack(picks), device).unbind(0)

        row = self._draws_ahead.peek(("indices", n, k, num_minibatches, device), draw)
        self._draws_ahead.consume()
        return row

    def _set_block(self, block: Optional[Tensor]) -> None:
        self._block = block
        # Split once into one flat row per step, rather than indexing and reshaping on every step.
        self._block_rows = () if block is None else block.view(len(block), -1).unbind(0)

    def gather(self, indices: Tensor, names: Optional[Iterable[str]] = None) -> Dict[str, Tensor]:
        """The stored rows at 1-d ``indices``, for every field or for ``names``."""
        names = self._storage if names is None else names
        return {k: self._storage[k].index_select(0, indices) for k in names}

    def write(self, name: str, indices: Tensor, values: Tensor) -> None:
        """Overwrite field ``name`` of the stored rows at 1-d ``indices`` with ``values`` (one row each), on the
        device, non-finite floats as 0: for what a method keeps about an item and revises later."""
        self._storage[name].index_copy_(0, indices, self._clean(values).to(self._storage[name].dtype))

    def stored(self, names: Optional[Iterable[str]] = None) -> Dict[str, Tensor]:
        """Every stored item (rows ``[0, len)``), for every field or for ``names``: views of the storage,
        valid until the next insertion; do not write to them."""
        n = len(self)
        return {k: self._storage[k][:n] for k in (self._storage if names is None else names)}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue bit-identically: storage, counters and RNG state."""
        return self._declared_state()

    def load_state_dict(self, state: Mapping[str, Any], device: Optional[torch.device] = None) -> None:
        """Restore a :meth:`state_dict`, onto ``device`` if given (else where it was saved). Strict and all
        or nothing: a state that does not fit raises :class:`~synapse._state.StateError` and changes nothing."""
        self._prepare_state(state, device, "buffer state")()

    def _prepare_state(self, state: Any, device: Optional[torch.device], path: str = "state") -> Any:
        named = isinstance(state, Mapping) and ("policy" in state or "policy" in self._declared_fields())
        policy = state.get("policy", "reservoir") if named else self.policy  # a reservoir states no policy
        if policy != self.policy:
            raise StateError(f"the checkpoint holds a {policy!r} memory, but this one's policy is {self.policy!r}")
        return super()._prepare_state(state, device, path)

    def _after_load(self) -> None:
        self._storage_changed()
        block = self._stashed("sample_block") if self.draws_ahead else None
        self._set_block(None if block is None or self.device is None else block.to(self.device))


def _zero_pad(old: Tensor, width: int) -> Tensor:
    """``old`` zero-padded along its last dimension to ``width``."""
    new = old.new_zeros((*old.shape[:-1], width))
    new[..., : old.shape[-1]] = old
    return new


def __getattr__(name: str) -> Any:
    # ``from synapse.buffer import ReservoirBuffer`` (its home before synapse.memory.reservoir) keeps working;
    # imported lazily, since synapse.memory imports this module.
    if name == "ReservoirBuffer":
        from .memory.reservoir import ReservoirBuffer

        return ReservoirBuffer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
