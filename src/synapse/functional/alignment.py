"""Classifier alignment (SLCA): per-class Gaussian statistics of features, samples drawn from them, and the
logit normalisation the head is retrained with.

Zhang et al. 2023, "SLCA: Slow Learner with Classifier Alignment for Continual Learning on a Pre-trained
Model" (ICCV); the authors' code is ``GengDavid/SLCA`` (``models/slca.py``, ``models/base.py``). Each class
``c`` is modelled by the mean ``mu_c`` and covariance ``Sigma_c`` of its features; at a task end the head
is retrained on features drawn from ``N(mu_c, Sigma_c)`` for every class seen, with its logits divided by
the mean of their per-task norms and a temperature. The statistics are taken from sums, so that a task's
data streams through in batches; they accumulate in float64 (a covariance from raw second moments loses
what float32 keeps).

Only :func:`align_classifier` draws random numbers, from the CPU generator it is given, and it runs at task
ends (it copies its draws to the device); the rest are pure and never synchronise.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "class_moments",
    "mean_and_covariance",
    "mean_decay",
    "sample_class_features",
    "task_normalized_logits",
    "alignment_loss",
    "alignment_epoch",
    "align_classifier",
]

NORM_EPS = 1e-7  # added to each per-task logit norm, as in the authors' code


def class_moments(features: Tensor, targets: Tensor, classes: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """One batch's per-class sums, for the classes ``classes``: counts ``n_k``, feature sums
    ``s_k = sum_{i: y_i = c_k} f_i`` and second moments ``G_k = sum_{i: y_i = c_k} f_i f_i^T``, in float64.

    Args:
        features: ``(batch, dim)``.
        targets: ``(batch,)`` class indices.
        classes: ``(K,)`` the classes to sum for (rows of other classes are left out).

    Returns:
        ``(counts (K,), sums (K, dim), second_moments (K, dim, dim))``; added over batches they are the
        sums over all of them.
    """
    f = features.double()
    onehot = (targets[:, None] == classes[None, :]).double()  # (batch, K)
    counts = onehot.sum(0)
    sums = onehot.T @ f
    second = torch.einsum("bk,bd,be->kde", onehot, f, f)
    return counts, sums, second


def mean_and_covariance(
    counts: Tensor, sums: Tensor, second_moments: Tensor, ridge: float = 0.0
) -> Tuple[Tensor, Tensor]:
    """Means ``mu = s / n`` and unbiased covariances ``Sigma = (G - n mu mu^T) / (n - 1) + ridge I`` from
    :func:`class_moments`' sums (``torch.cov``'s estimate of the class's features, plus a ridge; the
    authors add ``1e-4 I``). A class with a single sample has no scatter: its covariance is ``ridge I``.

    Args:
        counts: ``(K,)``; sums: ``(K, dim)``; second_moments: ``(K, dim, dim)``.
        ridge: added to each covariance's diagonal.

    Returns:
        ``(means (K, dim), covariances (K, dim, dim))`` in the dtype of ``sums``.
    """
    n = counts.to(sums.dtype)
    means = sums / n.clamp(min=1.0)[:, None]
    scatter = second_moments - n[:, None, None] * means[:, :, None] * means[:, None, :]
    covariances = scatter / (n - 1.0).clamp(min=1.0)[:, None, None]
    covariances = covariances.masked_fill((n <= 1.0)[:, None, None], 0.0)
    covariances = (covariances + covariances.transpose(1, 2)) / 2  # exactly symmetric
    eye = torch.eye(sums.shape[1], dtype=sums.dtype, device=sums.device)
    return means, covariances + ridge * eye


def mean_decay(class_tasks: Tensor, current_task: int) -> Tensor:
    """The factor the authors' code scales each class mean by before sampling: ``0.9 + 0.1 (t_c + 1) / (T + 1)``,
    ``t_c`` the task (counted from 0) whose end computed class ``c``'s statistics, ``T`` the current one. The
    current task's classes keep their mean (factor 1); older ones are drawn closer to the origin."""
    return 0.9 + 0.1 * (class_tasks.double() + 1.0) / (current_task + 1.0)


def sample_class_features(means: Tensor, scale_trils: Tensor, noise: Tensor) -> Tensor:
    """Samples of ``N(mu_k, L_k L_k^T)``: ``x = mu_k + L_k z`` for each standard-normal ``z``.

    Args:
        means: ``(K, dim)``.
        scale_trils: ``(K, dim, dim)`` lower Cholesky factors ``L_k`` of the covariances.
        noise: ``(K, samples, dim)`` standard-normal draws ``z``.

    Returns:
        ``(K, samples, dim)``.
    """
    return means[:, None, :] + noise @ scale_trils.transpose(1, 2)


def task_normalized_logits(logits: Tensor, task_ids: Tensor, num_tasks: int, temperature: float) -> Tensor:
    """The authors' logit normalisation: ``z / (tau * mean_t (||z_t|| + eps))``, ``z_t`` the logits of the
    classes of task ``t``, ``eps = 1e-7``. The norm is part of the graph (its gradient is not stopped).

    Args:
        logits: ``(batch, K)``.
        task_ids: ``(K,)`` each column's task, in ``[0, num_tasks)``; every task must have a column.
        num_tasks: the number of tasks.
        temperature: ``tau``.
    """
    squares = logits.new_zeros(logits.shape[0], num_tasks).index_add_(1, task_ids, logits.square())
    norms = (squares.sqrt() + NORM_EPS).mean(1, keepdim=True)
    return logits / norms / temperature


def alignment_loss(
    logits: Tensor, targets: Tensor, task_ids: Tensor, num_tasks: int, temperature: Optional[float]
) -> Tensor:
    """The cross-entropy the head is aligned with: of :func:`task_normalized_logits` with ``temperature``,
    or of the raw logits when it is None."""
    if temperature is not None:
        logits = task_normalized_logits(logits, task_ids, num_tasks, temperature)
    return F.cross_entropy(logits, targets)


def alignment_epoch(
    weight: Tensor,
    bias: Optional[Tensor],
    optimizer: torch.optim.Optimizer,
    features: Tensor,
    targets: Tensor,
    task_ids: Tensor,
    num_tasks: int,
    temperature: Optional[float],
    batch_size: int,
) -> Tensor:
    """One epoch of classifier alignment: :func:`alignment_loss` of ``features @ weight^T + bias`` over
    consecutive batches of ``batch_size`` rows, one ``optimizer`` step each (``optimizer`` holds ``weight``
    and ``bias``). Returns the batches' summed loss (a tensor: no host sync)."""
    total = features.new_zeros(())
    for start in range(0, features.shape[0], batch_size):
        x, y = features[start : start + batch_size], targets[start : start + batch_size]
        loss = alignment_loss(F.linear(x, weight, bias), y, task_ids, num_tasks, temperature)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total = total + loss.detach()
    return total


def align_classifier(
    weight: Tensor,
    bias: Optional[Tensor],
    means: Tensor,
    scale_trils: Tensor,
    task_ids: Tensor,
    num_tasks: int,
    *,
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    samples_per_class: int,
    temperature: Optional[float],
    generator: torch.Generator,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Retrain a linear head on features drawn from the classes' Gaussians (SLCA's classifier alignment).

    Each epoch draws ``samples_per_class`` features per class (:func:`sample_class_features`, the normal
    draws and the shuffle from ``generator``, on the CPU), shuffles them together, and runs
    :func:`alignment_epoch` over batches of ``samples_per_class`` rows (as many batches as classes) with SGD
    (``lr``, ``momentum``, ``weight_decay``), the learning rate annealed by a cosine over the epochs (torch's
    ``CosineAnnealingLR``, stepped per epoch), as in the authors' code. Each epoch's draws, in order:
    ``torch.randn(K, samples_per_class, dim, generator=generator)`` (class ``k``'s standard-normal draws are
    row ``k``), then ``torch.randperm(K * samples_per_class, generator=generator)`` (the shuffle); feeding
    the same numbers to the authors' ``MultivariateNormal.sample`` and ``torch.randperm`` reproduces their
    alignment.

    Args:
        weight: ``(K, dim)`` the head's rows of the ``K`` classes; bias: ``(K,)`` or None.
        means: ``(K, dim)`` the means to sample around (already scaled, see :func:`mean_decay`).
        scale_trils: ``(K, dim, dim)`` Cholesky factors of the covariances.
        task_ids: ``(K,)`` each class's task, in ``[0, num_tasks)`` with every task present (the logit
            norm's groups).
        num_tasks: the number of tasks in ``task_ids``.
        temperature: the logit normalisation's ``tau``; None trains on raw logits.
        generator: a CPU generator; advanced by the draws.

    Returns:
        The aligned ``(weight, bias)``: new float32 tensors (the inputs are not changed).
    """
    k, dim = weight.shape
    device = weight.device
    w = weight.detach().float().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().float().clone().requires_grad_(True)
    params = [w] if b is None else [w, b]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    labels = torch.arange(k, device=device).repeat_interleave(samples_per_class)
    with torch.enable_grad():
        for _ in range(epochs):
            noise = torch.randn(k, samples_per_class, dim, generator=generator).to(device)
            order = torch.randperm(k * samples_per_class, generator=generator).to(device)
            drawn = sample_class_features(means.float(), scale_trils.float(), noise).reshape(-1, dim)
            alignment_epoch(
                w, b, optimizer, drawn[order], labels[order], task_ids, num_tasks, temperature, samples_per_class
            )
            schedule.step()
    return w.detach(), None if b is None else b.detach()
