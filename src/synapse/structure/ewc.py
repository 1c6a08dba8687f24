"""Elastic Weight Consolidation: a diagonal-Fisher quadratic penalty, per task or online."""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor, nn

from .._floor import PenaltyFloor
from .._validation import check_non_negative
from ..catalog import HParam, MethodSpec, register
from ..functional import merge_quadratic_penalties
from ._importance import TASK_END_BATCH, TASK_END_BATCH_HPARAM, ImportancePenalty

__all__ = ["EWC"]

MODES = ("online", "separate")
FISHERS = ("empirical", "true")


class EWC(ImportancePenalty):
    """Elastic Weight Consolidation (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural
    networks", PNAS), and online EWC (Schwarz et al. 2018, "Progress & Compress: A scalable framework for
    continual learning").

    Adds ``ewc_lambda * sum_k F_k (theta_k - theta*_k)**2`` to the loss (its gradient goes into ``.grad``
    directly, no host sync), with ``F`` the diagonal Fisher estimated at each :meth:`end_task` from the
    task's data with exact per-sample gradients, in eval mode. ``fisher='empirical'`` (default) uses the
    true labels, ``'true'`` the model's predictive distribution (one backward per class). ``mode='online'``
    (default) keeps one running Fisher ``F <- gamma F + F_new`` and one anchor; ``'separate'`` one penalty
    per task, merged into one quadratic (:func:`~synapse.functional.merge_quadratic_penalties`). The
    model's output must be ``(batch, classes)`` logits; frozen parameters get no penalty; a distributed
    run averages the Fisher over every rank. The equations and the cost of a task end:
    docs/methods/structure.md, "EWC in detail".

    Deviations (each explained in the method page):

    * ``ewc_lambda`` is Kirkpatrick's ``lambda / 2`` (the DER authors' ``e_lambda``).
    * The empirical Fisher averages plain squared gradients (Mammoth weighs them by ``p(y | x)``).
    * Online mode has no extra ``gamma`` inside the penalty (as Mammoth).
    * The Fisher pass runs in eval mode (Mammoth's ``ewc_on`` does not switch modes).

    Args:
        model: the model being trained.
        ewc_lambda: strength ``lambda/2`` (>= 0). Default 90: Mammoth's best ``e_lambda`` for seq-mnist
            (``utils/best_args.py``, with lr 0.03 and batch 10).
        gamma: decay of the old Fisher in ``mode='online'``, in [0, 1]; 1 (Mammoth's seq-mnist best) keeps
            it whole. Only 1 is accepted with ``mode='separate'``.
        mode: ``'online'`` or ``'separate'``.
        fisher: ``'empirical'`` or ``'true'``.
        task_end_batch: the task-end pass joins consecutive batches of the data into batches of up to this
            many samples (never splitting one): fewer, larger passes, the same result to float rounding.
            Lower it if a batch this large does not fit in memory.
        scaler: a ``torch.amp.GradScaler`` for mixed precision; pass the unscaled loss to ``backward``.

    Example:
        >>> from synapse import named_batches
        >>> synapse = EWC(model, ewc_lambda=90.0)
        >>> for task in tasks:
        ...     for inputs, targets in task:
        ...         optimizer.zero_grad()
        ...         loss = criterion(model(inputs), targets)
        ...         synapse.backward(loss, targets, inputs=inputs)   # instead of loss.backward()
        ...         optimizer.step()
        ...     synapse.end_task(named_batches(task))   # the Fisher over the task's (targets, {"inputs": x})
    """

    def __init__(
        self,
        model: nn.Module,
        ewc_lambda: float = 90.0,
        gamma: float = 1.0,
        *,
        mode: str = "online",
        fisher: str = "empirical",
        task_end_batch: int = TASK_END_BATCH,
        scaler: Optional[torch.amp.GradScaler] = None,
    ) -> None:
        check_non_negative("ewc_lambda", ewc_lambda)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 1:
            raise ValueError(f"gamma must be a number in [0, 1], got {gamma!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "separate" and gamma != 1:
            raise ValueError(f"gamma decays the online Fisher only: mode='separate' takes gamma=1, got {gamma!r}")
        if fisher not in FISHERS:
            raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
        super().__init__(model, ewc_lambda, task_end_batch=task_end_batch, scaler=scaler)
        self.ewc_lambda = float(ewc_lambda)
        self.gamma = float(gamma)
        self.mode = mode
        self.fisher = fisher

    def _scalars(self, output: Tensor, targets: Tensor) -> List[Tensor]:
        """``log p(y_n | x_n)`` (empirical), or ``sqrt(p_c) log p(c | x_n)`` for every class ``c`` (true),
        the square root detached: the square of its gradient is ``p_c (d log p_c / d theta)**2``."""
        if output.dim() != 2:
            raise ValueError(
                "EWC needs the model's output to be (batch, classes) logits; "
                f"one sample's output has shape {tuple(output.shape[1:])}"
            )
        log_p = output.float().log_softmax(-1)
        if self.fisher == "true":
            root_p = log_p.detach().mul(0.5).exp()
            return list((root_p * log_p).unbind(1))
        # Clamped so that a bad label cannot index out of bounds on the device; such a batch is reported
        # after the pass, before any state changes.
        return [log_p.gather(1, targets.clamp(0, log_p.shape[1] - 1).unsqueeze(1)).squeeze(1)]

    def _invalid(self, output: Tensor, targets: Tensor) -> Optional[Tensor]:
        return ((targets < 0) | (targets >= output.shape[-1])).any()

    def _invalid_data_message(self) -> str:
        return "EWC.end_task(data): targets must be class indices in [0, number of the model's outputs)"

    def _fold(self, importance: Tensor, anchor: Tensor, new: Tensor, theta: Tensor) -> None:
        if self.mode == "online":
            importance.mul_(self.gamma).add_(new)
            anchor.copy_(theta)
        else:
            (total,), (merged,) = merge_quadratic_penalties([[importance], [new]], [[anchor], [theta]])
            importance.copy_(total)
            anchor.copy_(merged)


register(
    MethodSpec(
        "ewc",
        EWC,
        family="structure",
        display="EWC (online)",
        order=3,
        floor=PenaltyFloor,
        paper="Kirkpatrick et al. 2017, *Overcoming catastrophic forgetting in neural networks*; "
        "online: Schwarz et al. 2018, *Progress & Compress*",
        summary="diagonal-Fisher quadratic penalty (online or one per task)",
        hparams=(
            HParam("ewc_lambda", float, 90.0, "penalty strength (lambda/2 of the paper; Mammoth's e_lambda)", low=0.0),
            HParam("gamma", float, 1.0, "decay of the old Fisher (online mode)", low=0.0, high=1.0),
            HParam("mode", str, "online", "one running Fisher and anchor, or one per task", choices=MODES),
            HParam(
                "fisher",
                str,
                "empirical",
                "Fisher of the true labels, or under the model's predictions",
                choices=FISHERS,
            ),
            TASK_END_BATCH_HPARAM,
        ),
    )
)
