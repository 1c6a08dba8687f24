"""ER-ACE: Experience Replay with an asymmetric cross-entropy on the incoming batch."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._base import CURRENT_LOSS, TaskBatch
from .._classes import widened
from .._floor import Floor
from .._state import width_of
from .._validation import check_non_empty
from ..augment import Transform
from ..catalog import HParam, MethodSpec, register
from ..functional import ace_class_mask, asymmetric_cross_entropy
from .er import ER

__all__ = ["ERACE"]

MASKS = ("batch", "task")


class ERACE(ER):
    """ER-ACE, from Caccia et al. 2022, "New Insights on Reducing Abrupt Representation Change in Online
    Continual Learning" (ICLR 2022).

    Experience Replay in which the incoming batch only competes with its own classes: its cross-entropy
    is taken with the softmax restricted to a set of columns ``C``
    (:func:`synapse.functional.asymmetric_cross_entropy`, ``C`` from
    :func:`synapse.functional.ace_class_mask`), while the replayed minibatch keeps the plain
    cross-entropy over every class: ``L = ACE(f(x), y; C) + alpha * CE(f(x'), y')``. ``mask='batch'``
    (default, the authors' code) takes the batch's classes, ``'task'`` the task's; both add every class
    from the largest label seen upward. With ``current_loss='method'`` the loss passed to
    :meth:`backward` is checked, then replaced (the model must return ``(batch, classes)`` logits);
    ``'user'`` keeps it: plain ER. Sampling, storage, fused replay and the state dict are ER's. The
    equations and the class sets: docs/methods/rehearsal.md, "ER-ACE in detail".

    Deviations from the authors' code (each explained in the method page):

    * ``C`` is applied from the first step, not from the second task.
    * Replay starts as soon as the buffer holds anything.
    * With ``fused=True`` BatchNorm sees both batches together.
    * Excluded logits take the dtype's most negative finite value, not ``-1e9``.
    * The largest seen class is always in ``C`` (mammoth drops the unseen columns at the last class).
    * Distributed: each rank builds ``C`` from its own batch and labels.

    Args:
        model: the model being trained (may be wrapped in DDP or ``torch.compile``).
        buffer_size: items kept in the reservoir (per rank in a distributed run).
        buffer_sample_size: items per replay minibatch.
        alpha: weight of the replay cross-entropy.
        mask: ``'batch'`` or ``'task'``: the classes the incoming batch's softmax spans (see the method page).
        current_loss: ``'method'`` (ACE replaces the user's loss) or ``'user'`` (the user's loss is kept).
        fused: replay inside the user's forward (see :class:`~synapse.rehearsal.ER`).
        buffer_scope: ``'rank'`` or ``'global'`` (see :class:`~synapse.rehearsal.ER`).
        scaler: a ``torch.amp.GradScaler`` for mixed precision; pass the unscaled loss to ``backward``.
        replay_transform: augments every replayed minibatch on the device, as in :class:`~synapse.rehearsal.ER`
            (default None: replay what was stored).

    Example:
        >>> synapse = ERACE(model, buffer_size=500, buffer_sample_size=32)
        >>> for inputs, targets in loader:
        ...     optimizer.zero_grad()
        ...     loss = criterion(model(inputs), targets)  # checked, then replaced by the ACE term
        ...     synapse.backward(loss, targets, inputs=inputs)
        ...     optimizer.step()
    """

    def __init__(
        self,
        model: nn.Module,
        buffer_size: int = 1024,
        buffer_sample_size: int = 32,
        alpha: float = 1.0,
        *,
        mask: str = "batch",
        current_loss: str = "method",
        fused: bool = True,
        buffer_scope: str = "rank",
        scaler: Optional[torch.amp.GradScaler] = None,
        replay_transform: Optional[Transform] = None,
    ) -> None:
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
        current_loss = self._check_current_loss(current_loss)
        super().__init__(
            model,
            buffer_size,
            buffer_sample_size,
            alpha,
            method="er",
            fused=fused,
            buffer_scope=buffer_scope,
            scaler=scaler,
            replay_transform=replay_transform,
        )
        self.mask = mask
        self.current_loss = current_loss
        self._reads_outputs = current_loss == "method"  # the asymmetric CE is taken on your forward's outputs
        # Device tensors, so that no step reads a label on the host.
        self._largest_seen: Optional[Tensor] = None  # 0-d: the largest label seen so far
        self._task_classes: Optional[Tensor] = None  # bool (classes,): labels seen this task (mask='task')
        self._pending: List[Any] = []  # this step's (largest_seen, task_classes), applied once it succeeded
        self.add_value("num_classes", int, optional=True, get=self._num_classes, derived=True)
        self.add_state("largest_seen", dtype=torch.long, shape=(), optional=True, attr="_largest_seen")
        self.add_state("task_classes", dtype=torch.bool, shape=("num_classes",), optional=True, attr="_task_classes")

    # ------------------------------------------------------------------ backward
    def _check(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        if self.current_loss == "method":
            check_non_empty("ER-ACE", targets)
            logits = self._forward.checked_outputs("ER-ACE", targets.shape[0])
            if targets.device != logits.device:
                raise ValueError(f"targets are on {targets.device} but the model's outputs on {logits.device}")
        super()._check(loss, targets, model_inputs)

    def _current_term(self, loss: Tensor, targets: Tensor) -> Tensor:
        # The ACE term becomes the root in place of the user's loss, whose graph is then never walked
        # (a zero weight on it would still run its backward).
        if self.current_loss == "user":
            return loss
        term, *self._pending = self._ace_term(targets)
        return term

    def _commit_step(self) -> None:
        # Committed last: a step that raised leaves the seen classes as they were.
        if self._pending:
            self._largest_seen, self._task_classes = self._pending
            self._pending = []

    def _ace_term(self, targets: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """The ACE term on the user's outputs, and the seen-class state this step leads to."""
        logits = self._forward.outputs
        assert logits is not None  # checked by _check
        num_classes, device = logits.shape[1], logits.device
        targets = targets.long()
        largest = targets.max()
        if self._largest_seen is not None:
            largest = torch.maximum(largest, self._largest_seen.to(device))
        task_classes = None
        if self.mask == "task":
            task_classes = widened(self._task_classes, num_classes, device).index_fill_(0, targets, True)
        allowed = ace_class_mask(targets, num_classes, largest, task_classes)
        return asymmetric_cross_entropy(logits, targets, allowed), largest, task_classes

    def _end_task(self, data: Optional[Iterable[TaskBatch]]) -> None:
        self._task_classes = None  # a new task has no classes of its own yet

    # ------------------------------------------------------------------ state
    def _num_classes(self) -> Optional[int]:
        return None if self._task_classes is None else len(self._task_classes)

    def _upgrade_state(self, state: Dict[str, Any]) -> Dict[str, Any]:
        return width_of(state, "task_classes")


_PAPER = "Caccia et al. 2022, *New Insights on Reducing Abrupt Representation Change in Online Continual Learning*"


class _ERACEFloor(Floor):
    """ER-ACE's floor: the incoming batch's cross-entropy over its own classes (and the unseen ones) in place
    of the user's loss, ``alpha CE`` on the replay minibatch riding in the user's forward, one backward."""

    fused = 1

    def backward(self, loss: Tensor, targets: Tensor, inputs: Tensor, logits: Tensor) -> None:
        current = asymmetric_cross_entropy(logits, targets, ace_class_mask(targets, logits.shape[1]))
        replay = F.cross_entropy(self.replayed[0], self.y.index_select(0, self.idx))
        self.run_backward((current, replay), (self.one, self.weight("alpha")))


register(
    MethodSpec(
        "er-ace",
        ERACE,
        family="rehearsal",
        display="ER-ACE",
        order=9,
        floor=_ERACEFloor,
        paper=_PAPER,
        summary="ER with an asymmetric cross-entropy: the incoming batch's softmax spans only its own classes",
        hparams=(
            HParam("alpha", float, 1.0, "weight of the replay cross-entropy", low=0.0),
            HParam(
                "mask",
                str,
                "batch",
                "classes of the incoming batch's softmax: this batch's or this task's",
                choices=MASKS,
            ),
            HParam(
                "current_loss",
                str,
                "method",
                "'method': ACE replaces the loss passed to backward; 'user': keep it (plain ER)",
                choices=CURRENT_LOSS,
            ),
        ),
    )
)
