"""BiC: distillation from the old model on new data and exemplars, then a two-parameter bias correction."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._base import CURRENT_LOSS, TaskBatch, distributed_world
from .._capture import Replay
from .._classes import ClassHistory
from .._floor import Floor
from .._state import AtMost, StateError, width_of
from .._validation import check_positive, check_positive_int
from ..augment import Transform
from ..buffer import Buffer, fresh_seed, indices_on
from ..catalog import HParam, MethodSpec, register
from ..functional import (
    asymmetric_cross_entropy,
    bias_correction,
    bic_lambda,
    bic_loss,
    reservoir_plan,
    soft_distillation_loss,
)
from ..memory import STREAM_POLICIES, ClassBalancedBuffer
from .er import ER

__all__ = ["BiC"]

# Rows per forward when stage 2 computes the frozen model's logits on the held-out set.
_EVAL_CHUNK = 512


class BiC(ClassHistory, ER):
    """BiC, from Wu et al. 2019, "Large Scale Incremental Learning" (CVPR 2019).

    Replay from an exemplar memory, trained in two stages per task. Stage 1, at every step: distillation
    from the old model (a frozen copy taken at the last :meth:`end_task`) plus cross-entropy over the
    seen classes, weighted by ``n / (n + m)`` (:func:`synapse.functional.bic_loss`). Stage 2, at each
    :meth:`end_task` from the second task on: one bias correction layer ``(alpha, beta)`` for the task's
    new classes, fitted on a class-balanced held-out set (:func:`synapse.functional.bias_correction`).
    Evaluate with ``synapse.predict(inputs=x)``, which goes through every layer. With
    ``current_loss='method'`` the loss passed to :meth:`backward` is checked, then replaced by BiC's.
    The equations, the held-out set and the user's loss: docs/methods/rehearsal.md, "BiC in detail".

    Deviations (each explained in the method page):

    * The held-out set is a reservoir sample of the stream, not an offline 9:1 split.
    * The memory is filled from the stream, class-balanced by default.
    * Minibatches are the incoming rows plus replayed exemplar rows, one mean over both.
    * ``lambda`` counts the new classes seen so far in the task, not known in advance.
    * Both logits in stage 1 pass through every layer fitted so far (as sairin1202/BIC and FACIL).
    * No ``T**2`` factor on the distillation term (Mammoth and sairin1202 have one).
    * Stage 2 trains on the frozen model's logits computed once; Adam, lr 1e-3, Mammoth's 250 epochs.
    * ``L_c`` and ``L_b`` span the classes seen so far; the head's width must not change.
    * Distributed: per-rank memories; ranks average their fitted ``(alpha, beta)``.

    Args:
        model: the model being trained (may be wrapped in DDP or ``torch.compile``); it returns a
            ``(batch, classes)`` logits tensor, and ``backward``'s keywords name ``forward``'s parameters
            (the old model and stage 2 call it with them).
        buffer_size: the exemplar budget (per rank in a distributed run), validation memory included.
        buffer_sample_size: exemplar rows replayed per step.
        temperature: the distillation temperature ``T`` (> 0).
        val_fraction: the share ``V / buffer_size`` of the budget held out for stage 2 (the paper's 1:9
            split: 0.1); 0 turns stage 2 off.
        bias_epochs: epochs of stage 2 over the held-out set.
        bias_lr: Adam's learning rate in stage 2.
        bias_batch_size: stage 2's minibatch; None (default): the last training batch's size.
        current_loss: ``'method'`` (``L`` replaces the loss passed to backward) or ``'user'`` (see the method page).
        buffer_policy: the training memory's policy, ``'class_balanced'`` (default) or ``'reservoir'``.
        fused: replay inside the user's forward (see :class:`~synapse.rehearsal.ER`).
        buffer_scope: ``'rank'`` or ``'global'`` (see :class:`~synapse.rehearsal.ER`); both parts of the
            budget follow it.
        scaler: a ``torch.amp.GradScaler`` for mixed precision; pass the unscaled loss to ``backward``.
        replay_transform: augments every replayed exemplar minibatch on the device, as in :class:`~synapse.rehearsal.ER`
            (default None: replay what was stored).

    Example:
        >>> synapse = BiC(model, buffer_size=500, buffer_sample_size=32)
        >>> for task in tasks:
        ...     for inputs, targets in task:
        ...         optimizer.zero_grad()
        ...         loss = criterion(model(inputs), targets)  # checked, then replaced by BiC's loss
        ...         synapse.backward(loss, targets, inputs=inputs)
        ...         optimizer.step()
        ...     synapse.end_task()  # stage 2, then the model becomes the old model
        >>> predictions = synapse.predict(inputs=inputs).argmax(1)  # bias-corrected
    """

    needs_task_boundaries = True
    has_predictor = True
    reads_logits = True  # the bias correction and the distillation work on raw logits

    def __init__(
        self,
        model: nn.Module,
        buffer_size: int = 1024,
        buffer_sample_size: int = 32,
        temperature: float = 2.0,
        *,
        val_fraction: float = 0.1,
        bias_epochs: int = 250,
        bias_lr: float = 1e-3,
        bias_batch_size: Optional[int] = None,
        current_loss: str = "method",
        buffer_policy: str = "class_balanced",
        fused: bool = True,
        buffer_scope: str = "rank",
        scaler: Optional[torch.amp.GradScaler] = None,
        replay_transform: Optional[Transform] = None,
    ) -> None:
        check_positive_int("buffer_size", buffer_size)
        check_positive("temperature", temperature)
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
        val_size = round(val_fraction * buffer_size)
        if val_fraction > 0 and not 1 <= val_size < buffer_size:
            raise ValueError(
                f"val_fraction={val_fraction!r} of buffer_size={buffer_size} leaves {val_size} held-out and "
                f"{buffer_size - val_size} training items; both need at least one (or val_fraction=0)"
            )
        check_positive_int("bias_epochs", bias_epochs)
        check_positive("bias_lr", bias_lr)
        if bias_batch_size is not None:
            check_positive_int("bias_batch_size", bias_batch_size)
        if buffer_policy not in STREAM_POLICIES:
            raise ValueError(f"buffer_policy must be one of {STREAM_POLICIES} for BiC, got {buffer_policy!r}")
        current_loss = self._check_current_loss(current_loss)
        super().__init__(
            model,
            buffer_size - val_size,
            buffer_sample_size,
            method="er",
            fused=fused,
            buffer_scope=buffer_scope,
            buffer_policy=buffer_policy,
            scaler=scaler,
            replay_transform=replay_transform,
        )
        self.temperature = float(temperature)
        self.val_fraction = float(val_fraction)
        self.bias_epochs = bias_epochs
        self.bias_lr = float(bias_lr)
        self.bias_batch_size = bias_batch_size
        self.current_loss = current_loss
        world = distributed_world()
        rank = dist.get_rank() if world > 1 else 0
        capacity = val_size if buffer_scope == "rank" else val_size // world + (rank < val_size % world)
        seed = (fresh_seed() + rank) % 2**62
        # The held-out reservoir of the current task, and the held-out items of the past tasks.
        self.held_out = _HeldOutReservoir(capacity, seed=seed) if capacity else None
        self.val_memory = ClassBalancedBuffer(capacity, seed=seed + 1) if capacity else None
        self._bias_rng = torch.Generator().manual_seed(seed)  # stage 2's minibatch order
        self._layers: List[Tuple[Tensor, Tensor, Tensor]] = []  # (alpha, beta, new classes) per corrected task
        self._scale: Optional[Tensor] = None  # the layers composed: one (alpha, beta) per column
        self._shift: Optional[Tensor] = None
        self._batch_size = 0  # the last training batch's size: stage 2's minibatch by default
        self._init_class_history()
        self.add_checked("bias_layers", self._layers_state, _check_layers, self._set_layers)
        self.add_state_object("held_out", lambda: self.held_out, optional=True)
        self.add_state_object("val_memory", lambda: self.val_memory, optional=True)
        self.add_generator("bias_rng", "_bias_rng")
        self.add_value("batch_size", int, attr="_batch_size")

    @property
    def bias_layers(self) -> List[Tuple[Tensor, Tensor, Tensor]]:
        """The fitted layers, oldest first: ``(alpha, beta, new_classes)`` with ``new_classes`` a bool mask."""
        return list(self._layers)

    def corrected(self, logits: Tensor) -> Tensor:
        """``logits`` through every bias correction layer fitted so far, in float32 (or wider)."""
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self._scale is None or self._shift is None:
            return logits
        if logits.shape[-1] != self._scale.shape[0]:
            raise ValueError(f"BiC's layers cover {self._scale.shape[0]} classes, the logits have {logits.shape[-1]}")
        return torch.addcmul(self._shift, logits, self._scale)

    @torch.no_grad()
    def predict(self, **model_inputs: Tensor) -> Tensor:
        """The model's logits in eval mode, bias-corrected by every layer (Sec. 5): use
        ``synapse.predict(inputs=x).argmax(1)`` in place of ``model(x).argmax(1)``."""
        return self.corrected(super().predict(**model_inputs))

    # ------------------------------------------------------------------ backward
    def _check(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        self._forward.check_input_names(list(model_inputs))  # the old model and stage 2 are called with them
        outputs = self._forward.checked_outputs("BiC", targets.shape[0])
        seen = self.seen_classes
        if seen is not None and outputs.shape[1] != seen.shape[0]:
            raise ValueError(
                f"the model now outputs {outputs.shape[1]} logits but earlier steps had {seen.shape[0]}: "
                "BiC needs a single head of fixed width over all classes"
            )
        if targets.device != outputs.device:
            raise ValueError(f"targets are on {targets.device} but the model's outputs on {outputs.device}")
        if self.held_out is not None:
            self.held_out.check_layout(self._held_items(targets, model_inputs))
        super()._check(loss, targets, model_inputs)

    def _backward(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        self._follow_model_device()
        replay = None
        if len(self.buffer) > 0:
            replay = self._forward.replay if self.fused else self._separate_replay_forward()
            if replay is not None and replay.outputs is None:
                replay = None
        step = self._plan(targets)
        self._run_backward(self._objective(loss, targets, model_inputs, replay, step))
        self._store_training_rows(targets, model_inputs, step)
        self._commit(targets, model_inputs, step)
        self._forward.clear()

    def _plan(self, targets: Tensor) -> _Step:
        """This step's decisions, nothing committed: the seen flags with the batch's classes, and the rows
        the held-out reservoir takes (on the host, from counters and draws it peeks)."""
        outputs = self._forward.outputs
        assert outputs is not None  # checked by _check
        width = outputs.shape[1]
        seen = self._seen_with(targets, width, self.device)
        if self.held_out is None:
            return _Step(seen, [], [], False)
        return _Step(seen, *self.held_out.plan(targets.shape[0]))

    def _objective(
        self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor], replay: Optional[Replay], step: _Step
    ) -> Tensor:
        """The step's root for backward: ``L`` (or, with ``current_loss='user'``, its version around the
        user's loss) on the incoming rows not held out and the replayed rows."""
        outputs = self._forward.outputs
        assert outputs is not None
        batch, seen = targets.shape[0], step.seen[1:-1]
        if self.current_loss == "user" and self.teacher is None and replay is None:
            return loss  # no distillation, no replayed rows: the user's loss is the whole term
        # The teacher sees the view the model trained on (the forward's inputs, e.g. augmented).
        logits, labels, inputs = outputs, targets, self._forward.current_inputs(model_inputs)
        if replay is not None:  # the replayed rows join the batch: one set of training rows
            assert replay.outputs is not None
            logits = torch.cat([outputs, replay.outputs[0]])
            labels = torch.cat([targets, replay.sample["targets"].to(targets.dtype)])
            if self.teacher is not None:
                inputs = {k: torch.cat([v, replay.sample[f"input:{k}"]]) for k, v in inputs.items()}
        teacher = None if self.teacher is None else self.corrected(self._teacher_logits(inputs, len(labels)))
        corrected = self.corrected(logits)
        if self.current_loss == "user":
            k = len(labels) - batch
            classification = loss.float()
            if k:
                replayed = asymmetric_cross_entropy(corrected[batch:], labels[batch:], seen)
                classification = (batch * classification + k * replayed) / (batch + k)
            if teacher is None:
                return classification
            assert self.old_classes is not None
            distillation = soft_distillation_loss(corrected, teacher, self.temperature, self.old_classes)
            return torch.lerp(classification, distillation, bic_lambda(self.old_classes, seen))
        if step.rows:  # rows the held-out reservoir takes are kept out of the loss (host-known positions)
            held = set(step.rows)
            kept = [i for i in range(len(labels)) if i not in held]
            if not kept:
                return outputs.sum() * 0.0  # every row is held out and nothing is replayed: no gradient
            index = indices_on(np.array(kept), self.device)
            corrected, labels = corrected.index_select(0, index), labels.index_select(0, index)
            teacher = None if teacher is None else teacher.index_select(0, index)
        return bic_loss(corrected, labels, teacher, self.old_classes, seen, self.temperature)

    def _teacher_logits(self, inputs: Mapping[str, Tensor], rows: int) -> Tensor:
        assert self.teacher is not None
        with torch.no_grad():
            out = self.teacher(**inputs)
        if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != rows:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"the old model returned {got} for a batch of {rows}; expected (batch, classes)")
        return out

    def _held_items(self, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        return {**{f"input:{k}": v for k, v in model_inputs.items()}, "targets": targets}

    def _store_training_rows(self, targets: Tensor, model_inputs: Mapping[str, Tensor], step: _Step) -> None:
        """Offer the training memory the rows the held-out reservoir did not take."""
        if step.rows:
            held = set(step.rows)
            kept = [i for i in range(targets.shape[0]) if i not in held]
            if not kept:  # nothing to store; remember the inputs' names as a store would
                self._input_names = tuple(model_inputs)
                self._forward.input_names = self._input_names
                return
            index = indices_on(np.array(kept), targets.device)
            targets = targets.index_select(0, index)
            model_inputs = {k: v.index_select(0, index.to(v.device)) for k, v in model_inputs.items()}
        self._store(targets, model_inputs)

    def _commit(self, targets: Tensor, model_inputs: Mapping[str, Tensor], step: _Step) -> None:
        """Apply the step's decisions, once its backward succeeded."""
        self._seen_store = step.seen
        self._batch_size = targets.shape[0]
        if self.held_out is not None:
            self.held_out.commit(self._held_items(targets, model_inputs), step.slots, step.rows, step.drew)

    def _follow_model_device(self) -> None:
        super()._follow_model_device()
        device = self.device
        for memory in (self.held_out, self.val_memory):
            if memory is not None and memory.device is not None and memory.device != device:
                memory.to(device)
        self._follow_classes(device)
        if self._layers and self._layers[0][0].device != device:
            self._set_layers([tuple(t.to(device) for t in layer) for layer in self._layers])  # type: ignore[misc]

    # ------------------------------------------------------------------ task end: stage 2
    def _end_task(self, data: Optional[Iterable[TaskBatch]]) -> None:
        """Stage 2 on the held-out items (``data`` is not needed: the held-out set was kept during the task),
        then the model becomes the old model."""
        seen = self.seen_classes
        if seen is None:
            return  # no step yet
        self._follow_model_device()
        world = distributed_world()
        seen.copy_(self._union_over_ranks(seen))
        new = seen if self.old_classes is None else seen & ~self.old_classes
        if self.teacher is not None and bool(new.any()):  # from the second task on, if it brought classes
            fitted = self._fit_bias_layer(new, seen)
            if world > 1:
                fitted = _averaged(fitted, self.device)
            if fitted is not None:
                self._set_layers([*self._layers, (fitted[0], fitted[1], new.clone())])
        if self.held_out is not None and self.val_memory is not None and len(self.held_out) > 0:
            self.val_memory.add({k: v.clone() for k, v in self.held_out.stored().items()})
            self.val_memory.flush()
        if self.held_out is not None:
            self.held_out.reset()
        if bool(seen.any()):  # one sync per task end, never in backward
            self.teacher = self._frozen_copy()
            self.old_classes = seen.clone()

    def _fit_bias_layer(self, new: Tensor, seen: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
        """``(alpha, beta)`` for the ``new`` classes, fitted on the class-balanced held-out set (eq. 5), or
        None when that set lacks an old or a new class."""
        items = self._validation_set(new)
        if items is None:
            return None
        targets = items.pop("targets").to(self.device, torch.long)
        logits = self._frozen_logits(items)
        alpha = torch.ones((), device=self.device, requires_grad=True)
        beta = torch.zeros((), device=self.device, requires_grad=True)
        optimizer = torch.optim.Adam([alpha, beta], lr=self.bias_lr)
        n = targets.shape[0]
        size = self.bias_batch_size or self._batch_size or n
        orders = torch.stack([torch.randperm(n, generator=self._bias_rng) for _ in range(self.bias_epochs)])
        with torch.enable_grad():
            for order in orders.to(self.device).unbind(0):
                for index in order.split(size):
                    corrected = bias_correction(logits.index_select(0, index), new, alpha, beta)
                    loss = asymmetric_cross_entropy(corrected, targets.index_select(0, index), seen)
                    optimizer.zero_grad(set_to_none=False)
                    loss.backward()
                    optimizer.step()
        return alpha.detach(), beta.detach()

    def _validation_set(self, new: Tensor) -> Optional[Dict[str, Tensor]]:
        """The same number of held-out items from every class present (the smallest class count), from the
        validation memory and the task's held-out reservoir; None without an old and a new class."""
        parts = [m.stored() for m in (self.val_memory, self.held_out) if m is not None and len(m) > 0]
        if not parts:
            return None
        items = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        labels = items["targets"].cpu().numpy().astype(np.int64)  # a sync, at a task end
        width = new.shape[0]
        labels = np.where((labels >= 0) & (labels < width), labels, -1)
        classes, counts = np.unique(labels[labels >= 0], return_counts=True)
        is_new = new.cpu().numpy()[classes]
        if not (is_new.any() and (~is_new).any()):
            return None
        per_class = int(counts.min())
        pick = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in classes]))
        index = indices_on(pick, self.device)
        return {k: v.to(self.device).index_select(0, index) for k, v in items.items()}

    def _frozen_logits(self, items: Mapping[str, Tensor]) -> Tensor:
        """The model's logits on ``items``' inputs, in eval mode and without grad, through the earlier layers."""
        inputs = self._inputs_of(items)
        n = next(iter(inputs.values())).shape[0]
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad(), self._forward.paused():
                chunks = [
                    self.module(**{k: v[i : i + _EVAL_CHUNK] for k, v in inputs.items()})
                    for i in range(0, n, _EVAL_CHUNK)
                ]
        finally:
            self.module.train(was_training)
        if not all(isinstance(c, Tensor) and c.dim() == 2 for c in chunks):
            raise ValueError("BiC's stage 2 needs the model to return a (batch, classes) logits tensor")
        return self.corrected(torch.cat(chunks))

    def _set_layers(self, layers: List[Tuple[Tensor, Tensor, Tensor]]) -> None:
        """Keep the layers, and their composition: per column the ``(alpha, beta)`` of the task that brought
        the class (1 and 0 for the first task's classes), so that correcting is one ``addcmul``."""
        self._layers = layers
        if not layers:
            self._scale = self._shift = None
            return
        width, device = layers[0][2].shape[0], layers[0][2].device
        scale, shift = torch.ones(width, device=device), torch.zeros(width, device=device)
        for alpha, beta, classes in layers:  # the classes of different tasks are disjoint
            scale, shift = torch.where(classes, alpha, scale), torch.where(classes, beta, shift)
        self._scale, self._shift = scale, shift

    # ------------------------------------------------------------------ state
    def _layers_state(self) -> List[Tuple[Tensor, ...]]:
        return [tuple(t.clone() for t in layer) for layer in self._layers]

    def _upgrade_state(self, state: Dict[str, Any]) -> Dict[str, Any]:
        return width_of(state, "seen_classes")


def _check_layers(value: Any, ctx: Any, path: str) -> List[Tuple[Tensor, Tensor, Tensor]]:
    """Saved bias layers: a list of ``(alpha, beta, new_classes)``, two 0-d floats and a bool mask over at
    most the seen classes, the same width in every layer."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (list, tuple)) and len(v) == 3 for v in value):
        raise StateError(f"{path} must be a list of (alpha, beta, new_classes) tensors")
    layers = [
        (
            ctx.tensor(alpha, torch.float32, (), f"{path}[{i}][0]"),
            ctx.tensor(beta, torch.float32, (), f"{path}[{i}][1]"),
            ctx.tensor(classes, torch.bool, (AtMost("num_classes"),), f"{path}[{i}][2]"),
        )
        for i, (alpha, beta, classes) in enumerate(value)
    ]
    if len({len(layer[2]) for layer in layers}) > 1:
        raise StateError(f"{path}: every layer's new_classes must have the same width")
    return layers


class _Step(NamedTuple):
    """One step's decisions, applied once its backward succeeded."""

    seen: Tensor  # the seen-class store with this batch's classes
    slots: List[int]  # held-out reservoir slots taken ...
    rows: List[int]  # ... by these batch rows (kept out of training)
    drew: bool  # whether the plan peeked the reservoir's draws (taken by its commit)


class _HeldOutReservoir(Buffer):
    """A reservoir sample (Vitter's Algorithm R) of the current task's stream, whose choices are known on
    the host before the step's loss (:meth:`plan`), so that the rows it takes can be kept out of training,
    and written once the step succeeded (:meth:`commit`). :meth:`reset` starts a new task."""

    policy = "bic_held_out"

    def __init__(self, capacity: int, *, seed: Optional[int] = None) -> None:
        super().__init__(capacity, seed=seed)
        self.add_value("policy", str, equal=True)

    def __len__(self) -> int:
        return min(self.num_seen, self.capacity)

    def plan(self, batch: int) -> Tuple[List[int], List[int], bool]:
        """``(slots, rows, drew)`` for the next ``batch`` items, changing nothing: the draws are peeked (drawn
        ahead while the step's count of draws repeats, see :class:`DrawAhead`), and ``drew`` says if any were."""
        peeked: List[np.ndarray] = []

        def uniforms(n: int) -> np.ndarray:
            peeked.append(self._draws_ahead.peek(("reservoir", n), lambda rng, steps: list(rng.random((steps, n)))))
            return peeked[0]

        slots, rows = reservoir_plan(self.num_seen, batch, self.capacity, uniforms)
        return slots, rows, bool(peeked)

    def commit(self, items: Mapping[str, Tensor], slots: List[int], rows: List[int], drew: bool) -> None:
        """Write a planned batch: ``items``' ``rows`` into ``slots``; take the draws the plan peeked."""
        if not self._storage:
            self._allocate(items)
        if slots:
            device = self.device
            assert device is not None
            both = indices_on(np.array(slots + rows), device)
            slot_index, row_index = both[: len(slots)], both[len(slots) :]
            for name, value in items.items():
                rows_of = value.detach().index_select(0, row_index.to(value.device))
                self._storage[name].index_copy_(0, slot_index, self._clean(rows_of).to(device))
        self.num_seen += next(iter(items.values())).shape[0]
        if drew:
            self._draws_ahead.consume()

    def add(self, items: Mapping[str, Tensor], *, validate: bool = True) -> None:
        batch = self.check_batch(items) if validate else next(iter(items.values())).shape[0]
        self.commit(items, *self.plan(batch))

    def reset(self) -> None:
        """Empty it for a new task (the storage stays allocated)."""
        self.num_seen = 0


def _averaged(fitted: Optional[Tuple[Tensor, Tensor]], device: torch.device) -> Optional[Tuple[Tensor, Tensor]]:
    """The mean ``(alpha, beta)`` over the ranks that fitted one (None if none did)."""
    packed = torch.zeros(3, device=device)
    if fitted is not None:
        packed[0], packed[1], packed[2] = fitted[0], fitted[1], 1.0
    dist.all_reduce(packed)
    if float(packed[2]) == 0.0:  # a task-end sync
        return None
    return packed[0] / packed[2], packed[1] / packed[2]


_PAPER = "Wu et al. 2019, *Large Scale Incremental Learning*"


class _BiCFloor(Floor):
    """BiC's floor: the frozen copy's forward on the batch and the replayed rows (riding in the user's
    forward), and its loss, ``lambda`` distillation on the old classes plus cross-entropy on the seen ones,
    over all rows in place of the user's loss."""

    fused = 1

    def backward(self, loss: Tensor, targets: Tensor, inputs: Tensor, logits: Tensor) -> None:
        replayed_x = self.x.index_select(0, self.idx)
        with torch.no_grad():
            teacher = self.teacher()(torch.cat([inputs, replayed_x]))
        rows = torch.cat([logits, self.replayed[0]])
        labels = torch.cat([targets, self.y.index_select(0, self.idx)])
        classes = torch.arange(rows.shape[1], device=rows.device)
        old, seen = classes < rows.shape[1] // 2, classes >= 0  # the first half are old
        term = bic_loss(rows, labels, teacher, old, seen, float(self.hp["temperature"]))
        self.run_backward((term,), (self.one,))


register(
    MethodSpec(
        "bic",
        BiC,
        family="rehearsal",
        order=16,
        floor=_BiCFloor,
        paper=_PAPER,
        summary="replay with distillation from the old model; a two-parameter correction of the new classes' "
        "logits fitted on held-out items at each task end",
        hparams=(
            HParam("temperature", float, 2.0, "distillation temperature T", low=0.0, low_open=True),
            HParam(
                "val_fraction", float, 0.1, "share of the memory held out for the bias correction (0: off)", low=0.0
            ),
            HParam("bias_epochs", int, 250, "epochs of the bias correction's training at each task end", low=1),
            HParam("bias_lr", float, 1e-3, "Adam's learning rate for the bias correction", low=0.0, low_open=True),
            HParam(
                "current_loss",
                str,
                "method",
                "'method': BiC's loss replaces the loss passed to backward; 'user': it stands for the batch's CE",
                choices=CURRENT_LOSS,
            ),
            HParam("buffer_policy", str, "class_balanced", "the training memory's policy", choices=STREAM_POLICIES),
        ),
    )
)
