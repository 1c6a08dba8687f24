"""Structural regularisation: importance-weighted penalties on the weights. Synaptic Intelligence."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import Tensor, nn

from ._base import Synapse
from ._validation import check_non_negative, check_positive, check_positive_int

__all__ = ["SI"]

_STATE_TENSORS = ("omega", "importance", "anchor", "prev_params", "prev_grads")


class SI(Synapse):
    """Synaptic Intelligence (Zenke, Poole & Ganguli 2017, "Continual Learning Through Synaptic
    Intelligence").

    * Path integral (eq. 3): ``omega_k += -g_k * delta_theta_k`` at every step, where ``delta_theta`` is
      the parameter change observed between consecutive ``backward`` calls (whatever the optimizer
      did; it is not wrapped) and ``g`` is the gradient that was applied over that change.
    * Consolidation (eq. 5): ``Omega_k += omega_k / (Delta_k**2 + xi)`` with ``Delta`` the parameter
      change since the previous consolidation; then ``omega = 0`` and the anchor ``theta* = theta``.
      It happens every ``checkpoint_per_steps`` steps (task-free) and at each :meth:`end_task`.
    * Penalty (eq. 4): ``alpha * sum_k Omega_k (theta_k - theta*_k)**2`` is added to the loss. Its
      gradient ``2 alpha Omega (theta - theta*)`` is added to ``.grad`` directly with ``torch._foreach``
      ops, which is exactly the gradient of the summed loss and avoids a graph over all parameters.

    ``g`` is the gradient of the total objective (loss plus penalty), as in the reference
    implementations; the paper's derivation uses the same quantity the optimizer follows.

    Args:
        model: the model being trained.
        model_lr: the learning rate of plain SGD, used only with ``path_integral='sgd'``.
        alpha: strength of the penalty (the paper's ``c``).
        xi: damping ``xi`` of the consolidation (> 0 avoids division by zero).
        checkpoint_per_steps: consolidate every this many ``backward`` calls.
        path_integral: ``'observed'`` (default) measures ``delta_theta``; ``'sgd'`` assumes plain SGD and
            uses ``-g * delta_theta = model_lr * g**2``, the approximation of some reference code.
        scaler: a ``torch.amp.GradScaler`` for mixed precision; pass the unscaled loss to ``backward``.

    Example:
        >>> synapse = SI(model, alpha=1.0, xi=0.9)
        >>> synapse.backward(loss, targets, inputs=inputs)   # instead of loss.backward()
        >>> synapse.end_task()                                # optional: consolidate now
    """

    def __init__(
        self,
        model: nn.Module,
        model_lr: float = 0.01,
        alpha: float = 0.5,
        xi: float = 0.01,
        checkpoint_per_steps: int = 1250,
        *,
        path_integral: str = "observed",
        scaler: Optional[torch.amp.GradScaler] = None,
    ) -> None:
        check_positive("model_lr", model_lr)
        check_non_negative("alpha", alpha)
        check_positive("xi", xi)
        check_positive_int("checkpoint_per_steps", checkpoint_per_steps)
        if path_integral not in ("observed", "sgd"):
            raise ValueError(f"path_integral must be 'observed' or 'sgd', got {path_integral!r}")
        super().__init__(model, scaler=scaler)
        self.model_lr = float(model_lr)
        self.alpha = float(alpha)
        self.xi = float(xi)
        self.checkpoint_per_steps = checkpoint_per_steps
        self.path_integral = path_integral
        self._params: List[nn.Parameter] = self.trainable_parameters()
        self._state: Dict[str, List[Tensor]] = {}
        self._has_pending_step = False  # prev_params/prev_grads describe a step not yet integrated
        self.num_consolidations = 0
        self._steps_since_consolidation = 0

    # ------------------------------------------------------------------ workspaces
    def _tensors(self) -> Dict[str, List[Tensor]]:
        if not self._state or self._state["omega"][0].device != self.device:
            if self._state:
                self._state = {k: [t.to(self.device) for t in v] for k, v in self._state.items()}
            else:
                zeros = lambda: [torch.zeros_like(p, dtype=torch.float32) for p in self._params]  # noqa: E731
                self._state = {name: zeros() for name in (*_STATE_TENSORS, "scratch")}
                torch._foreach_copy_(self._state["anchor"], [p.detach() for p in self._params])
        return self._state

    @property
    def importance(self) -> List[Tensor]:
        """The consolidated importance ``Omega``, one tensor per trainable parameter."""
        return self._tensors()["importance"]

    # ------------------------------------------------------------------ backward
    def _backward(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        s = self._tensors()
        self._integrate_pending_step()
        self._run_backward(loss)
        params = [p.detach() for p in self._params]
        grads = self._gradients(self._params)
        if self.num_consolidations > 0 and self.alpha > 0:
            penalty_grad = s["scratch"]
            torch._foreach_copy_(penalty_grad, params)
            torch._foreach_sub_(penalty_grad, s["anchor"])
            torch._foreach_mul_(penalty_grad, s["importance"])
            scale = self._grad_scale()
            if scale is not None:
                torch._foreach_mul_(penalty_grad, scale)
            torch._foreach_add_(grads, penalty_grad, alpha=2 * self.alpha)
        torch._foreach_copy_(s["prev_params"], params)
        torch._foreach_copy_(s["prev_grads"], grads)
        scale = self._grad_scale()
        if scale is not None:
            torch._foreach_div_(s["prev_grads"], scale)
        self._has_pending_step = True
        self._steps_since_consolidation += 1
        if self._steps_since_consolidation >= self.checkpoint_per_steps:
            self.consolidate(include_pending_step=False)

    def _integrate_pending_step(self) -> None:
        """omega -= g * (theta_now - theta_then) for the step since the last backward."""
        if not self._has_pending_step:
            return
        s = self._state
        contribution = s["scratch"]
        if self.path_integral == "sgd":
            torch._foreach_copy_(contribution, s["prev_grads"])
            torch._foreach_mul_(contribution, s["prev_grads"])
            torch._foreach_mul_(contribution, -self.model_lr)
        else:
            torch._foreach_copy_(contribution, [p.detach() for p in self._params])
            torch._foreach_sub_(contribution, s["prev_params"])
            torch._foreach_mul_(contribution, s["prev_grads"])
        if self.scaler is not None:
            # A step the scaler skipped had inf/nan gradients and no parameter change.
            contribution = [torch.nan_to_num(c, nan=0.0, posinf=0.0, neginf=0.0) for c in contribution]
        torch._foreach_sub_(s["omega"], contribution)
        self._has_pending_step = False

    def _end_task(self) -> None:
        self.consolidate()

    def consolidate(self, include_pending_step: bool = True) -> None:
        """Fold omega into the importance and move the anchor to the current parameters.

        Called automatically every ``checkpoint_per_steps`` steps and by :meth:`end_task`. With
        ``include_pending_step`` the optimizer step that followed the last ``backward`` is integrated
        first (right after ``optimizer.step()``, as at a task end).
        """
        s = self._tensors()
        if include_pending_step:
            self._integrate_pending_step()
        params = [p.detach() for p in self._params]
        denominator = torch._foreach_sub(params, s["anchor"])
        torch._foreach_mul_(denominator, denominator)
        torch._foreach_add_(denominator, self.xi)
        torch._foreach_add_(s["importance"], torch._foreach_div(s["omega"], denominator))
        torch._foreach_zero_(s["omega"])
        torch._foreach_copy_(s["anchor"], params)
        self.num_consolidations += 1
        self._steps_since_consolidation = 0

    # ------------------------------------------------------------------ state
    def _method_state(self) -> Dict[str, Any]:
        s = self._tensors()
        return {
            **{name: [t.clone() for t in s[name]] for name in _STATE_TENSORS},
            "has_pending_step": self._has_pending_step,
            "num_consolidations": self.num_consolidations,
            "steps_since_consolidation": self._steps_since_consolidation,
        }

    def _load_method_state(self, state: Mapping[str, Any]) -> None:
        shapes = [tuple(p.shape) for p in self._params]
        for name in _STATE_TENSORS:
            if name not in state:
                raise ValueError(f"SI state is missing {name!r}")
            got = [tuple(t.shape) for t in state[name]]
            if got != shapes:
                raise ValueError(f"SI state {name!r} has shapes {got}, but the model's parameters have {shapes}")
        loaded = {name: [t.to(self.device, torch.float32).clone() for t in state[name]] for name in _STATE_TENSORS}
        loaded["scratch"] = [torch.zeros_like(t) for t in loaded["omega"]]
        self._state = loaded
        self._has_pending_step = bool(state["has_pending_step"])
        self.num_consolidations = int(state["num_consolidations"])
        self._steps_since_consolidation = int(state["steps_since_consolidation"])
