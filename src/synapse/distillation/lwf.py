"""Learning without Forgetting: distil a frozen copy of the model's old-class outputs on the current inputs."""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .._base import Synapse, TaskBatch
from .._classes import ClassHistory
from .._floor import Floor
from .._state import width_of
from .._validation import check_non_negative, check_positive
from ..catalog import HParam, MethodSpec, register
from ..functional import soft_distillation_grad

__all__ = ["LwF"]

TEACHER_DTYPES = (None, torch.bfloat16, torch.float16)


class LwF(ClassHistory, Synapse):
    """Learning without Forgetting (Li & Hoiem 2016, "Learning without Forgetting", ECCV 2016; TPAMI 2017).

    At each :meth:`end_task` the method keeps a frozen copy of the model (the *teacher*) and the set ``O``
    of the classes seen so far (from ``targets``). At every later step it adds the paper's
    knowledge-distillation term on the current batch, ``alpha * L_old``: the cross-entropy between the
    teacher's and the model's temperature-``T`` softmaxes over the old classes only, on the live logits
    of the user's forward. The user's ``loss`` keeps weight 1; the term's gradient is seeded into the
    logits, so one backward does everything. The teacher costs one forward per step (no grad, eval mode,
    optionally under autocast in ``teacher_dtype``). A head may grow between tasks, not shrink. The
    equations: docs/methods/distillation.md, "LwF in detail".

    Deviations (each explained in the method page):

    * The teacher runs on each step's inputs, not on responses recorded before the task.
    * One softmax over all old classes (single head), not one per old task.
    * No warm-up of the new head.
    * The new-task loss is the user's ``loss``; the weight decay is the optimizer's.
    * Old classes come from the targets, not known class ranges.
    * No ``T**2`` factor (pass ``alpha * T**2`` for Hinton's scaling).

    Args:
        model: the model being trained (may be wrapped in DDP or ``torch.compile``). It must return a
            ``(batch, classes)`` logits tensor, and ``backward``'s keywords must name ``forward``'s
            parameters: the teacher is called as ``teacher(**model_inputs)``.
        alpha: weight of the distillation term (the paper's ``lambda_o``).
        temperature: the softmax temperature ``T`` (> 0).
        teacher_dtype: ``torch.bfloat16`` or ``torch.float16`` to run the teacher under autocast in that
            dtype; None (default) runs it in the model's dtype.
        scaler: a ``torch.amp.GradScaler`` for mixed precision; pass the unscaled loss to ``backward``.

    Example:
        >>> synapse = LwF(model, alpha=1.0, temperature=2.0)
        >>> for task in tasks:
        ...     for inputs, targets in task:
        ...         optimizer.zero_grad()
        ...         loss = criterion(model(inputs), targets)
        ...         synapse.backward(loss, targets, inputs=inputs)
        ...         optimizer.step()
        ...     synapse.end_task()   # the model as it is now becomes the teacher
    """

    acts_at_task_end = True  # the teacher comes from end_task(): without it, LwF is fine-tuning
    reads_logits = True  # the distillation's temperature-softened softmax of raw logits

    def __init__(
        self,
        model: nn.Module,
        alpha: float = 1.0,
        temperature: float = 2.0,
        *,
        teacher_dtype: Optional[torch.dtype] = None,
        scaler: Optional[torch.amp.GradScaler] = None,
    ) -> None:
        check_non_negative("alpha", alpha)
        check_positive("temperature", temperature)
        if not any(teacher_dtype is d for d in TEACHER_DTYPES):
            raise ValueError(f"teacher_dtype must be None, torch.bfloat16 or torch.float16, got {teacher_dtype!r}")
        super().__init__(model, scaler=scaler)
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.teacher_dtype = teacher_dtype
        self._log_mask: Optional[Tensor] = None  # old_classes at the teacher's width, additive (0 / -inf)
        self._forward = self._capture_forward()
        self._init_class_history(teacher_grows=True, load=_load_weights)

    # ------------------------------------------------------------------ backward
    def _check(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        self._forward.check_input_names(list(model_inputs))  # the teacher is called with them
        outputs = self._forward.checked_outputs("lwf", targets.shape[0])
        seen = self.seen_classes
        if seen is not None and outputs.shape[1] < seen.shape[0]:
            raise ValueError(
                f"the model now outputs {outputs.shape[1]} logits but earlier steps had {seen.shape[0]}: "
                "heads may grow between tasks, not shrink"
            )

    def _backward(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        outputs = self._forward.outputs
        assert outputs is not None  # checked by _check
        self._follow_model_device()
        seeded = () if self.teacher is None else (self._distillation(outputs, model_inputs),)
        self._run_backward(loss, seeded=seeded)
        self._see(targets, outputs.shape[1])
        self._forward.clear()

    def _distillation(self, outputs: Tensor, model_inputs: Mapping[str, Tensor]) -> Tuple[Tensor, Tensor]:
        """``(logits, gradient)``: the student's compared logits and the distillation term's gradient."""
        assert self.teacher is not None and self.old_classes is not None
        autocast = (
            torch.autocast(self.device.type, dtype=self.teacher_dtype)
            if self.teacher_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.no_grad(), autocast:
            teacher_logits = self.teacher(**model_inputs)
        if not isinstance(teacher_logits, Tensor) or teacher_logits.dim() != 2 or len(teacher_logits) != len(outputs):
            got = tuple(teacher_logits.shape) if isinstance(teacher_logits, Tensor) else type(teacher_logits).__name__
            raise ValueError(f"the teacher returned {got} for a batch of {len(outputs)}; expected (batch, classes)")
        width = teacher_logits.shape[1]
        if outputs.shape[1] < width or self.old_classes.shape[0] > width:
            raise ValueError(
                f"the model outputs {outputs.shape[1]} logits, the teacher {width} and "
                f"{self.old_classes.shape[0]} columns were seen before the task ended: heads may grow between "
                "tasks, not shrink"
            )
        # Columns past the teacher's (a head that grew) are not a root: they get no distillation gradient.
        student = outputs if outputs.shape[1] == width else outputs[:, :width]
        grad = soft_distillation_grad(student, teacher_logits, self.temperature, self._mask_at(width), self.alpha)
        return student, grad

    def _mask_at(self, width: int) -> Tensor:
        """The old-class mask in additive form at the teacher's width (built once per task)."""
        if self._log_mask is None or self._log_mask.shape[0] != width:
            assert self.old_classes is not None
            mask = torch.full((width,), float("-inf"), device=self.device)
            mask[: self.old_classes.shape[0]].masked_fill_(self.old_classes, 0.0)
            self._log_mask = mask
        return self._log_mask

    def _see(self, targets: Tensor, width: int) -> None:
        """Flag the targets' classes as seen (no host sync: out-of-range targets land in the end slots)."""
        self._seen_store = self._seen_with(targets, width, self.device, in_place=True)

    def _follow_model_device(self) -> None:
        if self._follow_classes(self.device):
            self._log_mask = None

    # ------------------------------------------------------------------ task end
    def _end_task(self, data: Optional[Iterable[TaskBatch]]) -> None:
        seen = self.seen_classes
        if seen is None:
            return  # no step yet: no class to distil, no teacher
        seen.copy_(self._union_over_ranks(seen))
        if not bool(seen.any()):  # one sync per task end, never in backward
            return
        self.teacher = self._frozen_copy()
        self.old_classes = seen.clone()
        self._log_mask = None

    # ------------------------------------------------------------------ state
    def _after_load(self) -> None:
        self._log_mask = None

    def _upgrade_state(self, state: Dict[str, Any]) -> Dict[str, Any]:
        return width_of(state, "seen_classes")


def _load_weights(module: nn.Module, weights: Mapping[str, Tensor]) -> None:
    """``module.load_state_dict(weights)``, where a tensor whose shape differs (the model's head grew since
    the teacher was taken) takes the saved shape: the teacher is rebuilt as it was."""
    own = module.state_dict()
    if set(own) != set(weights):
        raise ValueError(
            f"the saved teacher's entries differ from the model's: missing {sorted(set(own) - set(weights))}, "
            f"unexpected {sorted(set(weights) - set(own))}"
        )
    for name, saved in weights.items():
        if own[name].shape == saved.shape:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(torch.empty_like(saved), requires_grad=False)
        elif leaf in owner._buffers:
            owner._buffers[leaf] = torch.empty_like(saved)
        else:
            raise ValueError(f"the saved teacher's {name!r} has shape {tuple(saved.shape)}, the model's differs")
    module.load_state_dict(weights)


class _LwFFloor(Floor):
    """LwF's floor: the frozen copy's forward on the batch and the distillation gradient seeded into the
    user's logits, in the user's backward."""

    def backward(self, loss: Tensor, targets: Tensor, inputs: Tensor, logits: Tensor) -> None:
        with torch.no_grad():
            teacher = self.teacher()(inputs)
        temperature, alpha = float(self.hp["temperature"]), float(self.hp["alpha"])
        seed = soft_distillation_grad(logits.detach(), teacher, temperature, weight=alpha)
        self.run_backward((loss, logits), (self.one, seed))


register(
    MethodSpec(
        "lwf",
        LwF,
        family="distillation",
        order=5,
        floor=_LwFFloor,
        paper="Li & Hoiem 2016, *Learning without Forgetting*",
        summary="distil a frozen copy's temperature-softened old-class outputs on the current inputs",
        hparams=(
            HParam("alpha", float, 1.0, "weight of the distillation term (lambda_o)", low=0.0),
            HParam("temperature", float, 2.0, "softmax temperature T", low=0.0, low_open=True),
        ),
    )
)
