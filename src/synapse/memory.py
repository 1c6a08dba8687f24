"""Memory policies: which items a rehearsal memory keeps.

Every policy is a :class:`~synapse.buffer.Buffer`: named tensors in ``capacity`` rows preallocated on the
data's device, sampled uniformly without replacement, with an exact state dict. They differ in what
stays:

* ``'reservoir'`` (:class:`~synapse.buffer.ReservoirBuffer`): a uniform sample of the stream;
* ``'class_balanced'`` (:class:`ClassBalancedBuffer`): GDumb's greedy class balancer, every class an
  equal share;
* ``'herding'`` (:class:`HerdingMemory`): iCaRL's exemplars, chosen at task ends so that their mean
  feature follows the class mean.

A method picks one by name: ``BufferedSynapse(..., buffer_policy='class_balanced')`` builds it with
:func:`make_buffer`, and ``ER(model, ..., buffer_policy='class_balanced')`` passes it on.
"""

from __future__ import annotations

from bisect import insort
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ._model import FeaturesFn, head_input_features
from ._state import StateError, int_list
from ._validation import check_targets_and_inputs
from .buffer import Buffer, ReservoirBuffer, _zero_pad, indices_on
from .functional import herding_selection, last_wins

__all__ = [
    "BUFFER_POLICIES",
    "STREAM_POLICIES",
    "ClassBalancedBuffer",
    "HerdingMemory",
    "head_input_features",
    "make_buffer",
]

STREAM_POLICIES = ("reservoir", "class_balanced")  # filled by add() at every step
BUFFER_POLICIES = (*STREAM_POLICIES, "herding")  # herding is filled at task ends only
# Uniforms for the class balancer's random choices are drawn this many at a time.
UNIFORM_BLOCK = 1024


def make_buffer(policy: str, capacity: int, seed: Optional[int] = None, **options: Any) -> Buffer:
    """The memory of policy ``'reservoir'``, ``'class_balanced'`` or ``'herding'`` (see the module
    docstring), with ``capacity`` items and its own generator seeded by ``seed``; ``options`` go to the
    class (e.g. ``label_field`` or ``defer`` for the class-balanced one)."""
    classes = {"reservoir": ReservoirBuffer, "class_balanced": ClassBalancedBuffer, "herding": HerdingMemory}
    if policy not in classes:
        raise ValueError(f"buffer_policy must be one of {BUFFER_POLICIES}, got {policy!r}")
    return classes[policy](capacity, seed=seed, **options)


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


class HerdingMemory(Buffer):
    """iCaRL's exemplar memory (Rebuffi et al. 2017, *iCaRL: Incremental Classifier and Representation
    Learning*, Algorithms 4 and 5), filled at task ends from the task's data.

    :meth:`select_task` takes the finished task's data (the batches ``end_task(data)`` receives) and a
    feature extractor. With ``t`` the classes held afterwards, every class gets ``m = capacity // t``
    exemplars (the paper's ``m = K / t``, rounded down):

    * each class of the task gets the first ``min(m, n_c)`` of its ``n_c`` items in herding order
      (:func:`~synapse.functional.herding_selection` on its L2-normalised features: the running mean of
      the chosen features best approximates the class mean);
    * each class already held keeps the first ``m`` of its exemplars (Algorithm 5, "ReduceExemplarSet":
      herding order makes a prefix the best smaller set).

    A class that appears again in a later task is selected afresh from that task's items, and its old
    exemplars are dropped (the paper's classes never recur). Rows ``[0, len)`` hold the classes one
    after the other, each in herding order (:meth:`class_ranges`); fields are ``'input:<name>'`` for each
    model input and ``'targets'``, as :class:`~synapse._base.BufferedSynapse` stores them, so replay
    sampling (:meth:`sample`) and ``BufferedSynapse._inputs_of`` work unchanged. There is no per-step
    :meth:`add`.

    **The feature extractor** is "the model minus its head": any ``features_fn(inputs) -> (batch, d)``
    taking the batch's inputs as a dict named like ``model.forward``'s keywords, e.g.
    ``lambda inputs: model.backbone(inputs["x"])``, or :func:`head_input_features` ``(model, "fc")``,
    which runs the whole model and takes what enters its head (named by attribute path or as the
    module). It is called under ``torch.no_grad()``; put the model in eval mode first if its layers
    should (iCaRL computes features with the network as trained so far).

    Args:
        capacity: the memory budget ``K`` (items over all classes).
        seed: seed of the replay sampling generator; by default drawn from torch's global RNG.
        normalize: L2-normalise features before herding (the paper's ``phi``).

    Example:
        >>> memory = HerdingMemory(100)
        >>> x, y = torch.randn(200, 8), torch.arange(200) % 2  # a finished task: classes 0 and 1
        >>> task_batches = [(y, {"inputs": x})]                 # as end_task(data) receives it
        >>> memory.select_task(task_batches, head_input_features(model, "fc"))  # at the task end
        >>> memory.exemplars_per_class, memory.class_ranges()
        (50, {0: (0, 50), 1: (50, 100)})
        >>> replay = memory.sample(32)           # {"input:inputs": ..., "targets": ...}
    """

    policy = "herding"

    def __init__(self, capacity: int, *, seed: Optional[int] = None, normalize: bool = True) -> None:
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be a bool, got {normalize!r}")
        super().__init__(capacity, seed=seed)
        self.normalize = normalize
        self._classes: List[int] = []  # in row order
        self._sizes: List[int] = []
        self._m = capacity
        self.add_value("policy", str, equal=True)
        self.add_value("classes", list, attr="_classes", convert=int_list)
        self.add_value("sizes", list, attr="_sizes", convert=int_list)
        self.add_value("m", int, attr="_m")

    # ------------------------------------------------------------------ inspection
    def __len__(self) -> int:
        return sum(self._sizes)

    @property
    def classes(self) -> Tuple[int, ...]:
        """The classes held, in row order."""
        return tuple(self._classes)

    @property
    def exemplars_per_class(self) -> int:
        """``m``: the exemplars each class may hold now (``capacity`` before the first task)."""
        return self._m

    def class_ranges(self) -> Dict[int, Tuple[int, int]]:
        """``{class: (start, stop)}``: the rows of each class's exemplars, in herding order."""
        starts = np.cumsum([0, *self._sizes]).tolist()
        return {c: (starts[i], starts[i + 1]) for i, c in enumerate(self._classes)}

    def class_items(self, label: int, names: Optional[Iterable[str]] = None) -> Dict[str, Tensor]:
        """The exemplars of class ``label``, in herding order (views of the storage: do not write to them)."""
        ranges = self.class_ranges()
        if label not in ranges:
            raise KeyError(f"class {label} is not in memory; held: {self.classes}")
        start, stop = ranges[label]
        return {k: self._storage[k][start:stop] for k in (self._storage if names is None else names)}

    def __repr__(self) -> str:
        return f"HerdingMemory(capacity={self.capacity}, classes={len(self._classes)}, m={self._m}, len={len(self)})"

    def _population_fixed(self, n: int) -> bool:
        return True  # the population changes only at select_task, which drops the pre-drawn indices

    # ------------------------------------------------------------------ mutation
    def add(self, items: Mapping[str, Tensor], *, validate: bool = True) -> None:
        raise TypeError(
            "a herding memory is filled at task ends, not per step: call select_task(data, features_fn) "
            "with the finished task's (targets, {name: inputs}) batches"
        )

    @torch.no_grad()
    def select_task(self, data: Iterable[Tuple[Tensor, Mapping[str, Tensor]]], features_fn: FeaturesFn) -> None:
        """Choose the exemplars of the task's classes by herding and cut the others to the new share.

        Args:
            data: the finished task's batches ``(targets, {name: inputs})`` (what ``end_task`` receives),
                read once. Their items are held until the selection is done.
            features_fn: ``features_fn(inputs) -> (batch, d)`` features of a batch's inputs (see the
                class docstring).

        Everything is checked before the memory changes; a task without data changes nothing.
        """
        if not callable(features_fn):
            raise TypeError(f"features_fn must be callable, got {type(features_fn).__name__}")
        batches: List[Dict[str, Tensor]] = []
        features: List[Tensor] = []
        for item in data:
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], Mapping)):
                raise TypeError(f"each batch must be (targets, {{name: inputs}}), got {type(item).__name__}")
            targets, inputs = item[0], dict(item[1])
            batch = check_targets_and_inputs(targets, inputs)
            items = {f"input:{k}": v.detach() for k, v in inputs.items()}
            items["targets"] = targets.detach()
            self.check_layout(items)
            if batches and items.keys() != batches[0].keys():
                raise ValueError(f"batch fields {sorted(items)} differ from the first batch's {sorted(batches[0])}")
            feats = features_fn(inputs)
            if not isinstance(feats, Tensor) or feats.dim() != 2 or feats.shape[0] != batch:
                got = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
                raise ValueError(f"features_fn must return a (batch, d) tensor with batch={batch}, got {got}")
            if features and feats.shape[1] != features[0].shape[1]:
                raise ValueError(f"features_fn returned {feats.shape[1]} features, earlier {features[0].shape[1]}")
            batches.append(items)
            features.append(feats.detach())
        if not batches:
            return
        task = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        phi = torch.cat(features)
        if not bool(torch.isfinite(phi).all()):  # a task-end check: reading it is fine here
            raise ValueError("features_fn returned non-finite features; herding needs finite ones")
        labels = task["targets"].cpu().numpy()
        new_classes = np.unique(labels).tolist()
        kept = [(c, s) for c, s in zip(self._classes, self._sizes) if c not in new_classes]
        m = self.capacity // (len(kept) + len(new_classes))
        if m == 0:
            raise ValueError(
                f"a herding memory of capacity {self.capacity} cannot hold {len(kept) + len(new_classes)} classes: "
                "each needs at least one exemplar"
            )
        # Rows of the new layout: kept classes' first m exemplars, then each new class's herding choice.
        old_start = dict(zip(self._classes, np.cumsum([0, *self._sizes]).tolist()))
        old_rows = [np.arange(old_start[c], old_start[c] + min(s, m)) for c, s in kept]
        new_rows = []
        for c in new_classes:
            members = np.flatnonzero(labels == c)
            order = herding_selection(phi[torch.from_numpy(members).to(phi.device)], m, normalize=self.normalize)
            new_rows.append(members[order.cpu().numpy()])
        # Apply: gather every kept row before writing any (rows move down), then the new ones.
        if not self._storage:
            self._allocate(task)
        device = self._device
        assert device is not None
        keep = np.concatenate(old_rows) if old_rows else np.zeros(0, dtype=np.int64)
        pick = torch.from_numpy(np.concatenate(new_rows).astype(np.int64))
        for name, stored in self._storage.items():
            moved = stored.index_select(0, indices_on(keep, device))
            chosen = self._clean(task[name].index_select(0, pick.to(task[name].device))).to(device)
            stored[: len(keep) + len(pick)] = torch.cat([moved, chosen])
        self._classes = [c for c, _ in kept] + new_classes
        self._sizes = [len(r) for r in old_rows] + [len(r) for r in new_rows]
        self._m = m
        self.num_seen += len(labels)
        self._set_block(None)  # the population changed: pre-drawn replay indices are stale
