"""Memory Aware Synapses: importance from the sensitivity of the output's squared norm."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from .._floor import PenaltyFloor
from .._validation import check_non_negative
from ..catalog import HParam, MethodSpec, register
from ..functional import mas_importance
from ._importance import ImportancePenalty, SampleForward

__all__ = ["MAS"]


class MAS(ImportancePenalty):
    """Memory Aware Synapses (Aljundi, Babiloni, Elhoseiny, Rohrbach & Tuytelaars 2018, "Memory Aware
    Synapses: Learning what (not) to forget", ECCV).

    * **Importance** (eqs. 2-3): ``Omega_k = 1/N sum_n |g_k(x_n)|`` with
      ``g(x_n) = d ||f(x_n)||_2^2 / d theta`` the gradient, *per sample*, of the squared L2 norm of the
      model's output ``f(x)``: the logits, before any softmax, over all of the output's entries. It needs
      no labels. The per-sample gradients come from ``torch.func`` (``vmap`` of ``grad`` over each batch).
      The authors' code offers a batched shortcut (``|d sum_n ||f(x_n)||^2 / d theta|``, the absolute
      value of a sum rather than a sum of absolute values); this class computes eq. 2 as written, which is
      also their code's batch-size-1 setting.
    * **Across tasks**: at each :meth:`end_task`, ``Omega`` is estimated on the finished task's data and
      accumulated, ``Omega <- Omega + Omega_new`` (the authors' code adds the new importance to the
      stored one); the anchor ``theta*`` becomes the parameters at that task end.
    * **Penalty** (eq. 4): ``mas_lambda * sum_k Omega_k (theta_k - theta*_k)**2``, with no 1/2, so its
      gradient ``2 mas_lambda Omega (theta - theta*)`` (as in the authors' code) is added to ``.grad``
      directly: no graph, no host sync.

    The paper's multi-head experiments take ``f`` as the head of the task at hand; here ``f`` is the whole
    output the model returns. The pass runs the model in eval mode, as the authors' code does (no BatchNorm
    update, no dropout, the RNG untouched), and restores each submodule's mode afterwards. In a distributed
    run ``Omega_new`` is averaged over every rank's samples. Parameters with ``requires_grad=False`` get no
    importance and no penalty.

    Args:
        model: the model being trained; its output must be a tensor (``(batch, ...)``).
        mas_lambda: strength ``lambda`` of eq. 4 (>= 0). Default 1: the authors' value for their object
            recognition experiments (their code: "In object recognition it was set to 1").
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

    def __init__(
        self, model: nn.Module, mas_lambda: float = 1.0, *, scaler: Optional[torch.amp.GradScaler] = None
    ) -> None:
        check_non_negative("mas_lambda", mas_lambda)
        super().__init__(model, mas_lambda, scaler=scaler)
        self.mas_lambda = float(mas_lambda)

    def _batch_importance(
        self, forward: SampleForward, params: Dict[str, Tensor], inputs: Dict[str, Tensor], targets: Tensor
    ) -> Tuple[List[Tensor], Optional[Tensor]]:
        def squared_norm(p: Dict[str, Tensor], sample: Dict[str, Tensor]) -> Tensor:
            return forward(p, sample).float().square().sum()

        grads = vmap(grad(squared_norm), in_dims=(None, 0))(params, inputs)
        return mas_importance(self._ordered(grads), reduction="sum"), None

    def _fold(self, importance: Tensor, anchor: Tensor, new: Tensor, theta: Tensor) -> None:
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
        hparams=(HParam("mas_lambda", float, 1.0, "penalty strength lambda", low=0.0),),
    )
)
