"""A reservoir-sampling memory of named tensors, preallocated on the model's device."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor

from ._validation import check_positive_int

__all__ = ["ReservoirBuffer", "fresh_seed"]


def fresh_seed() -> int:
    # Drawn from torch's global RNG so that torch.manual_seed decides the buffer's randomness.
    return int(torch.randint(0, 2**62, (1,)).item())


class ReservoirBuffer:
    """A fixed-capacity reservoir sample (Vitter's Algorithm R) of a stream of batches.

    Each item is a row across a set of named tensors (for example ``inputs``, ``targets`` and
    ``logits``). Storage is allocated on the first :meth:`add`, with the shape, dtype and device of that
    batch, and never grows afterwards: ``nbytes == capacity * bytes_per_item``.

    Insertion is vectorised over the batch and never synchronises host and device: the number of items
    seen is a Python int, and every data-dependent decision is made with tensor ops. After ``n``
    insertions each item is present with probability ``capacity / n``.

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

    def __init__(self, capacity: int, *, seed: Optional[int] = None) -> None:
        check_positive_int("capacity", capacity)
        self.capacity = capacity
        self.num_seen = 0
        self._seed = fresh_seed() if seed is None else int(seed)
        self._storage: Dict[str, Tensor] = {}
        self._generator: Optional[torch.Generator] = None

    # ------------------------------------------------------------------ inspection
    def __len__(self) -> int:
        return min(self.num_seen, self.capacity)

    @property
    def names(self) -> tuple:
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

    def schema(self) -> Dict[str, tuple]:
        """``{name: (shape of one item, dtype)}`` of the stored fields."""
        return {k: (tuple(t.shape[1:]), t.dtype) for k, t in self._storage.items()}

    def __repr__(self) -> str:
        return f"ReservoirBuffer(capacity={self.capacity}, len={len(self)}, num_seen={self.num_seen})"

    # ------------------------------------------------------------------ validation
    def check_batch(self, items: Mapping[str, Tensor]) -> int:
        """Raise unless ``items`` can be added; returns the batch size. Changes nothing."""
        if not items:
            raise ValueError("items must hold at least one named tensor")
        sizes = {}
        for name, value in items.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"buffer field {name!r} must be a torch.Tensor, got {type(value).__name__}")
            if value.dim() == 0:
                raise ValueError(f"buffer field {name!r} must have a batch dimension, got a 0-d tensor")
            sizes[name] = value.shape[0]
        if len(set(sizes.values())) != 1:
            raise ValueError(f"all buffer fields need the same batch size, got {sizes}")
        if self._storage:
            if set(items) != set(self._storage):
                raise ValueError(f"buffer fields {sorted(items)} differ from the stored fields {sorted(self._storage)}")
            for name, value in items.items():
                shape, dtype = tuple(self._storage[name].shape[1:]), self._storage[name].dtype
                if tuple(value.shape[1:]) != shape or value.dtype != dtype:
                    raise ValueError(
                        f"{name!r} has per-item shape {tuple(value.shape[1:])} and dtype {value.dtype}, "
                        f"but the buffer holds shape {shape} and dtype {dtype}"
                    )
        return next(iter(sizes.values()))

    # ------------------------------------------------------------------ mutation
    def add(self, items: Mapping[str, Tensor], keep: Optional[Tensor] = None) -> None:
        """Offer a batch to the reservoir.

        Args:
            items: named tensors with a common batch dimension.
            keep: optional boolean per row. A row with ``keep == False`` never replaces a stored item;
                while the buffer is still filling it takes its reserved slot, so the reservoir stays
                exact. Non-finite floating values are stored as 0 either way, so a diverged step can't
                poison the memory.
        """
        batch = self.check_batch(items)
        if not self._storage:
            self._allocate(items)
        device = self.device
        assert device is not None
        items = {k: v.detach().to(device, non_blocking=True) for k, v in items.items()}
        if keep is not None:
            keep = keep.to(device)

        from .functional import reservoir_destinations

        dest, win, final_row_of_slot0 = reservoir_destinations(
            self.num_seen, batch, self.capacity, self._rng(), device, keep
        )
        for name, value in items.items():
            store = self._storage[name]
            if value.is_floating_point():
                value = torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0)
            # Rows that lose rewrite slot 0 with the value slot 0 ends up with, so the duplicate
            # writes agree and the result does not depend on write order.
            winner0 = value.index_select(0, final_row_of_slot0.clamp_min(0).view(1))[0]
            slot0 = torch.where(final_row_of_slot0 >= 0, winner0, store[0])
            rows = torch.where(win.view(-1, *([1] * (value.dim() - 1))), value, slot0)
            store.index_copy_(0, dest, rows)
        self.num_seen += batch

    def _allocate(self, items: Mapping[str, Tensor]) -> None:
        self._storage = {
            k: torch.zeros((self.capacity, *v.shape[1:]), dtype=v.dtype, device=v.device) for k, v in items.items()
        }

    def widen(self, name: str, width: int) -> None:
        """Zero-pad field ``name`` along its last dimension to ``width`` (for heads that grow)."""
        old = self._storage[name]
        if width < old.shape[-1]:
            raise ValueError(f"cannot narrow {name!r} from {old.shape[-1]} to {width}")
        new = old.new_zeros((*old.shape[:-1], width))
        new[..., : old.shape[-1]] = old
        self._storage[name] = new

    def to(self, device: torch.device | str) -> ReservoirBuffer:
        """Move the storage (and the generator's stream) to ``device``, in place."""
        device = torch.device(device)
        if self._storage and self.device != device:
            self._storage = {k: v.to(device) for k, v in self._storage.items()}
            self._generator = None  # re-created on the new device, from a seed drawn from the old one
        return self

    # ------------------------------------------------------------------ sampling
    def sample_indices(self, k: int, num_minibatches: int = 1) -> Tensor:
        """Indices of ``num_minibatches`` independent minibatches of ``min(k, len)`` distinct items.

        Returns a ``(num_minibatches, min(k, len(self)))`` int64 tensor on the buffer's device.
        """
        n = len(self)
        if n == 0:
            raise RuntimeError("cannot sample from an empty buffer")
        k = min(k, n)
        keys = torch.rand((num_minibatches, n), generator=self._rng(), device=self.device)
        # The k largest of n i.i.d. uniforms are a uniformly random k-subset.
        return keys.topk(k, dim=1, sorted=False).indices

    def gather(self, indices: Tensor) -> Dict[str, Tensor]:
        """The stored rows at ``indices`` (any shape), for every field."""
        flat = indices.reshape(-1)
        return {k: v.index_select(0, flat).view(*indices.shape, *v.shape[1:]) for k, v in self._storage.items()}

    def _rng(self) -> torch.Generator:
        if self._generator is None:
            device = self.device or torch.device("cpu")
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self._seed)
        return self._generator

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue bit-identically: storage, counters and RNG state."""
        return {
            "capacity": self.capacity,
            "num_seen": self.num_seen,
            "seed": self._seed,
            "storage": dict(self._storage),
            "rng_state": self._generator.get_state() if self._generator is not None else None,
            "rng_device": self._generator.device.type if self._generator is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any], device: Optional[torch.device] = None) -> None:
        """Restore a :meth:`state_dict`, onto ``device`` if given (else where it was saved)."""
        for key in ("capacity", "num_seen", "seed", "storage", "rng_state", "rng_device"):
            if key not in state:
                raise KeyError(f"buffer state is missing {key!r}")
        if int(state["capacity"]) != self.capacity:
            raise ValueError(
                f"checkpoint buffer capacity {state['capacity']} differs from this buffer's {self.capacity}"
            )
        storage = {k: (v.to(device) if device is not None else v.clone()) for k, v in state["storage"].items()}
        self._storage = storage
        self.num_seen = int(state["num_seen"])
        self._seed = int(state["seed"])
        self._generator = None
        if state["rng_state"] is not None:
            target = self.device or torch.device("cpu")
            if state["rng_device"] == target.type:
                self._rng().set_state(state["rng_state"])
            else:
                # Generator states are device-specific: continue with a seed derived from the saved one.
                derived = int(torch.as_tensor(state["rng_state"]).to(torch.int64).sum().item())
                self._seed = (self._seed * 1_000_003 + derived) % 2**62
