"""CODA-Prompt's pure functions against numbers worked out by hand."""

import math

import pytest
import torch

from synapse.functional import (
    coda_assemble_prompt,
    coda_component_weights,
    coda_gram_schmidt,
    coda_ortho_penalty,
    coda_split_prefix,
)


def test_component_weights_are_the_cosine_of_the_attended_query_and_the_key():
    query = torch.tensor([[1.0, 2.0], [3.0, -4.0], [0.0, 0.0]])
    attention = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # the key's length does not matter
    # q*A_0 = (1, 0), (3, 0): cos with (1, 0) = 1; q*A_1 = (1, 2), (3, -4): cos with (0, 1) = 2/sqrt 5, -4/5;
    # a zero query has weight 0 (normalize clamps the norm)
    expected = torch.tensor([[1.0, 2 / math.sqrt(5)], [1.0, -0.8], [0.0, 0.0]])
    assert torch.allclose(coda_component_weights(query, keys, attention), expected)


def test_attention_selects_features_before_the_cosine():
    # A = (0, 1) hides the first feature: the weight then depends on the second one only
    query = torch.tensor([[5.0, 1.0]])
    weights = coda_component_weights(query, torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]]))
    assert torch.allclose(weights, torch.tensor([[1.0]]))


def test_assembled_prompt_is_the_weighted_sum_of_the_components():
    components = torch.tensor([[[1.0, 2.0]], [[4.0, 6.0]]])  # 2 components of length 1, width 2
    weights = torch.tensor([[1.0, 0.5], [0.0, -1.0]])
    expected = torch.tensor([[[3.0, 5.0]], [[-4.0, -6.0]]])
    assert torch.equal(coda_assemble_prompt(weights, components), expected)


def test_split_prefix_gives_the_first_half_to_the_keys():
    prompt = torch.arange(2 * 3 * 2.0).reshape(2, 3, 2)
    keys, values = coda_split_prefix(prompt)
    assert torch.equal(keys, prompt[:, :1]) and torch.equal(values, prompt[:, 1:])
    keys, values = coda_split_prefix(torch.zeros(1, 8, 4))
    assert keys.shape == values.shape == (1, 4, 4)


def test_gram_schmidt_by_hand():
    previous = torch.tensor([[1.0, 0.0, 0.0]])
    draws = torch.tensor([[2.0, 3.0, 0.0], [1.0, 1.0, 1.0]])
    # u1 = (2,3,0) - 2 (1,0,0) = (0,3,0); u2 = (1,1,1) - (1,0,0) - 3/9 (0,3,0) = (0,0,1)
    expected = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert torch.allclose(coda_gram_schmidt(previous, draws), expected)


def test_gram_schmidt_is_classical_against_previous_rows_that_are_not_orthogonal():
    previous = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    # v = (1,2,3): v.p0 / p0.p0 = 1, v.p1 / p1.p1 = 3/2; u = v - (1,0,0) - (1.5,1.5,0) = (-1.5, 0.5, 3)
    new = coda_gram_schmidt(previous, torch.tensor([[1.0, 2.0, 3.0]]))
    expected = torch.tensor([[-1.5, 0.5, 3.0]]) / math.sqrt(11.5)
    assert torch.allclose(new, expected)


def test_gram_schmidt_skips_previous_rows_of_zero_length():
    previous = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    new = coda_gram_schmidt(previous, torch.tensor([[2.0, 3.0, 0.0]]))
    assert torch.allclose(new, torch.tensor([[0.0, 1.0, 0.0]]))


def test_gram_schmidt_of_random_draws_is_orthonormal_to_orthonormal_previous_rows():
    g = torch.Generator().manual_seed(0)
    previous = coda_gram_schmidt(torch.zeros(0, 40, dtype=torch.float64), torch.randn(6, 40, generator=g).double())
    new = coda_gram_schmidt(previous, torch.randn(5, 40, generator=g).double())
    both = torch.cat([previous, new])
    assert torch.allclose(both @ both.T, torch.eye(11, dtype=torch.float64), atol=1e-12)


def test_gram_schmidt_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same number of columns"):
        coda_gram_schmidt(torch.zeros(2, 3), torch.zeros(1, 4))


def test_ortho_penalty_by_hand():
    # V V^T - I = [[0, 1], [1, 1]]: squares 0 + 1 + 1 + 1 over 4 entries
    assert coda_ortho_penalty(torch.tensor([[1.0, 0.0], [1.0, 1.0]])).item() == pytest.approx(0.75)
    assert coda_ortho_penalty(torch.eye(3)).item() == 0.0
