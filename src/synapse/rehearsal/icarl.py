"""iCaRL: herding exemplars, binary cross-entropy with distillation, nearest-mean-of-exemplars prediction."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .._base import CURRENT_LOSS, TaskBatch, distributed_world, unwrap_model
from .._capture import Replay
from .._classes import ClassHistory, widened
from .._floor import Floor
from .._state import both_or_neither
from .._validation import check_non_empty
from ..augment import Transform
from ..catalog import HParam, MethodSpec, register
from ..functional import icarl_loss, nearest_mean_scores
from ..memory import HerdingMemory, head_input_features
from .er import ER

__all__ = ["ICaRL"]

FeatureExtractor = Callable[[Dict[str, Tensor]], Tensor]


class ICaRL(ClassHistory, ER):
    """iCaRL, from Rebuffi et al. 2017, "iCaRL: Incremental Classifier and Representation Learning"
    (CVPR 2017).

    Three parts, as in the paper: a memory of exemplars chosen by herding at each :meth:`end_task`
    (``end_task(data)`` is needed), a representation trained with binary cross-entropy that distils the
    old network's outputs on the old classes (:func:`~synapse.functional.icarl_loss`, one mean over the
    batch and a replayed exemplar minibatch), and a nearest-mean-of-exemplars classifier: :meth:`predict`
    (``has_predictor``). The feature extractor ``phi`` is named by ``head=``, ``feature_extractor=``, or
    defaults to the input of the model's last ``nn.Linear``; features are computed in eval mode without
    grad. With ``current_loss='method'`` the loss passed to :meth:`backward` is checked, then replaced.
    The equations, the feature extractor and the user's loss: docs/methods/rehearsal.md, "iCaRL in detail".

    Deviations (each explained in the method page):

    * Exemplars weigh ``k / (B + k)`` per step, not ``K / (N + K)`` of the training set.
    * The old and seen classes come from the targets, not known class blocks.
    * The old network's outputs are computed per step by a frozen copy, not recorded before training.
    * The loss is a mean over rows and classes, not a sum.
    * No flipped images in the class means.
    * Class means are state, computed at task ends; features normalised, plain distance (the paper).
    * With ``fused=True`` BatchNorm sees the batch and the exemplars together.
    * The weight decay is the optimizer's.
    * A returning class is re-selected and distilled; distributed ranks average their class means.

    Args:
        model: the model being trained (may be wrapped in DDP or ``torch.compile``); it returns a
            ``(batch, classes)`` logits tensor, and ``backward``'s keywords name ``forward``'s parameters
            (the frozen copy is called with them).
        buffer_size: the memory budget ``K`` (per rank in a distributed run).
        buffer_sample_size: exemplars replayed per step.
        feature_extractor: ``fn({name: inputs}) -> (batch, d)`` features (see the method page).
        head: the model's head, as a submodule or its attribute path (see the method page).
        current_loss: ``'method'`` (iCaRL's loss replaces the one passed to ``backward``) or ``'user'``.
        fused: replay inside the user's forward (see :class:`~synapse.rehearsal.ER`).
        buffer_scope: ``'rank'`` or ``'global'`` (see :class:`~synapse.rehearsal.ER`).
        scaler: a ``torch.amp.GradScaler`` for mixed precision; pass the unscaled loss to ``backward``.
        replay_transform: augments every replayed exemplar minibatch on the device, as in
            :class:`~synapse.rehearsal.ER` (default None: replay what was stored); the frozen copy distils
            on the same augmented view.

    Example:
        >>> from synapse import named_batches
        >>> synapse = ICaRL(model, buffer_size=500, buffer_sample_size=10, head="fc")
        >>> for task in tasks:
        ...     for inputs, targets in task:
        ...         optimizer.zero_grad()
        ...         loss = criterion(model(inputs), targets)  # checked, then replaced by iCaRL's loss
        ...         synapse.backward(loss, targets, inputs=inputs)
        ...         optimizer.step()
        ...     synapse.end_task(named_batches(task))  # herding, the frozen copy, the class means
        >>> synapse.predict(inputs=inputs).argmax(1).shape  # nearest mean of exemplars; model(inputs): the head
        torch.Size([10])
    """

    needs_task_boundaries = True
    needs_task_data = True
    has_predictor = True
    reads_logits = True  # sigmoids of the logits: log-probabilities never reach a BCE target of 1
    buffer_policies = ("herding",)
    buffer: HerdingMemory

    def __init__(
        self,
        model: nn.Module,
        buffer_size: int = 1024,
        buffer_sample_size: int = 32,
        *,
        feature_extractor: Optional[FeatureExtractor] = None,
        head: Union[str, nn.Module, None] = None,
        current_loss: str = "method",
        fused: bool = True,
        buffer_scope: str = "rank",
        scaler: Optional[torch.amp.GradScaler] = None,
        replay_transform: Optional[Transform] = None,
    ) -> None:
        current_loss = self._check_current_loss(current_loss)
        if feature_extractor is not None and head is not None:
            raise ValueError("pass feature_extractor or head, not both: head names the layer whose input is phi")
        if feature_extractor is not None and not callable(feature_extractor):
            raise TypeError(f"feature_extractor must be callable, got {type(feature_extractor).__name__}")
        default_head: Optional[nn.Linear] = None
        if feature_extractor is None and isinstance(model, nn.Module):  # else the base rejects the model
            if head is None:
                head = default_head = _last_linear(unwrap_model(model))
            # The plain module, not a DDP wrapper: feature passes are per rank and need no collective.
            feature_extractor = head_input_features(unwrap_model(model), head)
        super().__init__(
            model,
            buffer_size,
            buffer_sample_size,
            method="er",
            fused=fused,
            buffer_scope=buffer_scope,
            scaler=scaler,
            replay_transform=replay_transform,
            buffer_policy="herding",
        )
        assert feature_extractor is not None
        self.feature_extractor: FeatureExtractor = feature_extractor
        self.current_loss = current_loss
        self._default_head = default_head
        self._old_at_width: Optional[Tensor] = None  # old_classes padded to the current width (cached)
        self.class_means: Optional[Tensor] = None  # (C, d): normalised mean exemplar feature per class
        self.class_has_mean: Optional[Tensor] = None  # bool (C,): the classes with exemplars
        self.num_classes: Optional[int] = None  # the model's output width at the last step
        self._init_class_history(width_attr="num_classes")
        self.add_state("class_means", dtype=torch.float32, shape=("num_classes", None), optional=True)
        self.add_state("class_has_mean", dtype=torch.bool, shape=("num_classes",), optional=True)
        self.add_constraint(lambda state, path: both_or_neither(state, ("class_means", "class_has_mean"), path))

    # ------------------------------------------------------------------ backward
    def _check(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        batch = targets.shape[0]
        check_non_empty("iCaRL", targets)
        outputs = self._forward.checked_outputs("iCaRL", batch)
        if targets.device != outputs.device:
            raise ValueError(f"targets are on {targets.device} but the model's outputs on {outputs.device}")
        if self.num_classes is not None and outputs.shape[1] < self.num_classes:
            raise ValueError(
                f"the model now outputs {outputs.shape[1]} logits but earlier steps had {self.num_classes}: "
                "heads may grow between tasks, not shrink"
            )
        if self.teacher is not None:
            self._forward.check_input_names(list(model_inputs))  # the frozen copy is called with them
        super()._check(loss, targets, model_inputs)

    def _backward(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        outputs = self._forward.outputs
        assert outputs is not None  # checked by _check
        self._follow_model_device()
        replay: Optional[Replay] = None
        if len(self.buffer) > 0:
            replay = self._forward.replay if self.fused else self._separate_replay_forward()
            if replay is not None and replay.outputs is None:
                replay = None
        width, batch = outputs.shape[1], targets.shape[0]
        replay_targets = None if replay is None else replay.sample["targets"]
        seen = self._seen_after(width, targets, replay_targets)
        classes, old = seen[1:-1], self._old_classes_at(width)
        old_current, old_replay = self._old_outputs(model_inputs, replay, width)
        if self.current_loss == "method":
            current = icarl_loss(outputs, targets, old_current, old, classes)
        else:
            current = loss
        terms: List[Tuple[float, Tensor]] = []
        k = 0
        if replay is not None and replay_targets is not None:
            assert replay.outputs is not None
            k = replay.minibatch_size
            terms.append((k / (batch + k), icarl_loss(replay.outputs[0], replay_targets, old_replay, old, classes)))
        self._run_backward(current, terms, loss_weight=batch / (batch + k))
        self._seen_store, self.num_classes = seen, width  # committed once the step succeeded
        self._store(targets, model_inputs)
        self._forward.clear()

    def _seen_after(self, width: int, targets: Tensor, replay_targets: Optional[Tensor]) -> Tensor:
        """A new seen-class store (flags in ``[1:-1]``) with this step's labels added, on the device."""
        labels = targets if replay_targets is None else torch.cat([targets, replay_targets.to(targets.device)])
        return self._seen_with(labels, width, self.device)

    def _old_classes_at(self, width: int) -> Optional[Tensor]:
        """The old classes as a ``(width,)`` mask (the head may have grown since the task end)."""
        if self.old_classes is None:
            return None
        if self._old_at_width is None or self._old_at_width.shape[0] != width:
            self._old_at_width = widened(self.old_classes, width, self.device)
        return self._old_at_width

    def _old_outputs(
        self, model_inputs: Mapping[str, Tensor], replay: Optional[Replay], width: int
    ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """The frozen copy's logits on this step's batch (when iCaRL owns its term) and on the replayed
        exemplars, from one forward over the rows needed."""
        if self.teacher is None:
            return None, None
        # The frozen copy sees the view the model trained on (the forward's inputs, e.g. augmented).
        own = dict(self._forward.current_inputs(model_inputs)) if self.current_loss == "method" else {}
        inputs = own
        if replay is not None:
            replayed = self._inputs_of(replay.sample)
            inputs = {k: torch.cat([own[k], v]) for k, v in replayed.items()} if own else replayed
        if not inputs:
            return None, None
        rows = next(iter(inputs.values())).shape[0]
        with torch.no_grad():
            logits = self.teacher(**inputs)
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != rows or logits.shape[1] > width:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"the frozen copy returned {got} for {rows} rows; expected (rows, <= {width}) logits")
        batch = next(iter(own.values())).shape[0] if own else 0
        return (logits[:batch] if own else None), (logits[batch:] if replay is not None else None)

    def _store(self, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        # The herding memory is filled at task ends only; a step just records the input names (fused
        # replay needs them to find the inputs in the user's forward call).
        self._input_names = tuple(model_inputs)
        self._forward.input_names = self._input_names

    def _follow_model_device(self) -> None:
        super()._follow_model_device()
        device = self.device
        if self._follow_classes(device):
            self._old_at_width = None
        if self.class_means is not None and self.class_means.device != device:
            assert self.class_has_mean is not None
            self.class_means, self.class_has_mean = self.class_means.to(device), self.class_has_mean.to(device)

    # ------------------------------------------------------------------ task end
    def _end_task(self, data: Optional[Iterable[TaskBatch]]) -> None:
        assert data is not None  # needs_task_data: the base raised otherwise
        batches = list(self._iter_task_data(data))  # checked, and held: herding reads them all at once
        width = self.num_classes
        if width is None and batches:  # no step yet: the model's output says how many classes there are
            with self._feature_mode():
                width = self._checked_logits(
                    self.module(**{k: v.to(self.device) for k, v in batches[0][1].items()})
                ).shape[1]
        if width is None:
            return  # no step and no data: nothing to remember
        labels = [t for t, _ in batches if len(t)]
        if labels:  # a task-end check may read device values
            low, high = min(int(t.min()) for t in labels), max(int(t.max()) for t in labels)
            if low < 0 or high >= width:
                raise ValueError(f"end_task data has labels in [{low}, {high}], outside the model's {width} classes")
        if self._default_head is not None and self._default_head.out_features != width:
            raise ValueError(
                f"iCaRL took the model's last nn.Linear as its head, but it outputs {self._default_head.out_features} "
                f"features and the model {width} logits: name the head with head='...' or pass feature_extractor="
            )
        self._follow_model_device()
        seen = None if self.seen_classes is None else self.seen_classes.clone()
        if seen is not None:
            seen = self._union_over_ranks(seen)
        with self._feature_mode():
            self.buffer.select_task(batches, self._features)
        self._follow_model_device()  # the memory is allocated where the data lies
        chunk = max((len(t) for t, _ in batches), default=256)
        means, has_mean = self._class_means(width, chunk)
        teacher = self._frozen_copy() if seen is not None and bool(seen.any()) else None
        self.class_means, self.class_has_mean, self.num_classes = means, has_mean, width
        self.teacher, self.old_classes, self._old_at_width = teacher, None if teacher is None else seen, None
        if seen is not None and self._seen_store is not None:
            self._seen_store[1:-1] = seen

    def update_class_means(self, batch_size: int = 256) -> None:
        """Recompute the class means from the exemplars with the network as it is now (done at every
        :meth:`end_task`; call it before evaluating mid-task to follow the training since)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if self.num_classes is None or len(self.buffer) == 0:
            return
        self._follow_model_device()
        self.class_means, self.class_has_mean = self._class_means(self.num_classes, batch_size)

    def _class_means(self, width: int, chunk: int) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """``(means, has_mean)``: each class's normalised mean of its exemplars' normalised features."""
        names = [n for n in self.buffer.names if n.startswith("input:")]
        sums: Optional[Tensor] = None
        counts = torch.zeros(width, device=self.device)
        with self._feature_mode():
            for label, (start, stop) in self.buffer.class_ranges().items():
                if not 0 <= label < width:
                    continue
                items = self._inputs_of(self.buffer.class_items(label, names))
                for first in range(0, stop - start, chunk):
                    phi = F.normalize(self._features({k: v[first : first + chunk] for k, v in items.items()}), dim=1)
                    if sums is None:
                        sums = torch.zeros(width, phi.shape[1], device=self.device)
                    sums[label] += phi.sum(0).to(sums.device)
                counts[label] = stop - start
        if sums is None:
            return None, None
        if distributed_world() > 1:  # every rank predicts with the means over all ranks' exemplars
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        return F.normalize(sums, dim=1), counts > 0  # the mean's direction is the sum's

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict(self, **model_inputs: Tensor) -> Tensor:
        """Nearest-mean-of-exemplars scores ``(batch, classes)``: ``-|| phi(x) - mu_y ||``, ``-inf`` for the
        classes without exemplars. Take ``.argmax(1)``.

        Use it in your own evaluation loop in place of ``model(inputs)``; the model's outputs stay
        available as its softmax head. Before the first :meth:`end_task` there are no exemplars and no
        means: it returns the model's outputs (in eval mode), the only classifier there is then.
        """
        self._check_predict_inputs(model_inputs)
        if self.class_means is None:
            return super().predict(**model_inputs)
        self._follow_model_device()
        with self._feature_mode():
            phi = self._features(model_inputs)
        assert self.class_has_mean is not None
        scores = nearest_mean_scores(phi, self.class_means.to(phi.device), self.class_has_mean.to(phi.device))
        width = self.num_classes or scores.shape[1]
        if width > scores.shape[1]:  # the head grew since the means were taken: the new classes have none
            scores = F.pad(scores, (0, width - scores.shape[1]), value=float("-inf"))
        return scores

    def _features(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """``phi`` of a batch of inputs (moved to the model's device), checked, as float32."""
        phi = self.feature_extractor({k: v.to(self.device) for k, v in inputs.items()})
        batch = next(iter(inputs.values())).shape[0]
        if not isinstance(phi, Tensor) or phi.dim() != 2 or phi.shape[0] != batch:
            got = tuple(phi.shape) if isinstance(phi, Tensor) else type(phi).__name__
            raise ValueError(f"the feature extractor must return (batch, d) features with batch={batch}, got {got}")
        return phi.float()

    @staticmethod
    def _checked_logits(outputs: Any) -> Tensor:
        if not isinstance(outputs, Tensor) or outputs.dim() != 2:
            got = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
            raise ValueError(f"iCaRL needs the model to return (batch, classes) logits, got {got}")
        return outputs

    @contextlib.contextmanager
    def _feature_mode(self) -> Iterator[None]:
        """No grad, eval mode, and invisible to the capture: the model as a feature extractor."""
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad(), self._forward.paused():
                yield
        finally:
            self.module.train(was_training)

    # ------------------------------------------------------------------ state
    def _after_load(self) -> None:
        self._old_at_width = None


def _last_linear(module: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear`` in registration order, taken as its head by default."""
    linears = [(name, m) for name, m in module.named_modules(remove_duplicate=False) if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"iCaRL needs a feature extractor and {type(module).__name__} has no nn.Linear to take as its head: "
            "name the head with head='...' or pass feature_extractor=fn(inputs) -> (batch, d)"
        )
    name, last = linears[-1]
    names = [n for n, m in linears if m is last]
    if len(names) > 1:
        raise ValueError(
            f"the model's last nn.Linear is registered as {names}, so which input is the features is ambiguous: "
            "name the head with head='...' or pass feature_extractor="
        )
    return last


class _ICaRLFloor(Floor):
    """iCaRL's floor: the frozen copy's forward on the batch and the replayed exemplars (riding in the user's
    forward), and one binary cross-entropy over all rows whose old-class targets are its sigmoid outputs,
    in place of the user's loss."""

    fused = 1

    def backward(self, loss: Tensor, targets: Tensor, inputs: Tensor, logits: Tensor) -> None:
        replayed_x = self.x.index_select(0, self.idx)
        with torch.no_grad():
            old_logits = self.teacher()(torch.cat([inputs, replayed_x]))
        rows = torch.cat([logits, self.replayed[0]])
        labels = torch.cat([targets, self.y.index_select(0, self.idx)])
        old = torch.arange(rows.shape[1], device=rows.device) < rows.shape[1] // 2  # the first half are old
        self.run_backward((icarl_loss(rows, labels, old_logits, old),), (self.one,))


register(
    MethodSpec(
        "icarl",
        ICaRL,
        family="rehearsal",
        display="iCaRL",
        order=13,
        floor=_ICaRLFloor,
        paper="Rebuffi et al. 2017, *iCaRL: Incremental Classifier and Representation Learning*",
        summary="herding exemplars; BCE distilling a frozen copy's old-class outputs; nearest-mean-of-exemplars",
        hparams=(
            HParam(
                "current_loss",
                str,
                "method",
                "'method': iCaRL's BCE replaces the loss passed to backward; 'user': keep it",
                choices=CURRENT_LOSS,
            ),
        ),
    )
)
