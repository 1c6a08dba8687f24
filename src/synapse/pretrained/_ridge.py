"""Pure functions of the closed-form classifiers: class means and ridge regression from Gram statistics.

They take the streamed sums (never the samples), so that a classifier over every sample seen costs one
``M x M`` matrix, not a memory of features. Solves run in float64: ``G`` of ReLU features is badly
conditioned, and the smallest ridges of the grid would not survive float32.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["class_means", "ridge_solve", "ridge_grid_search", "held_out_error"]


def class_means(sums: Tensor, counts: Tensor) -> Tensor:
    """``sums[c] / counts[c]`` (zero rows where a class has no sample)."""
    return sums / counts.clamp(min=1.0)[:, None]


def ridge_solve(gram: Tensor, class_features: Tensor, ridge: float) -> Tensor:
    """``W = C (G + ridge I)^-1``, the ridge regression of one-hot targets on features ``h`` with
    ``G = sum h h^T`` and ``C = sum y h^T`` (``classes x M``), in float64, returned in ``C``'s dtype."""
    m = gram.shape[0]
    system = gram.double() + ridge * torch.eye(m, dtype=torch.float64, device=gram.device)
    return torch.linalg.solve(system, class_features.double().T).T.to(class_features.dtype)


def held_out_error(weights: Tensor, gram: Tensor, class_features: Tensor) -> Tensor:
    """The squared error ``sum_i ||W h_i - y_i||^2`` of ``W`` on rows whose statistics are ``G``, ``C``,
    less the constant ``sum_i ||y_i||^2``: ``tr(W G W^T) - 2 tr(W C^T)``."""
    return ((weights @ gram) * weights).sum() - 2 * (weights * class_features).sum()


def ridge_grid_search(
    gram: Tensor, class_features: Tensor, held_gram: Tensor, held_class_features: Tensor, grid: Sequence[float]
) -> float:
    """The ridge of ``grid`` whose solve on ``(gram, class_features)`` has the least error on the held-out
    rows' statistics (:func:`held_out_error`); the first on a tie. One eigendecomposition
    ``G = V diag(e) V^T`` serves every candidate: ``W(r) = C V diag(1 / (e + r)) V^T``."""
    eigenvalues, vectors = torch.linalg.eigh(gram.double())
    eigenvalues = eigenvalues.clamp(min=0.0)  # G is PSD; rounding may leave tiny negatives
    a = class_features.double() @ vectors  # C V
    rotated_gram = vectors.T @ held_gram.double() @ vectors  # V^T G_v V
    rotated_targets = held_class_features.double() @ vectors  # C_v V
    errors = [
        held_out_error(a / (eigenvalues + r), rotated_gram, rotated_targets) for r in grid
    ]  # W V = C V diag(1/(e + r)): the error is invariant to the rotation V
    return float(grid[int(torch.stack(errors).argmin())])
