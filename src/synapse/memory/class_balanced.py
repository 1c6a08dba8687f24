"""GDumb's greedy class-balanced memory: every class seen an equal share, within one slot."""

from __future__ import annotations

from bisect import insort
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .._state import StateError
from ..buffer import Buffer, _zero_pad, indices_on
from ..functional import last_wins

__all__ = ["UNIFORM_BLOCK", "ClassBalancedBuffer"]

# Uniforms for the class balancer's random choices are drawn this many at a time.
UNIFORM_BLOCK = 1024


class ClassBalancedBuffer(Buffer):
    """GDumb's greedy class-balanced memory (Prabhu et al. 2020, *GDumb: A Simple Approach that
    Questions Our Progress in Continual Learning*, the "greedy sampler").

    Items are offered one at a time, in stream order (a batch is its rows in order):

    * while the memory has room, every item enters (it takes the next free row);
    * once it is full, an item of class ``y`` enters only if ``y`` holds fewer items than the largest
      class; it then takes a slot of a largest class, chosen uniformly at random among that class's
      slots. When several classes are largest, the one that gives up the slot is chosen uniformly at
      random among them. An item of a largest class (or of a class as large) is discarded.

    So a new class always gets in, at the largest class's expense. Whatever the stream, the class
    counts ``c_y`` end balanced within one slot: with ``M`` the largest count and ``n_y`` the items of
    class ``y`` offered, every class holds ``c_y >= min(n_y, M - 1)`` (a class only loses items while it
    is a largest one, and the largest count never grows once the memory is full), and the memory is
    full as soon as ``capacity`` items were offered. The random choices come from their own generator,
    drawn in blocks, one uniform per choice: the memory's contents do not depend on how the stream is
    cut into batches, nor on when replay minibatches are sampled.

    **Deviation from the paper.** GDumb's sampler admits an item of an existing class while its count is
    below ``capacity / |Y|`` (``|Y|`` the classes seen); here the bar is the largest class's count. The
    two agree whenever every class seen has at least a share's worth of items, but when some class is
    scarce the paper's bar leaves plentiful classes below the largest one (capacity 10, counts
    ``(5, 3, 1, 1)``: the paper discards the second class's items, this memory lets them in until
    ``(4, 4, 1, 1)``), and the issue asks for shares within one slot after any stream.

    **No host sync.** Choosing slots needs the labels, which on CUDA live on the device; reading them
    would stall the host until the GPU catches up. So on CUDA insertion is one step late: :meth:`add`
    copies the batch, cleaned, into a preallocated staging area (a device copy), starts an asynchronous
    copy of its labels into pinned host memory and records a CUDA event; the next :meth:`add` waits on
    that event -- the copy was queued a whole training step earlier, while the GPU still has the current
    step queued, so it does not idle -- decides the previous batch's slots on the host and writes them
    with one scatter per field. Until then the batch is *pending*: not in ``len``, not sampled.
    :meth:`flush` applies it now (e.g. before retraining from the memory, as GDumb does at task end);
    :meth:`state_dict` saves it, so a resumed run is exact; :meth:`to` moves it. CPU labels are read
    directly and need no delay (``defer=True`` forces the CUDA scheme on the CPU, e.g. to test it;
    ``defer=False`` on CUDA reads the labels at once, a host sync).

    Args:
        capacity: the number of items kept.
        seed: seed of the memory's generators (replay sampling, and a jumped copy for the balancer's
            choices); by default drawn from torch's global RNG.
        label_field: the field holding each item's class index (an integer tensor of shape ``(batch,)``).
        defer: delay insertion by one :meth:`add` (see above); ``None``: when the labels are on CUDA.

    Example:
        >>> memory = ClassBalancedBuffer(4, seed=0)
        >>> memory.add({"x": torch.randn(6, 3), "targets": torch.tensor([0, 0, 0, 0, 1, 1])})
        >>> memory.class_counts()  # the two 1s took two of class 0's four slots
        {0: 2, 1: 2}
    """

    policy = "class_balanced"

    def __init__(
        self, capacity: int, *, seed: Optional[int] = None, label_field: str = "targets", defer: Optional[bool] = None
    ) -> None:
        if not isinstance(label_field, str) or not label_field:
            raise ValueError(f"label_field must be a non-empty str, got {label_field!r}")
        if defer is not None and not isinstance(defer, bool):
            raise ValueError(f"defer must be True, False or None, got {defer!r}")
        super().__init__(capacity, seed=seed)
        self.label_field = label_field
        self.defer = defer
        # The balancer's own stream (a jump ahead of the sampling generator's): sampling replay
        # minibatches, or when a deferred batch is applied, never changes which items stay.
        bits = self._rng.bit_generator
        assert isinstance(bits, np.random.PCG64)
        self._choice_rng = np.random.Generator(bits.jumped())
        self._uniforms: List[float] = []
        self._uniform_pos = 0
        self._slot_labels = np.zeros(capacity, dtype=np.int64)  # the class of each filled slot
        self._filled = 0
        self._slots_of: Dict[int, List[int]] = {}  # class -> its slots, ascending
        self._top = 0  # the largest class count
        self._at_top: List[int] = []  # the classes that have it, ascending
        # the pending batch of the deferred scheme: its size, staged items, and host labels (or a copy
        # of them under way into _pinned, complete when _event is)
        self._pending = 0
        self._stage: Dict[str, Tensor] = {}
        self._pending_labels: Optional[np.ndarray] = None
        self._pinned: Optional[Tensor] = None
        self._event: Optional[torch.cuda.Event] = None
        self.add_value("policy", str, equal=True)
        self.add_value("filled", int, attr="_filled")
        self.add_state(
            "slot_labels",
            dtype=torch.int64,
            shape=("filled",),
            host=True,
            get=lambda: torch.from_numpy(self._slot_labels[: self._filled].copy()),
            set=self._set_slot_labels,
        )
        self.add_generator("choice_rng_state", "_choice_rng")
        # The block of uniforms (none yet, or UNIFORM_BLOCK of them) and how many of them were used.
        self.add_value("uniform_pos", int, attr="_uniform_pos")
        self.add_checked(
            "uniforms", lambda: torch.tensor(self._uniforms, dtype=torch.float64), _check_uniforms, self._set_uniforms
        )
        self.add_checked("pending", self._pending_state, _check_pending, self._set_pending, optional=True)

    # ------------------------------------------------------------------ inspection
    def __len__(self) -> int:
        return self._filled

    @property
    def num_pending(self) -> int:
        """Items offered whose fate is not decided yet (the last batch, under the deferred scheme)."""
        return self._pending

    def class_counts(self) -> Dict[int, int]:
        """``{class: items held}``, ascending by class (pending items not included)."""
        return {label: len(self._slots_of[label]) for label in sorted(self._slots_of)}

    def slot_labels(self) -> np.ndarray:
        """The class of each stored row ``[0, len)``, as a host array (a copy)."""
        return self._slot_labels[: self._filled].copy()

    def __repr__(self) -> str:
        return (
            f"ClassBalancedBuffer(capacity={self.capacity}, len={len(self)}, num_seen={self.num_seen}, "
            f"classes={len(self._slots_of)}, pending={self._pending})"
        )

    # ------------------------------------------------------------------ validation
    def check_batch(self, items: Mapping[str, Tensor], partial: bool = False) -> int:
        batch = super().check_batch(items, partial)
        if not partial or self.label_field in items:
            self._labels_of(items)
        return batch

    def _labels_of(self, items: Mapping[str, Tensor]) -> Tensor:
        labels = items.get(self.label_field)
        if labels is None:
            raise ValueError(
                f"a class-balanced memory needs each item's class in field {self.label_field!r}, "
                f"but the batch holds {sorted(items)}"
            )
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
            raise ValueError(
                f"field {self.label_field!r} must be a 1-d integer tensor of class indices, got "
                + (
                    f"shape {tuple(labels.shape)} and dtype {labels.dtype}"
                    if isinstance(labels, Tensor)
                    else "no tensor"
                )
            )
        return labels

    # ------------------------------------------------------------------ mutation
    def add(self, items: Mapping[str, Tensor], *, validate: bool = True) -> None:
        """Offer a batch (``validate=False`` skips a check the caller already made; the label field is
        checked either way). Under the deferred scheme it enters at the next :meth:`add` or :meth:`flush`."""
        batch = self.check_batch(items) if validate else next(iter(items.values())).shape[0]
        labels = self._labels_of(items)
        if not self._storage:
            self._allocate(items)
        self.flush()
        if self.defer if self.defer is not None else labels.device.type == "cuda":
            self._stage_batch(items, labels.detach(), batch)
        else:
            self._insert(labels.detach().cpu().numpy(), items, clean=True)
        self.num_seen += batch

    def flush(self) -> None:
        """Apply the pending batch now (waiting for its labels' copy, if it is still under way)."""
        if self._pending:
            labels = self._resolve_pending_labels()
            self._insert(labels, {k: v[: self._pending] for k, v in self._stage.items()}, clean=False)
            self._pending, self._pending_labels = 0, None

    def _resolve_pending_labels(self) -> np.ndarray:
        if self._pending_labels is None:
            assert self._event is not None and self._pinned is not None
            self._event.synchronize()  # the copy was queued a step ago: this waits for that point only
            self._pending_labels = self._pinned[: self._pending].numpy().copy()
        return self._pending_labels

    def _stage_batch(self, items: Mapping[str, Tensor], labels: Tensor, batch: int) -> None:
        """Copy the batch (cleaned) into the staging rows and start the copy of its labels to the host."""
        stage_rows = next(iter(self._stage.values())).shape[0] if self._stage else 0
        if stage_rows < batch or self._stage.keys() != items.keys():
            self._stage = {
                k: torch.empty((batch, *v.shape[1:]), dtype=v.dtype, device=v.device) for k, v in items.items()
            }
        for name, value in items.items():
            target, value = self._stage[name][:batch], value.detach()
            if value.is_floating_point():
                torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0, out=target)
            else:
                target.copy_(value)
        if labels.device.type == "cuda":
            if self._pinned is None or len(self._pinned) < batch or self._pinned.dtype != labels.dtype:
                self._pinned = torch.empty(batch, dtype=labels.dtype, pin_memory=True)
            self._pinned[:batch].copy_(labels, non_blocking=True)
            if self._event is None:
                self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(labels.device))
            self._pending_labels = None
        else:
            self._pending_labels = labels.numpy().copy()
        self._pending = batch

    def _insert(self, labels: np.ndarray, source: Mapping[str, Tensor], clean: bool) -> None:
        """Decide where each row of ``source`` goes (by ``labels``, on the host) and write them."""
        slots, rows = self._plan(labels)
        if not slots:
            return
        count = len(rows)
        if rows == list(range(count)) and slots == list(range(slots[0], slots[0] + count)):  # filling: a slice
            for name, value in source.items():
                part = value.detach()[:count]
                self._storage[name][slots[0] : slots[0] + count] = self._clean(part) if clean else part
            return
        if self._host is not None:  # CPU storage: numpy indexing, as the reservoir does
            for name, value in source.items():
                self._write_host_rows(self._host[name], slots, value.detach().numpy(), rows)
            return
        assert self._device is not None
        both = indices_on(np.array(slots + rows), self._device)  # one host-to-device copy for both
        slot_index, row_index = both[:count], both[count:]
        for name, value in source.items():
            picked = value.detach().index_select(0, row_index)
            self._storage[name].index_copy_(0, slot_index, self._clean(picked) if clean else picked)

    def _plan(self, labels: np.ndarray) -> Tuple[List[int], List[int]]:
        """The greedy balancer over one batch, item by item (host integers only): ``(slots, rows)``,
        distinct slots and the row that ends up in each (a slot taken twice keeps the later row)."""
        slots: List[int] = []
        rows: List[int] = []
        evicted = False
        for row, label in enumerate(labels.tolist()):
            if self._filled < self.capacity:
                slot = self._filled
                self._filled += 1
            else:
                own = self._slots_of.get(label)
                if own is not None and len(own) >= self._top:
                    continue  # a largest class: discarded
                slot, evicted = self._evict(), True
            self._take(label, slot)
            slots.append(slot)
            rows.append(row)
        return last_wins(slots, rows) if evicted else (slots, rows)

    def _choice(self, n: int) -> int:
        """Uniform on ``range(n)``, from the balancer's block of uniforms."""
        if self._uniform_pos == len(self._uniforms):
            self._uniforms, self._uniform_pos = self._choice_rng.random(UNIFORM_BLOCK).tolist(), 0
        u = self._uniforms[self._uniform_pos]
        self._uniform_pos += 1
        return min(int(u * n), n - 1)

    def _evict(self) -> int:
        """Free a uniformly random slot of a largest class (itself uniform among the largest); return it."""
        at_top = self._at_top
        victim = at_top[self._choice(len(at_top))] if len(at_top) > 1 else at_top[0]
        own = self._slots_of[victim]
        slot = own.pop(self._choice(len(own)))
        at_top.remove(victim)
        if not own:
            del self._slots_of[victim]
        if not at_top:  # the last largest class shrank: the next level down is the largest now
            self._top -= 1
            self._at_top = [c for c in sorted(self._slots_of) if len(self._slots_of[c]) == self._top]
        return slot

    def _take(self, label: int, slot: int) -> None:
        own = self._slots_of.setdefault(label, [])
        insort(own, slot)
        self._slot_labels[slot] = label
        if len(own) > self._top:
            self._top, self._at_top = len(own), [label]
        elif len(own) == self._top:
            insort(self._at_top, label)

    def _index_classes(self) -> None:
        """Rebuild the per-class slot lists and the largest classes from ``_slot_labels``."""
        labels = self._slot_labels[: self._filled]
        self._slots_of = {int(c): np.flatnonzero(labels == c).tolist() for c in np.unique(labels)}
        self._top = max((len(s) for s in self._slots_of.values()), default=0)
        self._at_top = [c for c in sorted(self._slots_of) if len(self._slots_of[c]) == self._top]

    # ------------------------------------------------------------------ storage changes
    def add_field(self, name: str, fill: Tensor) -> None:
        super().add_field(name, fill)
        if self._stage and self._storage:  # the pending items get the field too
            rows = next(iter(self._stage.values())).shape[0]
            self._stage[name] = fill.to(self._storage[name].device).expand(rows, *fill.shape).clone()

    def widen(self, name: str, width: int) -> None:
        super().widen(name, width)
        if name in self._stage:
            self._stage[name] = _zero_pad(self._stage[name], width)

    def to(self, device: torch.device | str) -> ClassBalancedBuffer:
        device = torch.device(device)
        if self._pending:
            self._resolve_pending_labels()  # the copy must be read before the staging area moves
        super().to(device)
        self._stage = {k: v.to(device) for k, v in self._stage.items()}
        return self

    # ------------------------------------------------------------------ state
    def _pending_state(self) -> Optional[Dict[str, Any]]:
        """The pending batch (its labels are read, waiting for their copy if needed: not for the hot path)."""
        if not self._pending:
            return None
        labels = self._resolve_pending_labels()
        return {
            "labels": torch.from_numpy(labels.copy()),
            "items": {k: v[: self._pending].clone() for k, v in self._stage.items()},
        }

    def _set_slot_labels(self, labels: Tensor) -> None:
        self._slot_labels = np.zeros(self.capacity, dtype=np.int64)
        self._slot_labels[: len(labels)] = labels.numpy()

    def _set_uniforms(self, uniforms: Tensor) -> None:
        self._uniforms = uniforms.tolist()

    def _prepare_state(self, state: Any, device: Optional[torch.device], path: str = "state") -> Any:
        if isinstance(state, Mapping) and "uniform_pos" not in state and isinstance(state.get("uniforms"), Tensor):
            # The layout before declared state saved the unused uniforms only: the same as a block that
            # ends with them, used up to where they start.
            tail = state["uniforms"]
            if tail.dim() == 1 and len(tail) < UNIFORM_BLOCK:  # a used block: at least one was drawn
                block = torch.cat([tail.new_zeros(UNIFORM_BLOCK - len(tail)), tail])
                state = {**state, "uniforms": block, "uniform_pos": UNIFORM_BLOCK - len(tail)}
        return super()._prepare_state(state, device, path)

    def _set_pending(self, pending: Optional[Tuple[np.ndarray, Dict[str, Tensor]]]) -> None:
        self._pending, self._pending_labels, self._stage = 0, None, {}
        if pending is not None:
            self._pending_labels, self._stage = pending
            self._pending = len(self._pending_labels)

    def _after_load(self) -> None:
        super()._after_load()
        self._index_classes()


def _check_uniforms(value: Any, ctx: Any, path: str) -> Tensor:
    """A saved block of uniforms: none yet, or :data:`UNIFORM_BLOCK` of them."""
    uniforms = ctx.tensor(value, torch.float64, (None,), path, host=True)
    if len(uniforms) not in (0, UNIFORM_BLOCK):
        raise StateError(f"{path} holds {len(uniforms)} uniforms, expected 0 or {UNIFORM_BLOCK}")
    if ctx.ints["uniform_pos"] > len(uniforms):
        raise StateError(f"{path}: uniform_pos {ctx.ints['uniform_pos']} is past the block's {len(uniforms)}")
    return uniforms


def _check_pending(value: Any, ctx: Any, path: str) -> Tuple[np.ndarray, Dict[str, Tensor]]:
    """A saved pending batch: ``{'labels': (p,) int64, 'items': {name: (p, ...)}}``."""
    if not isinstance(value, Mapping) or set(value) != {"labels", "items"} or not isinstance(value["items"], Mapping):
        raise StateError(f"{path} must be a dict with 'labels' and a dict of 'items'")
    labels = ctx.tensor(value["labels"], torch.int64, ("pending",), f"{path}['labels']", host=True)
    items = {k: ctx.tensor(v, None, ("pending", ...), f"{path}['items'][{k!r}]") for k, v in value["items"].items()}
    return labels.numpy(), items
