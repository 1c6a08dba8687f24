"""Pure functions of the prompt methods (L2P, DualPrompt, CODA-Prompt): query-key matching, prompt selection,
the key-query surrogate loss, and attention with prefix keys and values.

None of them synchronises host and device: the batch-wise selection counts prompts with ``index_add_``
over the pool, not with ``torch.unique`` (whose output size the host must read).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["l2_normalize", "key_similarity", "select_prompts", "key_pull", "prefix_attention"]


def l2_normalize(x: Tensor, dim: int = -1, epsilon: float = 1e-12) -> Tensor:
    """``x / sqrt(max(sum(x^2), epsilon))`` along ``dim``: the normalisation of the L2P and DualPrompt
    authors' code (``F.normalize`` clamps the norm, not its square, so it differs for near-zero vectors)."""
    square_sum = x.pow(2).sum(dim=dim, keepdim=True)
    return x * torch.rsqrt(square_sum.clamp(min=epsilon))


def key_similarity(query: Tensor, keys: Tensor) -> Tensor:
    """The cosine similarity ``gamma(q_i, k_j)`` of each query with each key: ``(batch, pool)``.

    Args:
        query: ``(batch, dim)``, the frozen model's features of each sample.
        keys: ``(pool, dim)``, one learned key per prompt.
    """
    return l2_normalize(query, dim=-1) @ l2_normalize(keys, dim=-1).T


def select_prompts(similarity: Tensor, top_k: int, batchwise: bool = False) -> Tensor:
    """The indices ``(batch, top_k)`` of the prompts each sample uses.

    Per sample, the ``top_k`` keys most similar to its query. With ``batchwise`` (the authors' code's
    ``batchwise_prompt``), every sample then uses the same ``top_k`` prompts: those chosen most often over
    the batch, ties going to the lower index, in order of decreasing count.

    Args:
        similarity: ``(batch, pool)`` query-key similarities (:func:`key_similarity`).
        top_k: prompts per sample, at most ``pool``.
        batchwise: share the batch's most frequent prompts among all its samples.
    """
    pool = similarity.shape[1]
    idx = similarity.topk(top_k, dim=1).indices
    if not batchwise:
        return idx
    counts = torch.zeros(pool, dtype=similarity.dtype, device=similarity.device)
    counts.index_add_(0, idx.reshape(-1), torch.ones(idx.numel(), dtype=counts.dtype, device=counts.device))
    # A count is an integer below 2^24, so count * pool + (pool - 1 - j) is exact in float32 and distinct
    # for every j: topk then picks the most frequent, the lower index first on a tie.
    order = torch.arange(pool - 1, -1, -1, dtype=counts.dtype, device=counts.device)
    major = (counts * pool + order).topk(top_k).indices
    return major.expand(similarity.shape[0], -1)


def key_pull(query: Tensor, keys: Tensor, idx: Tensor) -> Tensor:
    """The surrogate that pulls the selected keys toward the queries: the summed cosine similarity of each
    sample's query with the keys it selected, over the batch size,
    ``(1 / B) sum_i sum_{j in K_i} gamma(q_i, k_j)``. The loss is ``-coefficient`` times this (the authors'
    ``reduce_sim``, subtracted from the loss).

    Args:
        query: ``(batch, dim)``.
        keys: ``(pool, dim)``.
        idx: ``(batch, top_k)`` the selected prompts (:func:`select_prompts`).
    """
    query_norm = l2_normalize(query, dim=-1)
    selected = l2_normalize(keys, dim=-1)[idx]  # (batch, top_k, dim)
    return (selected * query_norm.unsqueeze(1)).sum() / query.shape[0]


def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_prefix: Optional[Tensor] = None,
    value_prefix: Optional[Tensor] = None,
    *,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Multi-head attention whose keys and values are prefixed with learned ones (prefix-tuning):
    ``softmax(q [P_k; k]^T * scale) [P_v; v]``, per head.

    Args:
        q, k, v: ``(batch, heads, tokens, head_dim)``.
        key_prefix, value_prefix: ``(batch or 1, heads, prefix, head_dim)``, both or neither; a prefix of
            length 0 (or none) gives plain attention.
        scale: the logits' scale (default ``head_dim ** -0.5``).
        dropout_p: dropout on the attention weights.

    Returns:
        ``(batch, heads, tokens, head_dim)``.
    """
    if (key_prefix is None) != (value_prefix is None):
        raise ValueError("key_prefix and value_prefix go together: pass both or neither")
    if key_prefix is not None and value_prefix is not None:
        batch = q.shape[0]
        k = torch.cat([key_prefix.expand(batch, -1, -1, -1).to(k.dtype), k], dim=2)
        v = torch.cat([value_prefix.expand(batch, -1, -1, -1).to(v.dtype), v], dim=2)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
