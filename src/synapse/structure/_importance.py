"""What EWC and MAS share: a per-sample pass over the finished task's data, and the penalty it feeds.

Both methods, at every :meth:`~synapse.Synapse.end_task`:

1. estimate a per-parameter importance ``sum_n sum_j phi(d s_nj / d theta)`` over the task's data, from
   per-sample gradients of per-sample scalars ``s_nj`` (each method names its scalars and ``phi``).
   Consecutive batches are joined up to ``task_end_batch`` samples; each joined batch runs forward and
   backward once, as in training, and each layer's per-sample gradients come from its input and output
   gradient (:mod:`._per_sample`): for a linear layer, without forming them. Parameters that this cannot
   take apart (other kinds of layer, a layer called twice) get theirs from ``vmap(jacrev(...))`` over
   the samples, with the model called through ``functional_call`` on detached copies of its parameters,
   in chunks that bound its memory. Both give the exact per-sample result, and both differentiate with
   ``torch.autograd.grad`` or ``torch.func``, so ``.grad`` is left alone;
2. fold it into the running importance (each method has its rule) and move the anchor;
3. precompute the :class:`~synapse.structure._penalty.QuadraticPenalty`, whose gradient every later
   ``backward`` adds to ``.grad`` directly: no graph over the parameters, no host sync.

The pass runs the model in eval mode and restores every submodule's own mode afterwards: BatchNorm
normalises with its running statistics and updates none of them, and dropout draws nothing, so the
global RNG is left untouched. Eval mode is also what makes the batched pass exact: every sample's output
then depends on that sample alone, so the gradient at a layer's output, row by row, is each sample's own
(a training-mode pass could not work per sample anyway: batch statistics of one sample are meaningless).
"""

from __future__ import annotations

from abc import abstractmethod
from functools import partial
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from .._base import Synapse, TaskBatch, distributed_world
from .._flat import FlatSpace
from .._validation import check_positive_int
from ..catalog import HParam
from ._penalty import QuadraticPenalty
from ._per_sample import PHIS, LayerwiseSums, vmap_chunk_size

__all__ = ["ImportancePenalty"]

_STATE = ("importance", "anchor")

# The task-end pass joins consecutive batches up to this many samples: its per-batch cost (a forward, a
# backward, the hooks) is then paid once per 128 samples rather than once per small training batch.
TASK_END_BATCH = 128
# EWC's and MAS's shared hyperparameter: how many samples the task-end pass takes per batch.
TASK_END_BATCH_HPARAM = HParam(
    "task_end_batch",
    int,
    TASK_END_BATCH,
    "samples per batch of the task-end pass (consecutive batches joined; the same result)",
    low=1,
)


Batch = Tuple[Tensor, Dict[str, Tensor]]


def joined(batches: Iterable[Batch], size: int) -> Iterator[Batch]:
    """Consecutive ``(targets, inputs)`` batches joined into batches of at most ``size`` samples; a batch
    larger than ``size`` passes whole, and one that cannot join the others (other input names, shapes or
    dtypes) starts a new batch. The importance is a sum over samples: joining changes only the speed."""
    group: List[Batch] = []
    count = 0
    for batch in batches:
        n = batch[0].shape[0]
        if group and (count + n > size or not _joinable(group[0], batch)):
            yield _join(group)
            group, count = [], 0
        group.append(batch)
        count += n
    if group:
        yield _join(group)


def _joinable(a: Batch, b: Batch) -> bool:
    def layout(batch: Batch) -> List[Tuple[str, Tuple[int, ...], torch.dtype, torch.device]]:
        tensors = [("", batch[0]), *sorted(batch[1].items())]
        return [(k, tuple(v.shape[1:]), v.dtype, v.device) for k, v in tensors]

    return layout(a) == layout(b)


def _join(group: List[Batch]) -> Batch:
    if len(group) == 1:
        return group[0]
    targets = torch.cat([t for t, _ in group])
    return targets, {k: torch.cat([inputs[k] for _, inputs in group]) for k in group[0][1]}


class ImportancePenalty(Synapse):
    """Base of the methods whose penalty is ``strength * sum_k Omega_k (theta_k - theta*_k)**2`` with an
    importance ``Omega`` estimated over each finished task's data (EWC, MAS).

    A subclass defines :meth:`_scalars` (the per-sample scalars whose gradients make the importance),
    ``_phi`` (``'square'`` or ``'abs'``, applied to each per-sample gradient before summing over the
    samples) and :meth:`_fold` (how a task's importance joins the running one, and the anchor).
    Parameters with ``requires_grad=False`` when the method is built are left out: no importance, no
    penalty; the pass treats them as constants.
    """

    needs_task_data = True
    _phi = "square"

    def __init__(
        self,
        model: nn.Module,
        strength: float,
        *,
        task_end_batch: int = TASK_END_BATCH,
        scaler: Optional[torch.amp.GradScaler] = None,
    ) -> None:
        check_positive_int("task_end_batch", task_end_batch)
        super().__init__(model, scaler=scaler)
        self.task_end_batch = int(task_end_batch)
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

        total = FlatSpace(self._params)
        count = 0
        invalid: Optional[Tensor] = None
        layerwise = LayerwiseSums(module, self._names, self._phi)
        modes = [(m, m.training) for m in module.modules()]
        module.eval()
        try:
            with torch.no_grad():  # the passes differentiate inside regardless; nothing else records
                for targets, inputs in joined(self._on_device(data), self.task_end_batch):
                    sums, bad = self._batch_importance(layerwise, params, constants, inputs, targets)
                    torch._foreach_add_(total.views, [sums[n] for n in self._names])
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

    def _on_device(self, data: Iterable[TaskBatch]) -> Iterator[Tuple[Tensor, Dict[str, Tensor]]]:
        """The task's non-empty batches, checked, on the model's device."""
        for targets, inputs in self._iter_task_data(data):
            if targets.shape[0] > 0:
                yield targets.to(self.device), {k: v.to(self.device) for k, v in inputs.items()}

    def _batch_importance(
        self,
        layerwise: LayerwiseSums,
        params: Dict[str, Tensor],
        constants: Dict[str, Tensor],
        inputs: Dict[str, Tensor],
        targets: Tensor,
    ) -> Tuple[Dict[str, Tensor], Optional[Tensor]]:
        """``sum_n sum_j phi(d s_nj / d theta)`` over one batch for every parameter (float32, by name), and
        the batch's invalid flag: layer by layer where it can, by ``vmap`` over the model for the rest."""

        widths: List[int] = []

        def scalars(output: Tensor) -> List[Tensor]:
            found = self._scalars(output, targets)
            widths.append(len(found))
            return found

        output, sums = layerwise(inputs, scalars)
        rest = {n: p for n, p in params.items() if n not in sums}
        if rest:
            frozen = {**constants, **{n: params[n] for n in sums}}
            sums.update(self._vmap_sums(rest, frozen, inputs, targets, widths[0]))
        return sums, self._invalid(output.detach(), targets)

    def _vmap_sums(
        self,
        params: Dict[str, Tensor],
        constants: Dict[str, Tensor],
        inputs: Dict[str, Tensor],
        targets: Tensor,
        width: int,
    ) -> Dict[str, Tensor]:
        """The same sums for ``params`` from per-sample Jacobians of the per-sample scalars (``vmap`` of
        ``jacrev`` over the whole model), in chunks of the batch that keep them within a memory budget."""
        module = self.module

        def per_sample(p: Dict[str, Tensor], sample: Dict[str, Tensor], target: Tensor) -> Tensor:
            batch_of_one = {k: v.unsqueeze(0) for k, v in sample.items()}
            out = functional_call(module, (p, constants), args=(), kwargs=batch_of_one)
            if not isinstance(out, Tensor):
                raise TypeError(f"{type(self).__name__} needs the model to return a tensor, got {type(out).__name__}")
            return torch.stack([s[0] for s in self._scalars(out, target.unsqueeze(0))])

        f = PHIS[self._phi]
        numel = sum(p.numel() for p in params.values())
        chunk = vmap_chunk_size(numel * width, targets.shape[0])
        jac = vmap(jacrev(per_sample), in_dims=(None, 0, 0), chunk_size=chunk)(params, inputs, targets)
        return {n: f(g.float()).sum((0, 1)) for n, g in jac.items()}

    @abstractmethod
    def _scalars(self, output: Tensor, targets: Tensor) -> List[Tensor]:
        """From the model's output for a batch (batch first), the per-sample scalars ``s_j`` whose gradients
        make the importance, each of shape ``(batch,)``; raises if the output has the wrong shape."""

    def _invalid(self, output: Tensor, targets: Tensor) -> Optional[Tensor]:
        """A 0-d bool tensor, true when the batch was invalid (or None when nothing needs checking)."""
        return None

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
