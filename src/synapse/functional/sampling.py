"""Which items a memory keeps, and replay minibatches.

Reservoir slots and replay minibatches are decided on the host (no device values are read); iCaRL's
herding runs on the features' device.
"""

from __future__ import annotations

from typing import Callable, Iterable, List, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "reservoir_plan",
    "reservoir_draws",
    "last_wins",
    "distinct_subsets",
    "eligible_subset",
    "herding_selection",
]


def reservoir_draws(first: int, uniforms: np.ndarray, capacity: int) -> Tuple[np.ndarray, np.ndarray]:
    """Algorithm R's replacements for the stream items ``first, first + 1, ...`` (one uniform each).

    Item ``t >= capacity`` draws ``j = floor(u_t * (t + 1))``, uniform on ``{0..t}``, and replaces slot
    ``j`` if ``j < capacity`` (float64 keeps this exact far beyond any realistic stream). Items below
    ``capacity`` fill their own slot and are not listed.

    Returns:
        ``(offsets, slots)``: the replacing items as offsets from ``first`` (ascending), and their slots.
    """
    t = first + np.arange(len(uniforms))
    drawn = (uniforms * (t + 1)).astype(np.int64)
    offsets = np.flatnonzero((drawn < capacity) & (t >= capacity))
    return offsets, drawn[offsets]


def last_wins(slots: Iterable[int], rows: Iterable[int]) -> Tuple[List[int], List[int]]:
    """Keep, for each slot written more than once by one batch, only the last row (as sequential
    insertion would); ``rows`` must be in stream order."""
    last = dict(zip(slots, rows))  # a later row overwrites an earlier one's entry
    return list(last), list(last.values())


def reservoir_plan(
    num_seen: int, batch: int, capacity: int, rng: Union[np.random.Generator, Callable[[int], np.ndarray]]
) -> Tuple[List[int], List[int]]:
    """Which rows of the next batch enter the reservoir, and where (Algorithm R, vectorised on the host).

    Item ``t`` (0-based over the whole stream) fills slot ``t`` while ``t < capacity``; afterwards it
    replaces a slot as :func:`reservoir_draws` says. When several rows of the batch pick the same slot
    the last one wins, exactly as one-at-a-time insertion would. ``rng`` is the generator, or a function
    giving the ``n`` uniforms ``rng.random(n)`` would (draws made ahead); it is called at most once.

    Returns:
        ``(slots, rows)``: distinct slots, and for each the batch row that ends up there.
    """
    filling = min(max(capacity - num_seen, 0), batch)  # rows that take the next free slots
    rows = list(range(filling))
    slots = list(range(num_seen, num_seen + filling))
    if filling == batch:
        return slots, rows
    uniforms = (rng.random if isinstance(rng, np.random.Generator) else rng)(batch - filling)
    hits, drawn = reservoir_draws(num_seen + filling, uniforms, capacity)
    return last_wins(slots + drawn.tolist(), rows + (hits + filling).tolist())


def distinct_subsets(rng: np.random.Generator, n: int, k: int, rows: int) -> np.ndarray:
    """``rows`` independent, uniformly random ``k``-subsets of ``range(n)``, as a ``(rows, k)`` array.

    Small ``k`` draws ``k`` integers per row and redraws the rows that repeat one (rejection keeps the
    distribution exactly uniform over subsets, and is cheap while ``k * k <= 2 n``); larger ``k`` takes
    the ``k`` smallest of ``n`` uniforms per row.
    """
    if k == n:
        return rng.permuted(np.broadcast_to(np.arange(n), (rows, n)), axis=1)
    if k * k > 2 * n:
        return np.argpartition(rng.random((rows, n)), k - 1, axis=1)[:, :k]
    picks = rng.integers(0, n, size=(rows, k))
    redo = np.arange(rows)
    while len(redo):
        ordered = np.sort(picks[redo], axis=1)
        redo = redo[(ordered[:, 1:] == ordered[:, :-1]).any(axis=1)]
        picks[redo] = rng.integers(0, n, size=(len(redo), k))
    return picks


def eligible_subset(keys: Tensor, eligible: Tensor, c: int) -> Tuple[Tensor, Tensor]:
    """A uniformly random ``c``-subset of the rows ``eligible`` marks, drawn on their device with no host
    sync: the ``c`` eligible rows with the largest ``keys``.

    With ``keys`` i.i.d. uniform on ``[0, 1)``, the rows holding the ``c`` largest keys among the eligible
    ones are a uniformly random ``c``-subset of them (sampling without replacement, as
    ``numpy.random.choice(n, c, replace=False)`` draws it). Ineligible rows get the key ``-1``, so they
    come last; when fewer than ``c`` rows are eligible, the subset is padded with ineligible rows, which the
    returned mask marks (the number eligible is a device value the host does not read).

    Args:
        keys: ``(n,)`` floating keys in ``[0, 1)``.
        eligible: ``(n,)`` bool mask of the rows that may be drawn.
        c: rows to draw, ``1 <= c <= n``.

    Returns:
        ``(indices, valid)``: ``(c,)`` int64 row indices (by decreasing key) and the ``(c,)`` bool mask of
        those that are eligible.

    Example:
        >>> eligible_subset(torch.tensor([0.9, 0.5, 0.7, 0.1]), torch.tensor([False, True, True, True]), 2)
        (tensor([2, 1]), tensor([True, True]))
    """
    if keys.dim() != 1 or eligible.shape != keys.shape or eligible.dtype != torch.bool:
        raise ValueError(
            f"keys must be 1-d and eligible a bool mask of its shape, got {_describe(keys)} and {_describe(eligible)}"
        )
    if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= keys.shape[0]:
        raise ValueError(f"c must be an int in [1, {keys.shape[0]}], got {c!r}")
    indices = torch.where(eligible, keys, torch.full_like(keys, -1.0)).topk(c).indices
    return indices, eligible.index_select(0, indices)


def herding_selection(features: Tensor, m: int, *, normalize: bool = True) -> Tensor:
    """iCaRL's exemplar selection by herding (Rebuffi et al. 2017, *iCaRL: Incremental Classifier and
    Representation Learning*, Algorithm 4, "ConstructExemplarSet").

    With ``phi(x)`` the features of one class's ``n`` items (L2-normalised, as in the paper, unless
    ``normalize=False``) and ``mu = (1/n) sum_x phi(x)`` their mean, exemplar ``k = 1, 2, ...`` is

        ``p_k = argmin_x || mu - (1/k) (phi(x) + sum_{j<k} phi(p_j)) ||``,

    so the running mean of the chosen features follows the class mean as closely as one more item
    allows. The argmin ranges over the items not chosen yet (the paper writes ``x in X``; an item is
    taken once, as in the authors' and the DER authors' implementations); ties go to the lowest index.
    The squared distance is expanded so each step is one matrix-vector product,
    ``k^2 ||mu - (S + phi)/k||^2 = const + ||phi||^2 - 2k <mu - S/k, phi>`` with ``S`` the chosen
    features' sum. Runs on the features' device without reading device values.

    Args:
        features: ``(n, d)`` features of one class's items.
        m: the number of exemplars wanted (``0 <= m``); the class gives ``min(m, n)``.
        normalize: L2-normalise each row first (the paper's ``phi``).

    Returns:
        ``(min(m, n),)`` int64 indices into ``features``' rows, in selection order ``p_1, p_2, ...``:
        the first ``j`` of them are the selection for a budget of ``j`` (Algorithm 5 keeps a prefix).

    Example:
        >>> herding_selection(torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]]), 5, normalize=False)
        tensor([3, 2, 1, 4, 0])
    """
    if not isinstance(features, Tensor) or features.dim() != 2 or not features.is_floating_point():
        raise ValueError(f"features must be a floating (n, d) tensor, got {_describe(features)}")
    if isinstance(m, bool) or not isinstance(m, int) or m < 0:
        raise ValueError(f"m must be an int >= 0, got {m!r}")
    phi = features.detach()
    if phi.dtype in (torch.float16, torch.bfloat16):
        phi = phi.float()
    if normalize:
        phi = F.normalize(phi, dim=1)
    count = min(m, phi.shape[0])
    chosen = torch.empty(count, dtype=torch.int64, device=phi.device)
    if count == 0:
        return chosen
    mu = phi.mean(0)
    squared = (phi * phi).sum(1)
    total = torch.zeros_like(mu)  # S: the sum of the chosen features
    taken = torch.zeros(phi.shape[0], dtype=torch.bool, device=phi.device)
    for k in range(1, count + 1):
        score = torch.addmv(squared, phi, mu - total / k, alpha=-2.0 * k)
        best = score.masked_fill_(taken, float("inf")).argmin().view(1)  # first of equal minima
        chosen[k - 1 : k] = best
        total += phi.index_select(0, best)[0]
        taken.index_fill_(0, best, True)
    return chosen


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__
