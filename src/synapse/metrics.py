"""Continual-learning metrics as pure functions of an accuracy matrix.

``R[i][j]`` is the accuracy on task ``j`` after training on tasks ``0..i`` (``T x T``, fractions or
percentages: every metric keeps the unit). With ``T`` tasks:

* average accuracy: ``A_T = (1/T) sum_j R[T-1][j]``
* average incremental accuracy: ``(1/T) sum_i (1/(i+1)) sum_{j<=i} R[i][j]`` (Rebuffi et al. 2017)
* forgetting (Chaudhry et al. 2018): ``(1/(T-1)) sum_{j<T-1} max_{l<T-1} R[l][j] - R[T-1][j]``
* backward transfer (Lopez-Paz & Ranzato 2017): ``(1/(T-1)) sum_{j<T-1} R[T-1][j] - R[j][j]``
* forward transfer (same paper): ``(1/(T-1)) sum_{j>0} R[j-1][j] - b[j]``, where ``b[j]`` is the accuracy
  on task ``j`` of the model before any training.

With a single task there is nothing to forget or transfer: forgetting, BWT and FWT are 0.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

__all__ = ["average_accuracy", "average_incremental_accuracy", "forgetting", "backward_transfer", "forward_transfer"]

Matrix = Union[Sequence[Sequence[float]], np.ndarray]


def _square(accuracy: Matrix) -> np.ndarray:
    r = np.asarray(accuracy, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square T x T with T >= 1, got shape {r.shape}")
    return r


def average_accuracy(accuracy: Matrix) -> float:
    return float(_square(accuracy)[-1].mean())


def average_incremental_accuracy(accuracy: Matrix) -> float:
    r = _square(accuracy)
    return float(np.mean([r[i, : i + 1].mean() for i in range(r.shape[0])]))


def forgetting(accuracy: Matrix) -> float:
    r = _square(accuracy)
    t = r.shape[0]
    if t == 1:
        return 0.0
    best_before_end = r[: t - 1, : t - 1].max(axis=0)
    return float((best_before_end - r[t - 1, : t - 1]).mean())


def backward_transfer(accuracy: Matrix) -> float:
    r = _square(accuracy)
    t = r.shape[0]
    if t == 1:
        return 0.0
    return float((r[t - 1, : t - 1] - np.diag(r)[: t - 1]).mean())


def forward_transfer(accuracy: Matrix, untrained: Sequence[float]) -> float:
    r = _square(accuracy)
    b = np.asarray(untrained, dtype=np.float64)
    t = r.shape[0]
    if b.shape != (t,):
        raise ValueError(f"untrained accuracies must have one entry per task ({t}), got shape {b.shape}")
    if t == 1:
        return 0.0
    return float(np.mean([r[j - 1, j] - b[j] for j in range(1, t)]))
