"""Memory Aware Synapses: importance from the sensitivity of the output's squared norm."""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor, nn

from .._floor import PenaltyFloor
from .._validation import check_non_negative
from ..catalog import HParam, MethodSpec, register
from ._importance import TASK_END_BATCH, TASK_END_BATCH_HPARAM, ImportancePenalty

__all__ = ["MAS"]

ACCUMULATE = ("sum", "average")  # the authors' code's sum; Avalanche's running average


class MAS(ImportancePenalty):
    """Memory Aware Synapses (Aljundi, Babiloni, Elhoseiny, Rohrbach & Tuytelaars 2018, "Memory Aware
    Synapses: Learning what (not) to forget", ECCV).

    Adds ``mas_lambda * sum_k Omega_k (theta_k - theta*_k)**2`` to the loss (its gradient goes into
    ``.grad`` directly, no host sync). The importance ``Omega`` is the mean absolute per-sample gradient of
    the squared L2 norm of the model's output (no labels needed), estimated exactly at each
    :meth:`end_task` on the task's data, in eval mode, and accumulated across tasks (summed, as the
    authors' code does, or, with ``accumulate="average"``, Avalanche's running average); the anchor is the
    parameters at the latest task end. Frozen parameters get no penalty; a distributed run averages the
    importance over every rank. The equations: docs/methods/structure.md, "MAS in detail".

    Deviations (each explained in the method page):

    * ``f`` is the model's whole output, not the head of the task at hand.
    * Eq. 2 as written (a sum of absolute per-sample gradients), not the authors' batched shortcut.
    * ``accumulate="average"`` is Avalanche's rule, not the paper's (an option; the default is the sum).

    Args:
        model: the model being trained; its output must be a tensor (``(batch, ...)``).
        mas_lambda: strength ``lambda`` of eq. 4 (>= 0). Default 1: the authors' value for their object
            recognition experiments (their code: "In object recognition it was set to 1").
        accumulate: how a task's importance joins the running one: ``"sum"`` (the authors' code) or
            ``"average"`` (Avalanche's running average, which does not grow with the number of tasks; the
            reproduction's presets, see the method page).
        alpha: the running average's weight on the old importance, in ``[0, 1]`` (``accumulate="average"``
            only). Default 0.5: Avalanche's.
        task_end_batch: the task-end pass joins consecutive batches of the data into batches of up to this
            many samples (never splitting one): fewer, larger passes, the same result to float rounding.
            Lower it if a batch this large does not fit in memory.
        scaler: a ``torch.amp.GradScaler`` for mixed precision; pass the unscaled loss to ``backward``.

    Example:
        >>> from synapse import named_batches
        >>> synapse = MAS(model, mas_lambda=1.0)
        >>> for task in tasks:
        ...     for inputs, targets in task:
        ...         optimizer.zero_grad()
        ...         loss = criterion(model(inputs), targets)
        ...         synapse.backward(loss, targets, inputs=inputs)   # instead of loss.backward()
        ...         optimizer.step()
        ...     synapse.end_task(named_batches(task))   # importances over the task's (targets, {"inputs": x})
    """

    _phi = "abs"  # eq. 2: the mean of the absolute per-sample gradients

    def __init__(
        self,
        model: nn.Module,
        mas_lambda: float = 1.0,
        *,
        accumulate: str = "sum",
        alpha: float = 0.5,
        task_end_batch: int = TASK_END_BATCH,
        scaler: Optional[torch.amp.GradScaler] = None,
    ) -> None:
        check_non_negative("mas_lambda", mas_lambda)
        if accumulate not in ACCUMULATE:
            raise ValueError(f"accumulate must be one of {ACCUMULATE}, got {accumulate!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        super().__init__(model, mas_lambda, task_end_batch=task_end_batch, scaler=scaler)
        self.mas_lambda = float(mas_lambda)
        self.accumulate = accumulate
        self.alpha = float(alpha)

    def _scalars(self, output: Tensor, targets: Tensor) -> List[Tensor]:
        """``||f(x_n)||_2^2`` over all of the output's entries, per sample."""
        return [output.float().square().flatten(1).sum(1)]

    def _fold(self, importance: Tensor, anchor: Tensor, new: Tensor, theta: Tensor) -> None:
        if self.accumulate == "average" and self.num_estimates > 0:
            importance.mul_(self.alpha).add_(new, alpha=1.0 - self.alpha)
        else:  # the sum, and the running average's first task (the running importance is still 0)
            importance.add_(new)
        anchor.copy_(theta)


register(
    MethodSpec(
        "mas",
        MAS,
        family="structure",
        order=4,
        floor=PenaltyFloor,
        paper="Aljundi et al. 2018, *Memory Aware Synapses: Learning what (not) to forget*",
        summary="output-sensitivity importance, quadratic penalty",
        hparams=(
            HParam("mas_lambda", float, 1.0, "penalty strength lambda", low=0.0),
            HParam(
                "accumulate",
                str,
                "sum",
                "across tasks: the authors' sum, or Avalanche's running average",
                choices=ACCUMULATE,
            ),
            HParam("alpha", float, 0.5, "the running average's weight on the old importance", low=0.0, high=1.0),
            TASK_END_BATCH_HPARAM,
        ),
    )
)
