"""CODA-Prompt's maths (Smith et al. 2023): the attention-weighted component weights, the assembled prompt,
its split into prefix keys and values, the Gram-Schmidt initialisation of new components and the
orthogonality penalty. Each is a pure function of its tensors; the equations are in
docs/methods/pretrained.md, "CODA-Prompt"."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "coda_component_weights",
    "coda_assemble_prompt",
    "coda_split_prefix",
    "coda_gram_schmidt",
    "coda_ortho_penalty",
    "CODA_GS_EPS",
]

# A previous component whose squared norm is below this has no direction to be made orthogonal to (the
# authors' code tests the same bound, and then draws again).
CODA_GS_EPS = 1e-8


def coda_component_weights(query: Tensor, keys: Tensor, attention: Tensor) -> Tensor:
    """``alpha_{b,m} = cos(q_b * A_m, K_m)``: each component's weight for each query.

    The query is multiplied elementwise by the component's attention vector before the cosine with the
    component's key. Norms are clamped at ``1e-12`` as ``torch.nn.functional.normalize`` does.

    Args:
        query: ``(batch, key_dim)``, the frozen model's feature of each input.
        keys: ``(components, key_dim)``, ``K``.
        attention: ``(components, key_dim)``, ``A``.

    Returns:
        ``(batch, components)`` weights in ``[-1, 1]``.
    """
    attended = query.unsqueeze(1) * attention.unsqueeze(0)  # (batch, components, key_dim)
    return torch.einsum("bmd,md->bm", F.normalize(attended, dim=2), F.normalize(keys, dim=1))


def coda_assemble_prompt(weights: Tensor, components: Tensor) -> Tensor:
    """``p_b = sum_m alpha_{b,m} P_m``: the weighted sum of the prompt components.

    Args:
        weights: ``(batch, components)``, from :func:`coda_component_weights`.
        components: ``(components, length, embed_dim)``, ``P``.

    Returns:
        ``(batch, length, embed_dim)``.
    """
    return torch.einsum("bm,mld->bld", weights, components)


def coda_split_prefix(prompt: Tensor) -> Tuple[Tensor, Tensor]:
    """The prompt's first ``length // 2`` tokens as the prefix keys and the rest as the prefix values, as
    the authors' code splits it (an odd length gives the values one token more)."""
    half = prompt.shape[1] // 2
    return prompt[:, :half], prompt[:, half:]


def coda_gram_schmidt(previous: Tensor, draws: Tensor, eps: float = CODA_GS_EPS) -> Tensor:
    """New components made orthogonal to the previous ones, as the authors' Gram-Schmidt does it.

    Row ``k`` of the result is the draw ``v_k`` less its projections onto every vector before it (the
    ``previous`` rows, then the new rows already made, before their normalisation), then normalised:

    ``u_k = v_k - sum_{j < k} (v_k . u_j / u_j . u_j) u_j``,  ``new_k = u_k / ||u_k||``.

    This is classical Gram-Schmidt: every projection is of the draw ``v_k`` itself. It gives rows exactly
    orthogonal to each other and to the previous ones when the previous rows are mutually orthogonal (as
    they are when they were made by this function and not trained since); trained previous rows are no
    longer orthogonal, and the new rows are then orthogonal to them only approximately, as in the authors'
    code. Previous rows with ``u.u < eps`` are skipped (the authors' code draws again, forever).

    Args:
        previous: ``(s, n)``, the components kept (flattened).
        draws: ``(m, n)``, the new components' random starting vectors.
        eps: the squared norm below which a vector is skipped.

    Returns:
        ``(m, n)``, unit rows.
    """
    if previous.ndim != 2 or draws.ndim != 2 or previous.shape[1] != draws.shape[1]:
        raise ValueError(
            f"previous and draws must be 2-d with the same number of columns, got {tuple(previous.shape)} and "
            f"{tuple(draws.shape)}"
        )
    basis = previous
    for v in draws:
        squared = (basis * basis).sum(1)
        usable = (squared >= eps).to(v.dtype)
        coefficients = usable * (basis @ v) / squared.clamp_min(eps)
        basis = torch.cat([basis, (v - coefficients @ basis).unsqueeze(0)])
    new = basis[previous.shape[0] :]
    return new / new.norm(dim=1, keepdim=True)


def coda_ortho_penalty(vectors: Tensor) -> Tensor:
    """``mean((V V^T - I)^2)``: how far the rows of ``vectors`` ``(m, n)`` are from orthonormal (the
    paper's orthogonality regulariser, averaged over the ``m x m`` entries as the authors' code)."""
    gram = vectors @ vectors.T
    return (gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)).pow(2).mean()
