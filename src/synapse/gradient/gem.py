"""Gradient Episodic Memory: one constraint per past task, enforced by GEM's dual QP."""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _autograd
from .._base import Synapse, TaskBatch, distributed_world
from .._flat import FlatSpace
from .._floor import Floor
from .._validation import check_non_negative, check_positive_int
from ..buffer import fresh_seed
from ..catalog import HParam, MethodSpec, register
from ..episodic import EpisodicMemory
from ..functional import gem_project_

__all__ = ["GEM"]

# The authors' code adds this to the diagonal of G G' before solving the QP.
QP_EPS = 1e-3


class GEM(Synapse):
    """Gradient Episodic Memory (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual Learning").

    GEM keeps an episodic memory per past task and, at each step, asks that the update increase no past
    task's loss on its memory: ``<g, g_k> >= 0`` for the current gradient ``g`` and each past task's
    memory gradient ``g_k``. A violating ``g`` is replaced by its projection, found through the dual QP
    (one variable per past task, margin ``gamma``; :func:`~synapse.functional.gem_dual`, exact on the
    device for up to 10 past tasks, no host sync). The ``buffer_size`` items are split evenly among the
    tasks seen so far, each share a random sample of its task (:class:`~synapse.episodic.EpisodicMemory`).
    **Task boundaries are required**: a task's memory becomes a constraint at :meth:`end_task`. Under DDP
    the reference gradients are all-reduced, so every rank solves the same QP. The equations, the solver
    and the memory: docs/methods/gradient.md, "GEM in detail".

    Deviations (each explained in the method page):

    * The memory is a random sample of each task, with shares that shrink as tasks arrive.
    * The reference loss is the single-head cross-entropy, not the paper's task-masked output.
    * ``buffer_sample_size=k`` computes each ``g_k`` on ``k`` random items (default: the whole memory).
    * More than 10 past tasks: an iterative QP solve, exact when its support is right.
    * Under a GradScaler the ``1e-3`` diagonal term is scaled with the gradients.

    Args:
        model: the model being trained (may be wrapped in DDP or ``torch.compile``).
        buffer_size: items kept in the episodic memory over all tasks (per rank in a distributed run).
        buffer_sample_size: ``None`` (default): each reference gradient uses the task's whole memory, as
            the paper does; an int ``k``: at most ``k`` items of it, drawn at random each step.
        gamma: the margin (the authors' ``memory_strength``), ``>= 0``; the QP's lower bound on ``v``.
        buffer_scope: ``'rank'`` (default): every rank of a distributed run keeps ``buffer_size`` items of
            its own stream; ``'global'``: ``buffer_size`` is the whole run's budget, split across ranks.
        scaler: a ``torch.amp.GradScaler`` for mixed precision; pass the unscaled loss to ``backward``.

    Example:
        >>> synapse = GEM(model, buffer_size=200, gamma=0.5)
        >>> for task in tasks:
        ...     for inputs, targets in task:
        ...         optimizer.zero_grad()
        ...         loss = criterion(model(inputs), targets)
        ...         synapse.backward(loss, targets, inputs=inputs)   # instead of loss.backward()
        ...         optimizer.step()
        ...     synapse.end_task()
    """

    needs_task_boundaries = True

    def __init__(
        self,
        model: nn.Module,
        buffer_size: int = 1024,
        buffer_sample_size: Optional[int] = None,
        gamma: float = 0.5,
        *,
        buffer_scope: str = "rank",
        scaler: Optional[torch.amp.GradScaler] = None,
    ) -> None:
        check_positive_int("buffer_size", buffer_size)
        if buffer_sample_size is not None:
            check_positive_int("buffer_sample_size", buffer_sample_size)
        check_non_negative("gamma", gamma)
        if buffer_scope not in ("rank", "global"):
            raise ValueError(f"buffer_scope must be 'rank' or 'global', got {buffer_scope!r}")
        world = distributed_world()
        if buffer_scope == "global" and buffer_size < world:
            raise ValueError(f"buffer_size={buffer_size} cannot be split across {world} ranks (buffer_scope='global')")
        super().__init__(model, scaler=scaler)
        rank = dist.get_rank() if world > 1 else 0
        capacity = buffer_size if buffer_scope == "rank" else buffer_size // world + (rank < buffer_size % world)
        # Offsetting by rank decorrelates the ranks' memories under one global seed.
        self.memory = EpisodicMemory(capacity, seed=(fresh_seed() + rank) % 2**62)
        self.buffer_sample_size = buffer_sample_size
        self.gamma = float(gamma)
        self._params: List[nn.Parameter] = self.trainable_parameters()
        self._references: Optional[Tensor] = None  # (past tasks, parameters): G, one row per past task
        self._reference_rows: List[FlatSpace] = []  # each row of G viewed per parameter
        self._current: Optional[FlatSpace] = None
        self.add_state_object("memory", lambda: self.memory)

    # ------------------------------------------------------------------ backward
    def _items(self, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        return {**{f"input:{k}": v for k, v in model_inputs.items()}, "targets": targets}

    def _check(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        if self._input_names is not None and tuple(model_inputs) != self._input_names:
            raise ValueError(
                f"model inputs {tuple(model_inputs)} differ from those of earlier steps {self._input_names}"
            )
        self.memory.check_batch(self._items(targets, model_inputs))

    def _backward(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        past_tasks = self.memory.num_tasks  # a host int: the branch below reads no device value
        if past_tasks:
            references, current = self._workspaces(past_tasks)
            self._reference_gradients()
        self._run_backward(loss)
        if past_tasks:
            # A parameter unused this step still gets a gradient: its projection may be non-zero.
            grads = self._gradients(self._params)
            torch._foreach_copy_(current.views, grads)
            gem_project_(current.flat, references, self.gamma, self._qp_eps())
            torch._foreach_copy_(grads, current.views)
        self._input_names = tuple(model_inputs)
        self._follow_model_device()
        self.memory.add(self._items(targets, model_inputs), validate=False)

    def _workspaces(self, past_tasks: int) -> tuple:
        """``G`` as a ``(past_tasks, p)`` float32 matrix and the current gradient's flat copy, allocated
        when the number of past tasks or the device changes (once per task)."""
        references = self._references
        if references is None or references.shape[0] != past_tasks or references.device != self.device:
            numel = sum(p.numel() for p in self._params)
            references = self._references = torch.zeros(past_tasks, numel, device=self.device)
            self._reference_rows = [FlatSpace(self._params, row) for row in references]
            self._current = FlatSpace(self._params)
        assert self._current is not None
        return references, self._current

    def _reference_gradients(self) -> None:
        """Row ``k`` of ``G``: the gradient of the cross-entropy on past task ``k``'s memory."""
        self._follow_model_device()
        names = [f"input:{n}" for n in self._input_names or ()] + ["targets"]
        for row, batch in zip(self._reference_rows, self.memory.sample_tasks(self.buffer_sample_size, names)):
            inputs = {name[len("input:") :]: batch[name] for name in names[:-1]}
            # The inner module, not the DDP wrapper: this backward must not trigger DDP's gradient sync.
            ref_loss = F.cross_entropy(self.module(**inputs), batch["targets"])
            if self.scaler is not None:
                ref_loss = self.scaler.scale(ref_loss)  # the same scale as the current gradient
            grads = _autograd.grad(ref_loss, self._constant(1.0, ref_loss), self._params)
            reached = [(v, g) for v, g in zip(row.views, grads) if g is not None]
            torch._foreach_copy_([v for v, _ in reached], [g for _, g in reached])
            for v, g in zip(row.views, grads):
                if g is None:  # a parameter this loss does not reach
                    v.zero_()
        world = distributed_world()
        if world > 1:
            assert self._references is not None
            dist.all_reduce(self._references)
            self._references.div_(world)

    def _qp_eps(self) -> Union[float, Tensor]:
        """The authors' ``1e-3``, times the squared loss scale under a GradScaler (``G`` and ``g`` are scaled)."""
        scale = self._grad_scale()
        return QP_EPS if scale is None else QP_EPS * scale.double().square()

    def _follow_model_device(self) -> None:
        if self.memory.device is not None and self.memory.device != self.device:
            self.memory.to(self.device)

    # ------------------------------------------------------------------ task boundaries and state
    def _end_task(self, data: Optional[Iterable[TaskBatch]]) -> None:
        self.memory.end_task()  # the memory fills from the stream; the task's data is not needed


class _GEMFloor(Floor):
    """GEM's floor with two past tasks (as the benchmark runs it, after two task ends): a reference gradient
    on each past task's memory minibatch, a flat copy of the current one, the QP projection."""

    past_tasks = 2

    def backward(self, loss: Tensor, targets: Tensor, inputs: Tensor, logits: Tensor) -> None:
        if not hasattr(self, "references"):
            numel = sum(p.numel() for p in self.params)
            self.references = torch.zeros(self.past_tasks, numel, device=self.one.device)
            self.reference_rows = [FlatSpace(self.params, row) for row in self.references]
        for row in self.reference_rows:
            idx = self.draw()
            ref_loss = F.cross_entropy(self.model(self.x.index_select(0, idx)), self.y.index_select(0, idx))
            torch._foreach_copy_(row.views, self.gradient_of(ref_loss))
        self.run_backward((loss,), (self.one,))
        current, grads = self.space("current"), self.grads()
        torch._foreach_copy_(current.views, grads)
        gem_project_(current.flat, self.references, float(self.hp["gamma"]))
        torch._foreach_copy_(grads, current.views)


register(
    MethodSpec(
        "gem",
        GEM,
        family="gradient",
        order=7,
        floor=_GEMFloor,
        paper="Lopez-Paz & Ranzato 2017, *Gradient Episodic Memory for Continual Learning*",
        summary="project the gradient, through a small QP, so that no past task's memory loss increases",
        hparams=(
            HParam(
                "gamma", float, 0.5, "margin: the QP's lower bound on the dual variables (memory strength)", low=0.0
            ),
        ),
    )
)
