"""Structural regularisation: importance-weighted penalties on the weights. Synaptic Intelligence."""

from __future__ import annotations

from functools import partial
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .._base import Synapse, TaskBatch
from .._flat import FlatSpace
from .._floor import Floor
from .._validation import check_non_negative, check_positive, check_positive_int
from ..catalog import HParam, MethodSpec, register
from ._penalty import QuadraticPenalty

__all__ = ["SI"]

# Saved in the state dict. The rest are workspaces: "params" (this step's parameters) and "scratch".
_STATE = ("omega", "importance", "anchor", "prev_params", "prev_grads")
_WORKSPACES = ("params", "scratch")


class SI(Synapse):
    """Synaptic Intelligence (Zenke, Poole & Ganguli 2017, "Continual Learning Through Synaptic
    Intelligence").

    Accumulates each parameter's contribution to the loss along the training path (eq. 3), consolidates
    it into an importance ``Omega`` every ``checkpoint_per_steps`` steps and at each :meth:`end_task`
    (eq. 5), and adds ``alpha * sum_k Omega_k (theta_k - theta*_k)**2`` to the loss (eq. 4; its gradient
    goes into ``.grad`` directly). The optimizer is not wrapped: the parameter change is observed between
    ``backward`` calls. The equations: docs/methods/structure.md, "SI in detail".

    Deviations (each explained in the method page):

    * ``g`` in the path integral is the gradient of the total objective, penalty included (as the
      reference implementations).

    Args:
        model: the model being trained.
        model_lr: the learning rate of plain SGD, used only with ``path_integral='sgd'``.
        alpha: strength of the penalty (the paper's ``c``).
        xi: damping ``xi`` of the consolidation (> 0 avoids division by zero).
        checkpoint_per_steps: consolidate every this many ``backward`` calls.
        path_integral: ``'observed'`` (default) measures ``delta_theta``; ``'sgd'`` assumes plain SGD at
            ``model_lr`` (see the method page).
        scaler: a ``torch.amp.GradScaler`` for mixed precision; pass the unscaled loss to ``backward``.

    Example:
        >>> synapse = SI(model, alpha=1.0, xi=0.9)
        >>> for inputs, targets in loader:
        ...     optimizer.zero_grad()
        ...     loss = criterion(model(inputs), targets)
        ...     synapse.backward(loss, targets, inputs=inputs)   # instead of loss.backward()
        ...     optimizer.step()
        >>> synapse.end_task()                                   # optional: consolidate now
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
        self._params: Tuple[nn.Parameter, ...] = tuple(self.trainable_parameters())
        self._flat: Dict[str, FlatSpace] = {}
        self._penalty = QuadraticPenalty(self._params)
        self._has_pending_step = False  # prev_params/prev_grads describe a step not yet integrated
        self.num_consolidations = 0
        self._steps_since_consolidation = 0
        numel = sum(p.numel() for p in self._params)
        for name in _STATE:  # flat float32 vectors; _after_load wraps them
            get = partial(lambda n: self._spaces()[n].flat.clone(), name)
            self.add_state(name, dtype=torch.float32, shape=(numel,), get=get, stash=True)
        self.add_value("has_pending_step", bool, attr="_has_pending_step")
        self.add_value("num_consolidations", int)
        self.add_value("steps_since_consolidation", int, attr="_steps_since_consolidation")

    # ------------------------------------------------------------------ workspaces
    def _spaces(self) -> Dict[str, FlatSpace]:
        """Flat float32 vectors over all trainable parameters, allocated once on the model's device."""
        if not self._flat or self._flat["omega"].flat.device != self.device:
            if self._flat:
                self._flat = {k: FlatSpace(self._params, v.flat.to(self.device)) for k, v in self._flat.items()}
                self._precompute_penalty()
            else:
                self._flat = {name: FlatSpace(self._params) for name in (*_STATE, *_WORKSPACES)}
                torch._foreach_copy_(self._flat["anchor"].views, [p.detach() for p in self._params])
        return self._flat

    def _snapshot_parameters(self, spaces: Dict[str, FlatSpace]) -> Tensor:
        """Copy the current parameters into the flat ``params`` workspace and return it."""
        space = spaces["params"]
        with torch.no_grad():  # cheaper than detaching every parameter
            torch._foreach_copy_(space.views, self._params)
        return space.flat

    @property
    def importance(self) -> List[Tensor]:
        """The consolidated importance ``Omega``, one tensor per trainable parameter."""
        return self._spaces()["importance"].views

    # ------------------------------------------------------------------ backward
    def _backward(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        s = self._spaces()
        theta = self._snapshot_parameters(s)
        self._integrate_pending_step(theta)
        self._run_backward(loss)
        grads = self._gradients(self._params)
        scale = self._grad_scale()
        if self.num_consolidations > 0:
            self._penalty.add_gradient_(grads, theta, scale)  # d/dtheta of alpha sum Omega (theta - theta*)^2
        # This step's parameters become the previous ones: swap the buffers instead of copying.
        s["prev_params"], s["params"] = s["params"], s["prev_params"]
        torch._foreach_copy_(s["prev_grads"].views, grads)
        if scale is not None:
            s["prev_grads"].flat.div_(scale)
        self._has_pending_step = True
        self._steps_since_consolidation += 1
        if self._steps_since_consolidation >= self.checkpoint_per_steps:
            self.consolidate(include_pending_step=False)

    def _integrate_pending_step(self, theta: Tensor) -> None:
        """omega -= g * (theta_now - theta_then) for the step since the last backward."""
        if not self._has_pending_step:
            return
        s = self._flat
        g, omega = s["prev_grads"].flat, s["omega"].flat
        if self.path_integral == "sgd":  # plain SGD moved theta by -lr * g
            change = torch.mul(g, -self.model_lr, out=s["scratch"].flat)
        else:
            change = torch.sub(theta, s["prev_params"].flat, out=s["scratch"].flat)
        if self.scaler is None:
            omega.addcmul_(change, g, value=-1)
        else:
            # A step the scaler skipped had inf/nan gradients and no parameter change: it adds nothing.
            omega.sub_(change.mul_(g).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0))
        self._has_pending_step = False

    def _end_task(self, data: Optional[Iterable[TaskBatch]]) -> None:
        self.consolidate()

    def consolidate(self, include_pending_step: bool = True) -> None:
        """Fold omega into the importance and move the anchor to the current parameters.

        Called automatically every ``checkpoint_per_steps`` steps and by :meth:`end_task`. With
        ``include_pending_step`` the optimizer step that followed the last ``backward`` is integrated
        first (right after ``optimizer.step()``, as at a task end).
        """
        s = self._spaces()
        theta = self._snapshot_parameters(s)
        if include_pending_step:
            self._integrate_pending_step(theta)
        denominator = torch.sub(theta, s["anchor"].flat, out=s["scratch"].flat).square_().add_(self.xi)
        s["importance"].flat.add_(s["omega"].flat / denominator)
        s["omega"].flat.zero_()
        s["anchor"].flat.copy_(theta)
        self._precompute_penalty()
        self.num_consolidations += 1
        self._steps_since_consolidation = 0

    def _precompute_penalty(self) -> None:
        self._penalty.refresh(self._flat["importance"].flat, self._flat["anchor"].flat, self.alpha)

    # ------------------------------------------------------------------ state
    def _after_load(self) -> None:
        self._flat = {name: FlatSpace(self._params, self._stashed(name)) for name in _STATE}
        self._flat.update({name: FlatSpace(self._params) for name in _WORKSPACES})
        self._precompute_penalty()


class _SIFloor(Floor):
    """SI's floor: its six passes over the parameters (snapshot, change, path integral, penalty, add to the
    gradients, keep them), in flat workspaces."""

    def backward(self, loss: Tensor, targets: Tensor, inputs: Tensor, logits: Tensor) -> None:
        theta, last, change, path, grads_kept = (self.space(n) for n in ("a", "b", "c", "d", "e"))
        slope, offset = self.space("f"), self.space("g")
        torch._foreach_copy_(theta.views, [p.detach() for p in self.params])
        torch.sub(theta.flat, last.flat, out=change.flat)  # its change since the last step
        path.flat.addcmul_(change.flat, grads_kept.flat, value=-1)  # the path integral
        self.run_backward((loss,), (self.one,))
        grads = self.grads()
        torch.addcmul(offset.flat, slope.flat, theta.flat, out=change.flat)  # the penalty's gradient
        torch._foreach_add_(grads, change.views)
        self._spaces["a"], self._spaces["b"] = last, theta
        torch._foreach_copy_(grads_kept.views, grads)


register(
    MethodSpec(
        "si",
        SI,
        family="structure",
        order=2,
        floor=_SIFloor,
        paper="Zenke, Poole & Ganguli 2017, *Continual Learning Through Synaptic Intelligence*",
        summary="path-integral importance, quadratic penalty",
        hparams=(
            HParam("alpha", float, 0.5, "penalty strength c", low=0.0),
            HParam("xi", float, 0.01, "damping of the consolidation", low=0.0, low_open=True),
            HParam("checkpoint_per_steps", int, 1250, "consolidate every this many steps (task-free)", low=1),
        ),
    )
)
