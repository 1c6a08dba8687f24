"""X-DER: eXtended Dark Experience Replay, in its authors' SimCLR-free form."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .._base import CURRENT_LOSS, TaskBatch
from .._capture import Replay
from .._device import to_device
from .._draw_ahead import DrawAhead
from .._floor import Floor
from .._state import width_of
from .._validation import check_non_empty, check_non_negative
from ..augment import Transform
from ..buffer import fresh_seed
from ..catalog import HParam, MethodSpec, register
from ..functional import (
    asymmetric_cross_entropy,
    head_margin_constraint,
    logit_distillation_grad,
    xder_update_logits,
)
from .er import DERpp

__all__ = ["XDER"]

SLOTS = "slots"  # the buffer slots a replay sample came from (not a stored field)
REVISIONS = ("2022", "2024")  # mammoth's xder_ce before and from commit b558503 (December 2024)


class XDER(DERpp):
    """X-DER, from Boschini et al. 2022, "Class-Incremental Continual Learning into the eXtended
    DER-verse" (TPAMI), in the SimCLR-free form its authors ship as ``xder_ce`` in ``aimagelab/mammoth``.

    DER++ whose memory keeps learning: the logits stored with past items are rewritten with what the
    model later learns about them (:func:`~synapse.functional.xder_update_logits`), items are stored at
    the end of their task (``end_task(data)`` is needed) in a class-balanced share of the memory, and two
    margin constraints (:func:`~synapse.functional.head_margin_constraint`) keep the heads of past,
    present and future classes in order. Heads come from the data: a class belongs to the task in which
    it first appears. The model must output every class's logit from the start, at a fixed width. With
    ``current_loss='method'`` the loss passed to :meth:`backward` is checked, then replaced by the
    incoming batch's masked cross-entropy. ``revision`` picks mammoth's ``xder_ce`` before (``'2022'``,
    the default) or from (``'2024'``, the Seq-MNIST preset's) its December 2024 rewrite. The variant, the
    equations, the memory, the revisions and the defaults' source: docs/methods/rehearsal.md, "X-DER in
    detail".

    Deviations from the authors' code (each explained in the method page):

    * Heads come from the data: a current-task class counts as future until its first batch.
    * Replay is augmented only with ``replay_transform``; the task-end update forwards items as stored.
    * With ``fused=True`` both minibatches ride in the user's forward (BatchNorm sees them together).
    * The task-end update forwards the memory in slot order, in chunks of ``data``'s first batch's size.
    * Non-finite updated logits are stored as 0.
    * Distributed: each rank keeps its own memory and tells heads from its own batches.

    Args:
        model: the model being trained (may be wrapped in DDP or ``torch.compile``); it returns a
            ``(batch, classes)`` logits tensor with every class's column from the start.
        buffer_size: items kept in memory (per rank in a distributed run).
        buffer_sample_size: items per replay minibatch.
        alpha: weight of the logit matching on all heads.
        beta: weight of the cross-entropy on past heads.
        gamma: the memory update's rescaling factor, in ``(0, 1]``.
        eta: weight of both head constraints.
        m: their margin.
        revision: ``'2022'`` or ``'2024'``: which of mammoth's two ``xder_ce`` codes to follow (see the method
            page).
        current_loss: ``'method'`` (the masked present-head cross-entropy replaces the loss passed to
            ``backward``, which is checked but not backpropagated) or ``'user'`` (keep the user's loss).
        fused: replay inside the user's forward (see :class:`~synapse.rehearsal.ER`).
        buffer_scope: ``'rank'`` or ``'global'`` (see :class:`~synapse.rehearsal.ER`).
        scaler: a ``torch.amp.GradScaler`` for mixed precision; pass the unscaled loss to ``backward``.
        replay_transform: augments every replayed minibatch on the device, as in :class:`~synapse.rehearsal.ER`
            (default None: replay what was stored).

    Example:
        >>> from synapse import named_batches
        >>> synapse = XDER(model, buffer_size=500, buffer_sample_size=32)
        >>> for task in tasks:
        ...     for inputs, targets in task:
        ...         optimizer.zero_grad()
        ...         loss = criterion(model(inputs), targets)  # checked, then replaced (current_loss='method')
        ...         synapse.backward(loss, targets, inputs=inputs)
        ...         optimizer.step()
        ...     synapse.end_task(named_batches(task))  # stores the task's items, rewrites the past
    """

    needs_task_boundaries = True
    needs_task_data = True
    reads_logits = True  # stores and matches logits

    def __init__(
        self,
        model: nn.Module,
        buffer_size: int = 1024,
        buffer_sample_size: int = 32,
        alpha: float = 0.3,
        beta: float = 0.5,
        gamma: float = 0.85,
        eta: float = 5e-3,
        m: float = 0.3,
        *,
        revision: str = "2022",
        current_loss: str = "method",
        fused: bool = True,
        buffer_scope: str = "rank",
        scaler: Optional[torch.amp.GradScaler] = None,
        replay_transform: Optional[Transform] = None,
    ) -> None:
        if revision not in REVISIONS:
            raise ValueError(f"revision must be one of {REVISIONS}, got {revision!r}")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
            raise ValueError(f"gamma must be a number in (0, 1], got {gamma!r}")
        check_non_negative("eta", eta)
        check_non_negative("m", m)
        current_loss = self._check_current_loss(current_loss)
        super().__init__(
            model,
            buffer_size,
            buffer_sample_size,
            alpha,
            beta,
            method="der++",
            fused=fused,
            buffer_scope=buffer_scope,
            scaler=scaler,
            replay_transform=replay_transform,
        )
        self.gamma = float(gamma)
        self.eta = float(eta)
        self.m = float(m)
        self.current_loss = current_loss
        self.revision = revision
        # The update draws and quota ties; the update's draws are made ahead (see DrawAhead), behind _rng.
        self._rng = np.random.Generator(np.random.PCG64(fresh_seed()))
        self._class_task: Optional[Tensor] = None  # (classes,) long: the task each class was first seen in, -1
        self._has_past = False  # some class was seen before the current task (host-known: set by end_task)
        self._update_count = torch.zeros(self.buffer.capacity, device=self.device)  # per slot, this task
        self._pending: Optional[Tuple[Any, ...]] = None  # this step's state, applied once the step succeeded
        self.add_value("num_classes", int, optional=True, get=self._num_classes, derived=True)
        self.add_state("class_task", dtype=torch.long, shape=("num_classes",), optional=True, attr="_class_task")
        self.add_value("has_past", bool, attr="_has_past")
        capacity = self.buffer.capacity
        self.add_state("update_count", dtype=torch.float32, shape=(capacity,), attr="_update_count")
        self.add_generator("xder_rng", "_rng")

    @property
    def _rng(self) -> np.random.Generator:
        """The generator in the state that drawing step by step would have left it."""
        return self._draws_ahead.generator()

    @_rng.setter
    def _rng(self, rng: np.random.Generator) -> None:
        self._draws_ahead: DrawAhead[Tensor] = DrawAhead(rng)

    # ------------------------------------------------------------------ heads
    def _heads(self, class_task: Tensor) -> Tuple[Tensor, Tensor]:
        """``(past, future)`` bool masks over the classes, for the current task."""
        return (class_task >= 0) & (class_task < self.num_tasks_ended), class_task < 0

    def _class_task_with(self, targets: Tensor, width: int, device: torch.device) -> Tensor:
        """The class-to-task map once this batch's classes are seen (a new tensor; no host sync)."""
        known = self._class_task
        known = torch.full((width,), -1, dtype=torch.long, device=device) if known is None else known.to(device)
        return torch.where(known >= 0, known, known.index_fill(0, targets, self.num_tasks_ended))

    # ------------------------------------------------------------------ backward
    def _check(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        check_non_empty("X-DER", targets)
        logits = self._forward.checked_outputs("X-DER", targets.shape[0])
        if targets.device != logits.device:
            raise ValueError(f"targets are on {targets.device} but the model's outputs on {logits.device}")
        if self._class_task is not None and logits.shape[1] != self._class_task.shape[0]:
            raise ValueError(
                f"the model now outputs {logits.shape[1]} logits but earlier steps had {self._class_task.shape[0]}: "
                "X-DER needs every class's logit from the start (the future heads), at a fixed width"
            )
        super()._check(loss, targets, model_inputs)

    def _sample(self, num_minibatches: int = 1, names: Optional[Sequence[str]] = None) -> Dict[str, Tensor]:
        # ER's sample (the same draws), plus the slots it came from: the memory update writes back there.
        self._follow_model_device()
        slots = self.buffer.sample_indices(self.buffer_sample_size, num_minibatches).reshape(-1)
        sample = self._augment_replay(self.buffer.gather(slots, names))
        sample[SLOTS] = slots
        return self._replaying(sample)

    def _replays(self) -> bool:
        """Whether this step replays: from the first task end in revision 2024 (no first-task reservoir)."""
        return len(self.buffer) > 0 and (self._has_past or self.revision == "2022")

    def _fused_replay(self) -> Optional[Replay]:
        return super()._fused_replay() if self._replays() else None

    def _backward(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        out = self._forward.outputs
        assert out is not None  # checked by _check
        labels = targets.long()
        class_task = self._class_task_with(labels, out.shape[1], out.device)
        past, future = self._heads(class_task)
        present = class_task == self.num_tasks_ended
        current = loss
        if self.current_loss == "method":  # the batch's own classes stay in, should one return from the past
            heads = ~past if self.revision == "2022" else present  # 2024: the future heads leave the softmax
            current = asymmetric_cross_entropy(out, labels, heads.index_fill(0, labels, True))
        terms: List[Tuple[float, Tensor]] = []
        seeded: List[Tuple[Tensor, Tensor]] = []
        rows, row_labels, row_weights = [out], [labels], [torch.ones_like(labels, dtype=torch.bool)]
        update = None
        replay = None
        if self._replays():
            replay = self._forward.replay if self.fused else self._separate_replay_forward()
        if replay is not None and replay.outputs is not None:
            (out1, out2), sample, part = replay.outputs, replay.sample, replay.part
            stored_labels = sample["targets"].long()
            if self.alpha:
                seeded.append((out1, logit_distillation_grad(out1, part(sample["logits"], 0), None, self.alpha)))
            if self.beta:
                columns = past if self._has_past else class_task >= 0
                terms.append((self.beta, asymmetric_cross_entropy(out2, part(stored_labels, 1), columns)))
            first = _first_occurrence(sample[SLOTS])
            distinct = first == torch.arange(first.shape[0], device=first.device)
            rows += [out1, out2]
            row_labels.append(stored_labels)
            row_weights.append(distinct)
            if self._has_past:
                update = self._memory_update(replay, stored_labels, past, first, distinct)
        if self.eta:
            scores = torch.cat(rows).float()
            own = class_task[torch.cat(row_labels)]
            good = class_task.unsqueeze(0) == own.unsqueeze(1)  # each row's own task's head
            terms.append((self.eta, head_margin_constraint(scores, good, future, self.m, torch.cat(row_weights))))
            if self._has_past and self.revision == "2022":  # 2024 dropped the past constraint
                probs = torch.softmax(out.float().masked_fill(~(past | present), float("-inf")), 1)
                in_present = present[labels]  # a returning past class has no present head to favour
                terms.append((self.eta, head_margin_constraint(probs, present, past, self.m, in_present, True)))
        self._run_backward(current, terms, seeded)
        self._store(targets, model_inputs)
        self._pending = (class_task, update)
        self._commit_step()
        self._forward.clear()

    def _memory_update(
        self, replay: Replay, labels: Tensor, past: Tensor, first: Tensor, distinct: Tensor
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """This step's rewrite of replayed past items (computed now, written by :meth:`_commit_step`, which
        also consumes the draws): ``(counts, slots, rows)``, ``rows`` the logits to write at ``slots``."""
        assert replay.outputs is not None
        slots, stored = replay.sample[SLOTS], replay.sample["logits"]
        chosen = past[labels] & distinct
        counts = self._update_count.to(slots.device).index_add(0, slots, chosen.float())
        n, device = slots.shape[0], slots.device
        draws = self._draws_ahead.peek(("update", n, device), _float32_uniforms(n, device))
        chosen = chosen & (draws * counts[slots] < 1)  # probability 1/n for the n-th time an item is drawn
        with torch.no_grad():
            responses = torch.cat(replay.outputs).detach()
            rewritten = xder_update_logits(stored, responses, labels, ~past, self.gamma)
            # A slot drawn twice takes its first occurrence's row, so that both writes agree.
            rows = torch.where(chosen.unsqueeze(1), rewritten, stored)[first]
        return counts, slots, rows

    def _commit_step(self) -> None:
        if self._pending is None:
            return
        self._class_task, update = self._pending
        self._pending = None
        if update is not None:
            counts, slots, rows = update
            self._update_count = counts
            self._write_logits(slots, rows)
            self._draws_ahead.consume()

    def _store(self, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        if not self._has_past:  # a reservoir until the first task end (mammoth's xder_ce)
            super()._store(targets, model_inputs)
            return
        self._input_names = tuple(model_inputs)
        if self._capture is not None:
            self._capture.input_names = self._input_names

    def _write_logits(self, slots: Tensor, rows: Tensor) -> None:
        """Overwrite the stored logits at ``slots`` (non-finite values as 0, the memory's rule)."""
        # The memory has no public row write; its storage dict is the one place its tensors live.
        storage = self.buffer._storage["logits"]
        storage.index_copy_(0, slots.to(storage.device), torch.nan_to_num(rows, 0.0, 0.0, 0.0).to(storage.dtype))

    # ------------------------------------------------------------------ task end
    def _end_task(self, data: Optional[Iterable[TaskBatch]]) -> None:
        assert data is not None  # needs_task_data: checked by end_task
        task = self.num_tasks_ended
        class_task = self._class_task
        if class_task is None or not self.buffer.schema():  # nothing was learned or stored yet
            self._update_count = torch.zeros_like(self._update_count)
            return
        self._follow_model_device()
        past, _ = self._heads(class_task)
        owner = class_task.tolist()  # task-end work may sync with the host
        seen = [c for c, t in enumerate(owner) if t >= 0]
        present = [c for c, t in enumerate(owner) if t == task]
        rng = _copy_rng(self._rng)
        # (1) what stays: nothing at the first task end, later the first floor(K / |seen|) items of each class.
        n = len(self.buffer)
        held = self.buffer.gather(torch.arange(n, device=self.buffer.device))
        keep: List[int] = []
        if self._has_past:
            per_class = self.buffer.capacity // len(seen)
            by_class: Dict[int, List[int]] = {}
            for slot, label in enumerate(held["targets"].tolist()):
                by_class.setdefault(label, []).append(slot)
            keep = [slot for label in sorted(by_class) for slot in by_class[label][:per_class]]
        parts = [{k: v[torch.tensor(keep, dtype=torch.long, device=v.device)] for k, v in held.items()}]
        # (2) the task's items, in equal quotas per present class.
        free = self.buffer.capacity - len(keep)
        quota: Dict[int, int] = {}
        if present:
            quota = {c: free // len(present) for c in present}
            for i in rng.permutation(len(present))[: free - (free // len(present)) * len(present)]:
                quota[present[int(i)]] += 1
        with self._task_end_forwards():
            fresh, chunk = self._task_items(data, quota, past)
            parts += fresh
            storage = {k: torch.cat([p[k] for p in parts]) for k in held}
            # (3) the future past: today's responses on the just-learned head of past items.
            labels = storage["targets"].long()
            if bool(past[labels].any()):
                responses = torch.cat(
                    [
                        self._logits_of(self._inputs_of({k: v[rows] for k, v in storage.items()}))
                        for rows in _chunks(labels.shape[0], chunk)
                    ]
                )
                # 2022: the just-learned heads only; 2024: the present and future heads, as during training.
                learned = class_task == task if self.revision == "2022" else ~past
                rewritten = xder_update_logits(storage["logits"], responses, labels, learned, self.gamma)
                storage["logits"] = torch.where(past[labels].unsqueeze(1), rewritten, storage["logits"])
        storage["logits"] = torch.nan_to_num(storage["logits"], 0.0, 0.0, 0.0)
        # (4) commit: the memory's new contents (its generator and counters carry on), fresh counts.
        self._refill(storage)
        self._rng = rng
        self._update_count = torch.zeros_like(self._update_count)
        self._has_past = len(seen) > 0

    def _task_items(
        self, data: Iterable[TaskBatch], quota: Dict[int, int], past: Tensor
    ) -> Tuple[List[Dict[str, Tensor]], int]:
        """The task's first items of each class up to its quota, with their logits ``U(o, o, y, P)``;
        and the size of ``data``'s first batch (the chunk size of the task-end forwards)."""
        parts: List[Dict[str, Tensor]] = []
        chunk = 0
        remaining = dict(quota)
        schema = self.buffer.schema()
        for targets, inputs in self._iter_task_data(data):
            if self._input_names is not None and tuple(inputs) != self._input_names:
                raise ValueError(
                    f"end_task(data) inputs {tuple(inputs)} differ from those of training steps {self._input_names}"
                )
            items = {f"input:{k}": v for k, v in inputs.items()}
            self.buffer.check_layout(items, partial=True)
            chunk = chunk or targets.shape[0]
            if not any(remaining.values()):
                break
            if targets.shape[0] == 0:
                continue
            items = {k: v.to(self.device) for k, v in items.items()}
            labels = targets.to(self.device).long()
            logits = self._logits_of(self._inputs_of(items))
            logits = xder_update_logits(logits, logits, labels, past, self.gamma)
            take = []
            for row, label in enumerate(labels.tolist()):
                if remaining.get(label, 0) > 0:
                    remaining[label] -= 1
                    take.append(row)
            if take:
                rows = torch.tensor(take, dtype=torch.long, device=self.device)
                items["targets"] = labels.to(schema["targets"][1])
                items["logits"] = logits.to(schema["logits"][1])
                parts.append({k: v.index_select(0, rows).to(self.buffer.device) for k, v in items.items()})
        return parts, chunk or self.buffer_sample_size

    def _logits_of(self, inputs: Mapping[str, Tensor]) -> Tensor:
        out = self.module(**inputs)
        width = self._class_task.shape[0] if self._class_task is not None else None
        if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[1] != width:
            got = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"X-DER's task-end pass needs (batch, {width}) logits from the model, got {got}")
        return out

    @contextlib.contextmanager
    def _task_end_forwards(self) -> Iterator[None]:
        """Forwards as the authors' task-end passes: train mode, BatchNorm on batch statistics without
        touching its running statistics, no grad, invisible to the capture; every flag restored after."""
        modes = [(module, module.training) for module in self.module.modules()]
        norms = [m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        tracking = [m.track_running_stats for m in norms]
        self.module.train()
        for m in norms:
            m.track_running_stats = False
        try:
            with torch.no_grad(), self._forward.paused():
                yield
        finally:
            for module, training in modes:
                module.training = training
            for m, track in zip(norms, tracking):
                m.track_running_stats = track

    def _refill(self, storage: Mapping[str, Tensor]) -> None:
        """Make ``storage`` (at most ``capacity`` rows per field) the memory's contents, keeping its RNG."""
        state = self.buffer.state_dict()
        count = next(iter(storage.values())).shape[0]
        full = {}
        for name, rows in storage.items():
            full[name] = rows.new_zeros((self.buffer.capacity, *rows.shape[1:]))
            full[name][:count] = rows
        state.update(storage=full, num_seen=count)  # no reservoir insertion follows: its draws lie idle
        self.buffer.load_state_dict(state, device=self.device)

    # ------------------------------------------------------------------ state
    def _num_classes(self) -> Optional[int]:
        return None if self._class_task is None else len(self._class_task)

    def _upgrade_state(self, state: Dict[str, Any]) -> Dict[str, Any]:
        return width_of(state, "class_task")


def _first_occurrence(slots: Tensor) -> Tensor:
    """For each entry, the position of the first entry with the same value (no host sync)."""
    same = slots.unsqueeze(0) == slots.unsqueeze(1)
    return same.to(torch.uint8).argmax(1)  # argmax returns the first maximal position


def _chunks(n: int, size: int) -> List[slice]:
    """``n`` rows in chunks of ``size``; a last chunk of one row joins the one before (train-mode BatchNorm
    cannot normalise a single row)."""
    starts = list(range(0, n, size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [n])]


def _float32_uniforms(n: int, device: torch.device) -> Callable[[np.random.Generator, int], Tuple[Tensor, ...]]:
    """A :class:`DrawAhead` draw: each step's ``rng.random(n)`` as float32 on ``device``, in one call."""

    def draw(rng: np.random.Generator, steps: int) -> Tuple[Tensor, ...]:
        drawn = torch.from_numpy(rng.random(steps * n).astype(np.float32))
        return to_device(drawn, device).view(steps, n).unbind(0)

    return draw


def _copy_rng(rng: np.random.Generator) -> np.random.Generator:
    """An independent copy, to draw from before a step is known to succeed."""
    copy = np.random.Generator(np.random.PCG64())
    copy.bit_generator.state = rng.bit_generator.state
    return copy


_PAPER = "Boschini et al. 2022, *Class-Incremental Continual Learning into the eXtended DER-verse*"


class _XDERFloor(Floor):
    """X-DER's floor, the step after two task ends (revision 2022): the incoming batch's cross-entropy without
    the past heads (in place of the user's loss), DER's seeded logit matching on one replayed minibatch,
    ``beta`` cross-entropy on the past heads of a second, the future constraint over all rows (a slot drawn
    twice counted once) and the past constraint over the incoming rows, in one backward; then the memory
    update: each replayed past item's count, the ``1/n`` draw (drawn in advance, as the indices), the
    rewritten logits, written back at its slot."""

    fused = 2

    def __init__(
        self, model: nn.Module, buffer_size: int, minibatch: int, item: Tuple[int, ...], hparams: Mapping[str, Any]
    ) -> None:
        super().__init__(model, buffer_size, minibatch, item, hparams)
        device = self.one.device
        self.counts = torch.zeros(buffer_size, device=device)  # times each slot was chosen for an update
        g = torch.Generator().manual_seed(2)
        self.uniforms = torch.rand(len(self.blocks), self.rows(), generator=g).to(device).unbind(0)
        self.incoming: Dict[int, Tensor] = {}  # a row of True per batch size, made once

    def backward(self, loss: Tensor, targets: Tensor, inputs: Tensor, logits: Tensor) -> None:
        classes = torch.arange(logits.shape[1], device=logits.device)
        class_task = classes // 2  # tasks of two classes; tasks 0 and 1 are past, 2 present
        past, present, future = class_task < 2, class_task == 2, class_task > 2
        stored_labels, stored = self.y.index_select(0, self.idx), self.z.index_select(0, self.idx)
        current = asymmetric_cross_entropy(logits, targets, (~past).index_fill(0, targets, True))
        replay_ce = asymmetric_cross_entropy(self.replayed[1], stored_labels[self.k :], past)
        seed = logit_distillation_grad(self.replayed[0], stored[: self.k], weight=self.hp["alpha"])
        earliest = _first_occurrence(self.idx)
        distinct = earliest == torch.arange(earliest.shape[0], device=earliest.device)
        rows = torch.cat([logits, *self.replayed]).float()
        labels = torch.cat([targets, stored_labels])
        good = class_task.unsqueeze(0) == class_task[labels].unsqueeze(1)
        n = targets.shape[0]
        if n not in self.incoming:
            self.incoming[n] = torch.ones(n, dtype=torch.bool, device=targets.device)
        weights = torch.cat([self.incoming[n], distinct])
        m = float(self.hp["m"])
        future_constraint = head_margin_constraint(rows, good, future, m, weights)
        probs = torch.softmax(logits.float().masked_fill(~(past | present), float("-inf")), 1)
        past_constraint = head_margin_constraint(probs, present, past, m, present[targets], True)
        roots = (current, replay_ce, future_constraint, past_constraint, self.replayed[0])
        eta = self.weight("eta")
        self.run_backward(roots, (self.one, self.weight("beta"), eta, eta, seed))
        with torch.no_grad():
            chosen = past[stored_labels] & distinct
            self.counts.index_add_(0, self.idx, chosen.float())
            chosen &= self.uniforms[(self.step - 1) % len(self.uniforms)] * self.counts[self.idx] < 1
            responses = torch.cat(self.replayed)
            rewritten = xder_update_logits(stored, responses, stored_labels, ~past, float(self.hp["gamma"]))
            written = torch.where(chosen.unsqueeze(1), rewritten, stored)[earliest]
            self.z.index_copy_(0, self.idx, torch.nan_to_num(written, 0.0, 0.0, 0.0))


register(
    MethodSpec(
        "xder",
        XDER,
        family="rehearsal",
        display="X-DER",
        order=12,
        floor=_XDERFloor,
        paper=_PAPER,
        summary="DER++ whose stored logits learn the future past; class-balanced task-end memory; head constraints",
        hparams=(
            HParam("alpha", float, 0.3, "weight of the logit matching on all heads", low=0.0),
            HParam("beta", float, 0.5, "weight of the cross-entropy on past heads", low=0.0),
            HParam(
                "gamma",
                float,
                0.85,
                "memory update's rescaling of transplanted logits",
                low=0.0,
                low_open=True,
                high=1.0,
            ),
            HParam("eta", float, 5e-3, "weight of the past and future head constraints", low=0.0),
            HParam("m", float, 0.3, "margin of the head constraints", low=0.0),
            HParam(
                "revision",
                str,
                "2022",
                "which mammoth xder_ce to follow: '2022' (before commit b558503) or '2024' (from it)",
                choices=REVISIONS,
            ),
            HParam(
                "current_loss",
                str,
                "method",
                "'method': the masked present-head cross-entropy replaces the loss given to backward; 'user': keep it",
                choices=CURRENT_LOSS,
            ),
        ),
    )
)
