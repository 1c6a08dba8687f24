"""The learning rate within a task: constant, or CODA-Prompt's cosine, restarted at each task.

The schedule is a function of where the run is in the task (its epoch and batch, both checkpointed), and each
parameter group's base lr is its ``initial_lr`` (in the optimizer's state dict): a resumed run sets exactly
the lr the uninterrupted one set, with no scheduler object to save.
"""

from __future__ import annotations

import math

import torch

LR_SCHEDULES = ("constant", "cosine")
# CODA-Prompt's curve (utils/schedulers.py, CosineSchedule): cos(99 pi e / (200 (K - 1))) over epochs e = 0..K-1,
# a quarter period that ends at cos(0.495 pi), 1.6% of the base lr, rather than at 0.
COSINE_SPAN = 0.495 * math.pi


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The factor on the base lr at ``step`` (0-based) of a task's ``steps``.

    Args:
        schedule: one of :data:`LR_SCHEDULES`.
        step: the step within the task, ``0 <= step < steps``.
        steps: the task's steps over all its epochs.

    Example:
        >>> lr_factor("cosine", 0, 10), round(lr_factor("cosine", 9, 10), 4)
        (1.0, 0.0157)

    Deviation: CODA-Prompt's authors step their cosine once per epoch; here it is evaluated per step (their
    per-epoch form is constant over a one-epoch task, and divides by zero there).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if schedule == "constant" or steps <= 1:
        return 1.0
    return math.cos(COSINE_SPAN * step / (steps - 1))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Every parameter group's lr to its ``initial_lr`` (set by :func:`remember_base_lr`) times ``factor``."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


def remember_base_lr(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Record each group's lr as its ``initial_lr`` (torch's schedulers' key), the base the schedule scales."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return optimizer
