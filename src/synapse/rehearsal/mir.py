"""MIR: Experience Replay that replays the memories a foreseen update would interfere with most."""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _NormBase

from .._capture import Replay
from .._floor import Floor
from .._validation import check_positive, check_positive_int
from ..augment import Transform
from ..buffer import fresh_seed
from ..catalog import HParam, MethodSpec, register
from ..functional import eligible_subset, interference_scores
from .er import ER, ReplayTerms

__all__ = ["MIR"]

CANDIDATES = ("all", "past_tasks")
TASK, LOWEST = "mir_task", "mir_lowest_loss"  # the memory fields the authors' options keep
NEVER_SCORED = float(torch.finfo(torch.float32).max)  # a lowest loss not yet seen: above any real one


class MIR(ER):
    """Maximally Interfered Retrieval (ER-MIR), from Aljundi et al. 2019, "Online Continual Learning with
    Maximal Interfered Retrieval" (NeurIPS 2019).

    Experience Replay whose replay minibatch is not drawn at random: among ``C`` random memories, MIR
    replays the ``k`` whose loss a virtual SGD step on the incoming batch would raise most
    (:func:`synapse.functional.interference_scores`, ranked by ``topk`` on the device). The virtual step
    runs the model on ``theta - virtual_lr * grad`` through ``torch.func.functional_call`` (no copy of the
    model), and the real update is one backward of the user's loss plus the replay cross-entropy. Synapse
    never sees the optimizer, so **set** ``virtual_lr`` **to your optimizer's learning rate**. Sampling,
    storage and the state dict are ER's (``fused=False``). ``candidates='past_tasks'`` and
    ``compare_to_old_logits=True`` follow two rules of the authors' code (both need :meth:`end_task`
    calls). The steps, the authors' settings behind the defaults, their two rules and the normalisation
    layers: docs/methods/rehearsal.md, "MIR in detail".

    Deviations (each explained in the method page):

    * By default task-free: candidates come from the whole reservoir, replay starts at once.
    * ``compare_to_old_logits`` keeps each item's lowest loss where the authors keep logits, at the item's
      own slot (theirs index the memory with positions among the past tasks' items), reset when a slot is
      overwritten.
    * With at most ``k`` candidates all are replayed and the virtual step is skipped.
    * Candidate forwards do not update BatchNorm's running statistics.
    * Parameters the loss does not reach, and frozen ones, keep their value in ``theta_v``.
    * With a GradScaler the virtual gradient is taken of the scaled loss, then unscaled.
    * Distributed: each rank's virtual step uses its own batch's gradient.

    Args:
        model: the model being trained (may be wrapped in DDP or ``torch.compile``).
        buffer_size: items kept in the reservoir (per rank in a distributed run).
        buffer_sample_size: ``k``, the items replayed per step.
        buffer_candidates: ``C``, the random memories scored per step; at least ``buffer_sample_size``.
        virtual_lr: ``eta``, the virtual SGD step's learning rate: your optimizer's learning rate.
        candidates: ``'all'`` (default): from the whole memory; ``'past_tasks'``: from the items stored
            before the last :meth:`end_task` only, and no replay before the first (the authors' code).
        compare_to_old_logits: score the rise of each candidate's loss above the lower of today's loss and
            the lowest remembered for it (:func:`synapse.functional.interference_scores`; the authors'
            ``--compare_to_old_logits``, in their MNIST scripts). Default False: the paper's score.
        buffer_scope: ``'rank'`` or ``'global'`` (see :class:`~synapse.rehearsal.ER`).
        scaler: a ``torch.amp.GradScaler`` for mixed precision; pass the unscaled loss to ``backward``.
        replay_transform: augments every draw of candidates on the device (scored and replayed in the
            same view), as in :class:`~synapse.rehearsal.ER` (default None: replay what was stored).

    Example:
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> synapse = MIR(model, buffer_size=500, buffer_sample_size=10, buffer_candidates=50, virtual_lr=0.1)
        >>> for inputs, targets in stream:
        ...     optimizer.zero_grad()
        ...     loss = criterion(model(inputs), targets)
        ...     synapse.backward(loss, targets, inputs=inputs)
        ...     optimizer.step()
    """

    method = "mir"  # its own name, not that of the "er" it builds on

    def __init__(
        self,
        model: nn.Module,
        buffer_size: int = 1024,
        buffer_sample_size: int = 10,
        buffer_candidates: int = 50,
        virtual_lr: float = 0.1,
        *,
        candidates: str = "all",
        compare_to_old_logits: bool = False,
        buffer_scope: str = "rank",
        scaler: Optional[torch.amp.GradScaler] = None,
        replay_transform: Optional[Transform] = None,
    ) -> None:
        check_positive_int("buffer_sample_size", buffer_sample_size)
        check_positive_int("buffer_candidates", buffer_candidates)
        if buffer_candidates < buffer_sample_size:
            raise ValueError(
                f"buffer_candidates must be at least buffer_sample_size={buffer_sample_size} (MIR replays the "
                f"top buffer_sample_size of them), got {buffer_candidates}"
            )
        check_positive("virtual_lr", virtual_lr)
        if candidates not in CANDIDATES:
            raise ValueError(f"candidates must be one of {CANDIDATES}, got {candidates!r}")
        if not isinstance(compare_to_old_logits, bool):
            raise TypeError(f"compare_to_old_logits must be a bool, got {compare_to_old_logits!r}")
        super().__init__(
            model,
            buffer_size,
            buffer_sample_size,
            method="er",
            fused=False,
            buffer_scope=buffer_scope,
            scaler=scaler,
            replay_transform=replay_transform,
        )
        self.buffer_candidates = buffer_candidates
        self.virtual_lr = float(virtual_lr)
        self.candidates = candidates
        self.compare_to_old_logits = compare_to_old_logits
        self._loss: Optional[Tensor] = None  # the incoming batch's loss, during backward only
        self._candidate_rng: Optional[np.random.Generator] = None
        self._valid: Optional[Tensor] = None  # the replayed rows that hold past tasks' items (past_tasks)
        if candidates == "past_tasks":
            # The current task is the one end_task has not closed yet: without task ends, nothing is past.
            self.acts_at_task_end = True
            # Its own generator (declared only here, so the default's state dict and draws stay ER's).
            self._candidate_rng = np.random.Generator(np.random.PCG64(fresh_seed()))
            self.add_generator("candidate_rng", "_candidate_rng")

    def _stored_items(self, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        items = super()._stored_items(targets, model_inputs)
        batch, device = targets.shape[0], targets.device
        if self.candidates == "past_tasks":  # the task each item came in: the number of tasks ended then
            items[TASK] = torch.full((batch,), self.num_tasks_ended, dtype=torch.int64, device=device)
        if self.compare_to_old_logits:
            items[LOWEST] = torch.full((batch,), NEVER_SCORED, dtype=torch.float32, device=device)
        return items

    def _backward(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        self._loss = loss  # read by _separate_replay_forward, which ER calls before the real backward
        try:
            super()._backward(loss, targets, model_inputs)
        finally:
            self._loss = None

    def _separate_replay_forward(self) -> Optional[Replay]:  # type: ignore[override]
        """ER's replay forward, on the most interfered of ``C`` candidates instead of a random minibatch."""
        self._follow_model_device()
        if self.candidates == "past_tasks" and self.num_tasks_ended == 0:
            return None  # no past task yet: the authors replay from the second task on
        slots, valid = self._draw_candidates()
        # The candidates are augmented once: scored, and then replayed, in the same view.
        sample = self._augment_replay(self.buffer.gather(slots, self._replay_fields()))
        k = min(self.buffer_sample_size, slots.shape[0])
        if slots.shape[0] > k:  # sizes the host knows: no sync
            chosen = self._most_interfered(sample, slots, valid, k)
            sample = {name: field.index_select(0, chosen) for name, field in sample.items()}
            valid = None if valid is None else valid.index_select(0, chosen)
        self._replaying(sample)
        with self._forward.paused():
            outputs = self.module(**self._inputs_of(sample))
        replay = Replay(sample, 1)
        replay.outputs = [outputs]
        self._valid = valid
        return replay

    def _replay_terms(self, replay: Replay) -> ReplayTerms:
        """ER's replay cross-entropy; with ``candidates='past_tasks'``, its mean over the replayed rows of
        past tasks only (all of them, unless the memory holds fewer than ``k`` such items)."""
        valid, self._valid = self._valid, None
        if valid is None:
            return super()._replay_terms(replay)
        assert replay.outputs is not None
        losses = F.cross_entropy(replay.outputs[0], replay.sample["targets"], reduction="none")
        mean = (losses * valid).sum() / valid.sum().clamp(min=1)
        return [(self.alpha, mean)], []

    def _draw_candidates(self) -> Tuple[Tensor, Optional[Tensor]]:
        """The candidates' slots, and (``candidates='past_tasks'``) which of them hold a past task's item."""
        c = min(self.buffer_candidates, len(self.buffer))
        if self._candidate_rng is None:  # 'all': ER's own uniform draw from the whole memory
            return self.buffer.sample_indices(c).view(-1), None
        n = len(self.buffer)
        past = self.buffer.stored([TASK])[TASK] < self.num_tasks_ended
        keys = torch.from_numpy(self._candidate_rng.random(n)).to(past.device)
        return eligible_subset(keys, past, c)

    def _most_interfered(
        self, candidates: Mapping[str, Tensor], slots: Tensor, valid: Optional[Tensor], k: int
    ) -> Tensor:
        """Indices (into ``candidates``, on the device) of the ``k`` highest interference scores."""
        assert self._loss is not None
        loss = self._loss
        names: Dict[nn.Parameter, List[str]] = {}  # every name of each trainable parameter (tied ones share)
        for name, p in self.module.named_parameters(remove_duplicate=False):
            if p.requires_grad:
                names.setdefault(p, []).append(name)
        params = list(names)
        scale = self._grad_scale()
        seed = self._constant(1.0, loss) if scale is None else scale.reshape(loss.shape).to(loss.dtype)
        grads = torch.autograd.grad(loss, params, seed, retain_graph=True, allow_unused=True)
        with torch.no_grad():
            reached = [(p, g) for p, g in zip(params, grads) if g is not None]
            steps: List[Tensor] = [g for _, g in reached]
            if scale is not None:
                steps = list(torch._foreach_div(steps, scale.reshape(())))
            # New tensors: autograd may hand out one gradient tensor for several parameters, or a view.
            virtual = torch._foreach_add([p for p, _ in reached], steps, alpha=-self.virtual_lr)
            theta_v = {name: v for (p, _), v in zip(reached, virtual) for name in names[p]}
            inputs = self._inputs_of(candidates)
            statistics = self._running_statistics()
            with self._forward.paused():
                before = self._run(inputs, {}, statistics)
                after = self._run(inputs, theta_v, statistics)
            targets = candidates["targets"]
            lowest = None
            if self.compare_to_old_logits:
                lowest = self._lowest_losses(slots, valid, before, targets)
            scores = interference_scores(before, after, targets, lowest)
            if valid is not None:
                scores = scores.masked_fill(~valid, -math.inf)
        return scores.topk(k).indices

    def _lowest_losses(self, slots: Tensor, valid: Optional[Tensor], before: Tensor, targets: Tensor) -> Tensor:
        """The lowest loss remembered for each candidate (the authors' stored logits start at zero, whose
        loss is ``log(classes)``); the memory then keeps the lower of it and today's loss (for the
        candidates of past tasks only, with ``candidates='past_tasks'``)."""
        stored = self.buffer.gather(slots, [LOWEST])[LOWEST]
        remembered = stored.clamp(max=math.log(before.shape[1]))
        lowest = torch.minimum(F.cross_entropy(before, targets, reduction="none").float(), remembered)
        self.buffer.write(LOWEST, slots, lowest if valid is None else torch.where(valid, lowest, stored))
        return remembered

    def _running_statistics(self) -> Dict[str, Tensor]:
        """The buffers a forward in the current mode would update: the running statistics of the
        normalisation layers (BatchNorm, InstanceNorm) that track them and are in train mode."""
        return {
            f"{prefix}.{name}" if prefix else name: buffer
            for prefix, module in self.module.named_modules()
            if isinstance(module, _NormBase) and module.training and module.track_running_stats
            for name, buffer in module.named_buffers(recurse=False)
        }

    def _run(self, inputs: Dict[str, Tensor], parameters: Dict[str, Tensor], statistics: Dict[str, Tensor]) -> Tensor:
        """The model's outputs on ``inputs`` with ``parameters`` in place of its own (those named), and with
        copies of the running ``statistics``, so that the forward leaves the real ones untouched."""
        if not parameters and not statistics:
            return self.module(**inputs)
        copies = {name: buffer.clone() for name, buffer in statistics.items()}
        # Tied parameters are named in full in ``parameters``: functional_call need not look for ties.
        return functional_call(self.module, {**parameters, **copies}, (), inputs, tie_weights=False)


class _MIRFloor(Floor):
    """MIR's floor: the virtual step's gradient, ``theta - lr g``, the candidates' forwards with ``theta`` and
    with it, top-k, the chosen rows' forward and one backward with the user's loss."""

    def rows(self) -> int:
        return int(self.hp["buffer_candidates"])

    def backward(self, loss: Tensor, targets: Tensor, inputs: Tensor, logits: Tensor) -> None:
        idx = self.draw()
        x, y = self.x.index_select(0, idx), self.y.index_select(0, idx)
        grads = torch.autograd.grad(loss, self.params, self.one, retain_graph=True)  # the loss backs up again
        with torch.no_grad():
            virtual = torch._foreach_add([p.detach() for p in self.params], grads, alpha=-float(self.hp["virtual_lr"]))
            names = [n for n, p in self.model.named_parameters() if p.requires_grad]
            before = F.cross_entropy(self.model(x), y, reduction="none")
            after = F.cross_entropy(functional_call(self.model, dict(zip(names, virtual)), (x,)), y, reduction="none")
            top = (after - before).topk(self.k).indices
        replayed = F.cross_entropy(self.model(x.index_select(0, top)), y.index_select(0, top))
        self.run_backward((loss, replayed), (self.one, self.one))


register(
    MethodSpec(
        "mir",
        MIR,
        family="rehearsal",
        order=14,
        floor=_MIRFloor,
        paper="Aljundi et al. 2019, *Online Continual Learning with Maximal Interfered Retrieval*",
        summary="ER replaying the memories whose loss a virtual SGD step on the incoming batch would raise most",
        hparams=(
            HParam("buffer_candidates", int, 50, "random memories scored per step (C); >= buffer_sample_size", low=1),
            HParam(
                "virtual_lr",
                float,
                0.1,
                "learning rate of the virtual SGD step: set it to the optimizer's",
                low=0.0,
                low_open=True,
            ),
            HParam(
                "candidates",
                str,
                "all",
                "where candidates come from: the whole memory, or past tasks' items only (the authors' code)",
                choices=CANDIDATES,
            ),
            HParam(
                "compare_to_old_logits",
                bool,
                False,
                "score the rise above the lowest loss remembered per item (the authors' MNIST option)",
            ),
        ),
    )
)
