"""What EWC and MAS share: a per-sample pass over the finished task's data, and the penalty it feeds.

Both methods, at every :meth:`~synapse.Synapse.end_task`:

1. estimate a per-parameter importance from per-sample gradients over the task's data. The gradients
   come from ``torch.func``: ``vmap(grad(f))`` over each batch as given, with the model called through
   ``functional_call`` on detached copies of its parameters, so the pass builds no graph on the model,
   leaves ``.grad`` alone and runs one vectorised backward per batch instead of a loop over samples;
2. fold it into the running importance (each method has its rule) and move the anchor;
3. precompute the :class:`~synapse.structure._penalty.QuadraticPenalty`, whose gradient every later
   ``backward`` adds to ``.grad`` directly: no graph over the parameters, no host sync.

The pass runs the model in eval mode and restores every submodule's own mode afterwards: BatchNorm
normalises with its running statistics and updates none of them (its buffers are passed to
``functional_call`` as they are), and dropout draws nothing, so the global RNG is left untouched. A
training-mode pass could not work per sample anyway: batch statistics of one sample are meaningless.
"""

from __future__ import annotations

from abc import abstractmethod
from functools import partial
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call

from .._base import Synapse, TaskBatch, distributed_world
from .._flat import FlatSpace
from ._penalty import QuadraticPenalty

__all__ = ["ImportancePenalty", "SampleForward"]

# forward(params, sample) -> the model's output for one sample (no batch dimension).
SampleForward = Callable[[Dict[str, Tensor], Dict[str, Tensor]], Tensor]

_STATE = ("importance", "anchor")


class ImportancePenalty(Synapse):
    """Base of the methods whose penalty is ``strength * sum_k Omega_k (theta_k - theta*_k)**2`` with an
    importance ``Omega`` estimated over each finished task's data (EWC, MAS).

    A subclass defines :meth:`_batch_importance` (the importance summed over one batch, from per-sample
    gradients) and :meth:`_fold` (how a task's importance joins the running one, and the anchor).
    Parameters with ``requires_grad=False`` when the method is built are left out: no importance, no
    penalty; the pass treats them as constants.
    """

    needs_task_data = True

    def __init__(self, model: nn.Module, strength: float, *, scaler: Optional[torch.amp.GradScaler] = None) -> None:
        super().__init__(model, scaler=scaler)
        self._strength = float(strength)
        self._params: Tuple[nn.Parameter, ...] = tuple(self.trainable_parameters())
        trainable = {id(p) for p in self._params}
        # named_parameters() walks the module as parameters() does (shared parameters once), so the
        # names line up with self._params.
        self._names = tuple(n for n, p in self.module.named_parameters() if id(p) in trainable)
        self._penalty = QuadraticPenalty(self._params)
        self._flat: Dict[str, FlatSpace] = {}
        self.num_estimates = 0  # task-end estimates folded in so far
        numel = sum(p.numel() for p in self._params)
        for name in _STATE:  # flat float32 vectors; _after_load wraps them
            get = partial(lambda n: self._spaces()[n].flat.clone(), name)
            self.add_state(name, dtype=torch.float32, shape=(numel,), get=get, stash=True)
        self.add_value("num_estimates", int)

    # ------------------------------------------------------------------ workspaces
    def _spaces(self) -> Dict[str, FlatSpace]:
        """Flat float32 ``importance`` and ``anchor`` (and a ``params`` workspace) on the model's device."""
        if not self._flat:
            self._flat = {name: FlatSpace(self._params) for name in (*_STATE, "params")}
        elif self._flat["importance"].flat.device != self.device:  # the model moved: follow it
            self._flat = {k: FlatSpace(self._params, v.flat.to(self.device)) for k, v in self._flat.items()}
            self._refresh()
        return self._flat

    def _snapshot_parameters(self) -> Tensor:
        space = self._spaces()["params"]
        with torch.no_grad():
            torch._foreach_copy_(space.views, self._params)
        return space.flat

    def _refresh(self) -> None:
        if self.num_estimates > 0:
            self._penalty.refresh(self._flat["importance"].flat, self._flat["anchor"].flat, self._strength)
        else:
            self._penalty.active = False

    @property
    def importance(self) -> List[Tensor]:
        """The running importance, one float32 tensor per trainable parameter."""
        return self._spaces()["importance"].views

    @property
    def anchor(self) -> List[Tensor]:
        """The anchor ``theta*`` the penalty pulls towards, one tensor per trainable parameter."""
        return self._spaces()["anchor"].views

    # ------------------------------------------------------------------ backward
    def _backward(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        self._run_backward(loss)
        if self._penalty.active:  # a host flag: no task has ended yet, or the strength is 0
            grads = self._gradients(self._params)
            theta = self._snapshot_parameters()
            self._penalty.add_gradient_(grads, theta, self._grad_scale())

    # ------------------------------------------------------------------ task end
    def _end_task(self, data: Optional[Iterable[TaskBatch]]) -> None:
        assert data is not None  # the base raises without data (needs_task_data)
        new = self._estimate(data)  # every check happens in here, before any state changes
        s = self._spaces()
        theta = self._snapshot_parameters()
        self._fold(s["importance"].flat, s["anchor"].flat, new, theta)
        self.num_estimates += 1
        self._refresh()

    def _estimate(self, data: Iterable[TaskBatch]) -> Tensor:
        """This task's importance, averaged over its samples (and over the ranks' samples when distributed),
        as one flat float32 tensor."""
        module = self.module
        params = dict(zip(self._names, (p.detach() for p in self._params)))
        constants: Dict[str, Tensor] = {n: p.detach() for n, p in module.named_parameters() if n not in params}
        constants.update(module.named_buffers())

        def forward(p: Dict[str, Tensor], sample: Dict[str, Tensor]) -> Tensor:
            batch_of_one = {k: v.unsqueeze(0) for k, v in sample.items()}
            out = functional_call(module, (p, constants), args=(), kwargs=batch_of_one)
            if not isinstance(out, Tensor):
                raise TypeError(f"{type(self).__name__} needs the model to return a tensor, got {type(out).__name__}")
            return out[0]

        total = FlatSpace(self._params)
        count = 0
        invalid: Optional[Tensor] = None
        modes = [(m, m.training) for m in module.modules()]
        module.eval()
        try:
            with torch.no_grad():  # torch.func.grad differentiates inside regardless; nothing else records
                for targets, inputs in self._iter_task_data(data):
                    if targets.shape[0] == 0:
                        continue
                    targets = targets.to(self.device)
                    inputs = {k: v.to(self.device) for k, v in inputs.items()}
                    sums, bad = self._batch_importance(forward, params, inputs, targets)
                    torch._foreach_add_(total.views, sums)
                    count += targets.shape[0]
                    if bad is not None:
                        invalid = bad if invalid is None else invalid | bad
        finally:
            for m, training in modes:  # each submodule's own mode, as it was
                m.training = training
        if count == 0:
            raise ValueError(f"{type(self).__name__}.end_task(data): data held no samples")
        if invalid is not None and bool(invalid):  # the pass's one host sync, after all its work is queued
            raise ValueError(self._invalid_data_message())
        if distributed_world() > 1:  # every rank holds the same importance: the mean over all ranks' samples
            counts = torch.tensor([float(count)], dtype=torch.float64, device=self.device)
            dist.all_reduce(total.flat)
            dist.all_reduce(counts)
            return total.flat.div_(counts.to(torch.float32))
        return total.flat.div_(count)

    def _ordered(self, per_name: Mapping[str, Tensor]) -> List[Tensor]:
        """Per-parameter tensors from a ``{name: tensor}`` dict, in parameter order, as float32."""
        return [per_name[n].float() for n in self._names]

    @abstractmethod
    def _batch_importance(
        self, forward: SampleForward, params: Dict[str, Tensor], inputs: Dict[str, Tensor], targets: Tensor
    ) -> Tuple[List[Tensor], Optional[Tensor]]:
        """The importance summed over one batch's samples (float32, in parameter order), and a 0-d bool
        tensor that is true when the batch was invalid (or None when nothing needs checking)."""

    def _invalid_data_message(self) -> str:
        return f"{type(self).__name__}.end_task(data): invalid data"

    @abstractmethod
    def _fold(self, importance: Tensor, anchor: Tensor, new: Tensor, theta: Tensor) -> None:
        """Fold this task's importance ``new`` into ``importance`` and set ``anchor``, in place (flat)."""

    # ------------------------------------------------------------------ state
    def _after_load(self) -> None:
        self._flat = {n: FlatSpace(self._params, self._stashed(n)) for n in _STATE}
        self._flat["params"] = FlatSpace(self._params)
        self._refresh()
