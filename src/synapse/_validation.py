"""Argument checks shared by every public constructor and by ``backward``.

Each raises before anything is mutated, and names the argument, the value and what is accepted.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_non_negative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_loss(loss: Any) -> None:
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss must be a torch.Tensor, got {type(loss).__name__}")
    if loss.numel() != 1 or loss.dim() > 1:
        raise ValueError(f"loss must be a scalar tensor, got shape {tuple(loss.shape)}; reduce it first")
    if not loss.requires_grad:
        raise ValueError("loss does not require grad: was it computed under torch.no_grad() or from detached outputs?")


def check_targets_and_inputs(targets: Any, model_inputs: Mapping[str, Any]) -> int:
    """Check class-index targets and tensor inputs that share one batch size; return it."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor of class indices, got {type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must hold integer class indices, got dtype {targets.dtype}")
    if targets.dim() != 1:
        raise ValueError(f"targets must be 1-d (batch,), got shape {tuple(targets.shape)}")
    if not model_inputs:
        raise ValueError(
            "pass the model's inputs as keyword arguments named like model.forward's parameters, "
            "e.g. synapse.backward(loss, targets, inputs=inputs)"
        )
    batch = targets.shape[0]
    for name, value in model_inputs.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"model input {name!r} must be a torch.Tensor, got {type(value).__name__}")
        if value.dim() == 0 or value.shape[0] != batch:
            raise ValueError(
                f"model input {name!r} has batch size {value.shape[0] if value.dim() else 'none'}, "
                f"but targets has {batch}"
            )
    return batch


def check_non_empty(method: str, targets: Tensor) -> None:
    """Raise unless the batch has rows (a method that reads each row's logits or features needs one)."""
    if targets.shape[0] == 0:
        raise ValueError(f"{method} needs a non-empty batch: targets has no rows")


def check_class_indices(targets: Tensor, num_classes: int, first_step: bool) -> None:
    """Raise unless every target is a class index of a head with ``num_classes`` outputs. Reading the range is a
    host sync on CUDA, so there it is checked at the ``first_step`` only; on the CPU at every step."""
    if targets.numel() and (first_step or targets.device.type == "cpu"):
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"targets must be class indices in [0, {num_classes}) (the model's head has {num_classes} "
                f"outputs), got values in [{low}, {high}]"
            )


def forward_signature(module: nn.Module) -> Optional[inspect.Signature]:
    """``module.forward``'s signature, read once on the host; None when Python cannot read one."""
    try:
        return inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None


def check_forward_accepts(module: nn.Module, signature: Optional[inspect.Signature], names: Iterable[str]) -> None:
    """Raise unless ``module(**{name: ...})`` binds to ``forward``: every name is one of its keyword-capable
    parameters (or it takes ``**kwargs``) and no required parameter is left out. Methods call the model so
    (replay, task-end passes, ``predict``), so a name that would fail there fails here, in Synapse's words.
    """
    if signature is None:
        return  # nothing to check against: the model's own error will have to do
    names = list(names)
    try:
        signature.bind(**dict.fromkeys(names))
    except TypeError:
        by_name = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        accepted = [n for n, p in signature.parameters.items() if p.kind in by_name]
        unknown = [n for n in names if n not in accepted]
        what = (
            f"model inputs {unknown} are not parameters of"
            if unknown
            else f"model inputs {names} leave out required parameters of"
        )
        example = accepted[0] if accepted else "inputs"
        raise ValueError(
            f"{what} {type(module).__name__}.forward{signature}: pass the inputs as keywords named like forward's "
            f"parameters {accepted}, e.g. synapse.backward(loss, targets, {example}={example})"
        ) from None


def check_replay_rows(name: str, live: Tensor, rows: Tensor) -> None:
    """Refuse replayed rows that cannot stand in for the training forward's input ``name``: another kind of
    number (integer against floating point) or another shape per item. The memory stores what ``backward`` was
    given, and replay feeds it to the model (after any ``replay_transform``) without the steps that made the
    forward's input from it, so such rows would skip them (fused replay's ``torch.cat`` would even promote uint8
    to float silently)."""
    if rows.is_floating_point() == live.is_floating_point() and rows.shape[1:] == live.shape[1:]:
        return
    raise ValueError(
        f"replay: the memory's {name!r} rows are {rows.dtype} of shape {tuple(rows.shape[1:])} per item, but the "
        f"training forward's {name!r} is {live.dtype} of shape {tuple(live.shape[1:])}: backward stores the "
        f"{name!r} it is given, and replayed rows reach the model as they are (after replay_transform), so they "
        "would skip whatever made one from the other (a .float() / 255, a normalisation, a resize). Pass backward "
        "the tensor the forward gets, or move that step into the model or into the replay_transform"
    )
