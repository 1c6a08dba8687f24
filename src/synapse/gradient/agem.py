"""Gradient constraints and projection: A-GEM."""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _autograd
from .._base import BufferedSynapse, TaskBatch, distributed_world
from .._flat import FlatSpace
from .._floor import Floor
from ..augment import Transform
from ..buffer import fresh_seed
from ..catalog import HParam, MethodSpec, register
from ..episodic import EpisodicMemory
from ..functional import project_conflicting_

__all__ = ["AGEM"]

MEMORIES = ("reservoir", "episodic")


class AGEM(BufferedSynapse):
    """Averaged Gradient Episodic Memory (Chaudhry et al. 2019, "Efficient Lifelong Learning with A-GEM").

    Each step computes a reference gradient ``r`` on a minibatch from the memory; a current gradient ``g``
    that conflicts with it (``g.r < 0``) is projected to ``g - (g.r / r.r) r`` (eq. 11), on the device
    with no host sync. Under DDP the reference gradient is all-reduced. The memory and the projection:
    docs/methods/gradient.md, "A-GEM in detail".

    Deviations (each explained in the method page):

    * ``memory='reservoir'`` (default) samples the whole stream, current task included: the DER authors'
      ``agem_r``; ``'episodic'`` is the paper's per-task memory (needs :meth:`end_task`).
    * The episodic budget is split among the tasks seen so far, not a known number of tasks.

    Args:
        model: the model being trained (may be wrapped in DDP or ``torch.compile``).
        buffer_size: items kept in the reservoir (per rank in a distributed run).
        buffer_sample_size: items in the reference minibatch.
        memory: ``'reservoir'`` (default, task-free) or ``'episodic'`` (the paper's, per task; see the method page).
        buffer_scope: ``'rank'`` (default): every rank of a distributed run keeps ``buffer_size`` items of
            its own stream; ``'global'``: ``buffer_size`` is the whole run's budget, split across ranks.
        scaler: a ``torch.amp.GradScaler`` for mixed precision; pass the unscaled loss to ``backward``.
        replay_transform: augments every reference minibatch on the device, as in :class:`~synapse.rehearsal.ER`
            (default None: replay what was stored).

    Example:
        >>> synapse = AGEM(model, buffer_size=500, buffer_sample_size=128)
        >>> for inputs, targets in loader:
        ...     optimizer.zero_grad()
        ...     loss = criterion(model(inputs), targets)
        ...     synapse.backward(loss, targets, inputs=inputs)   # instead of loss.backward()
        ...     optimizer.step()
    """

    def __init__(
        self,
        model: nn.Module,
        buffer_size: int = 1024,
        buffer_sample_size: int = 32,
        *,
        buffer_scope: str = "rank",
        scaler: Optional[torch.amp.GradScaler] = None,
        replay_transform: Optional[Transform] = None,
        memory: str = "reservoir",
    ) -> None:
        if memory not in MEMORIES:
            raise ValueError(f"memory must be one of {MEMORIES}, got {memory!r}")
        super().__init__(
            model,
            buffer_size,
            buffer_sample_size,
            buffer_scope=buffer_scope,
            scaler=scaler,
            replay_transform=replay_transform,
        )
        self.memory = memory
        if memory == "episodic":  # the same budget, split per task instead of one reservoir
            self.acts_at_task_end = True  # only ended tasks constrain: without end_task() it is fine-tuning
            self.buffer = EpisodicMemory(self.buffer.capacity, seed=fresh_seed())
        self._params: List[nn.Parameter] = self.trainable_parameters()
        self._reference: Optional[FlatSpace] = None
        self._current: Optional[FlatSpace] = None

    def _workspaces(self) -> tuple:
        if self._reference is None or self._reference.flat.device != self.device:
            self._reference = FlatSpace(self._params)
            self._current = FlatSpace(self._params)
        return self._reference, self._current

    def _has_reference(self) -> bool:
        """Whether a reference minibatch exists (host counters only)."""
        if isinstance(self.buffer, EpisodicMemory):
            return self.buffer.num_tasks > 0  # only finished tasks are constraints
        return len(self.buffer) > 0

    def _sample(self, num_minibatches: int = 1, names: Optional[Sequence[str]] = None) -> Dict[str, Tensor]:
        if isinstance(self.buffer, EpisodicMemory):
            self._follow_model_device()
            return self._replaying(self._augment_replay(self.buffer.sample(self.buffer_sample_size, names=names)))
        return super()._sample(num_minibatches, names)

    def _end_task(self, data: Optional[Iterable[TaskBatch]]) -> None:
        if isinstance(self.buffer, EpisodicMemory):
            self.buffer.end_task()

    def _backward(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        has_memory = self._has_reference()
        if has_memory:
            reference, current = self._workspaces()
            self._reference_gradient(reference)
        self._run_backward(loss)
        if has_memory:
            # A parameter unused this step still gets a gradient: its projection may be non-zero.
            grads = self._gradients(self._params)
            torch._foreach_copy_(current.views, grads)
            project_conflicting_(current.flat, reference.flat)
            torch._foreach_copy_(grads, current.views)
        self._store(targets, model_inputs)

    def _reference_gradient(self, reference: FlatSpace) -> None:
        sample = self._sample(1)
        # The inner module, not the DDP wrapper: this backward must not trigger DDP's gradient sync.
        ref_loss = F.cross_entropy(self.module(**self._inputs_of(sample)), sample["targets"])
        if self.scaler is not None:
            ref_loss = self.scaler.scale(ref_loss)  # same scale as the current gradient
        grads = _autograd.grad(ref_loss, self._constant(1.0, ref_loss), self._params)
        torch._foreach_copy_(
            reference.views, [g if g is not None else torch.zeros_like(v) for g, v in zip(grads, reference.views)]
        )
        world = distributed_world()
        if world > 1:
            dist.all_reduce(reference.flat)
            reference.flat.div_(world)


class _AGEMFloor(Floor):
    """A-GEM's floor: a reference gradient on a memory minibatch, flat copies, the projection."""

    def backward(self, loss: Tensor, targets: Tensor, inputs: Tensor, logits: Tensor) -> None:
        idx = self.draw()
        ref_loss = F.cross_entropy(self.model(self.x.index_select(0, idx)), self.y.index_select(0, idx))
        reference, current = self.space("reference"), self.space("current")
        torch._foreach_copy_(reference.views, self.gradient_of(ref_loss))
        self.run_backward((loss,), (self.one,))
        grads = self.grads()
        torch._foreach_copy_(current.views, grads)
        project_conflicting_(current.flat, reference.flat)
        torch._foreach_copy_(grads, current.views)


register(
    MethodSpec(
        "agem",
        AGEM,
        family="gradient",
        display="A-GEM",
        order=6,
        floor=_AGEMFloor,
        paper="Chaudhry et al. 2019, *Efficient Lifelong Learning with A-GEM*",
        summary="project the gradient when it conflicts with a memory minibatch's",
        hparams=(
            HParam(
                "memory",
                str,
                "reservoir",
                "reservoir: one sample of the stream (task-free); episodic: per task, past tasks only",
                choices=MEMORIES,
            ),
        ),
    )
)
