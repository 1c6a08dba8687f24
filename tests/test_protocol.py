"""The reproduction's protocol pieces against hand computations: input scaling, initialisation, ER's loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import mlp
from synapse.experiments.datasets import DATASETS
from synapse.experiments.models import create_model
from synapse.rehearsal import ER


def test_seq_mnist_protocol_feeds_pixels_in_0_1_without_normalisation():
    p = DATASETS["fashion-mnist"].protocol
    assert p.normalize is False and p.init == "xavier"
    model = create_model("mlp", 1, 28, 10, (0.286,), (0.353,), normalize=p.normalize, init=p.init)
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).repeat_interleave(28 * 28 // 3 + 1)[: 28 * 28]
    scaled = model.normalize(images.view(1, 1, 28, 28))
    # ToTensor(): x / 255, nothing else.
    assert torch.allclose(scaled.unique(), torch.tensor([0, 51, 255]) / 255.0, rtol=0, atol=1e-7)


def test_normalised_models_standardise_per_channel():
    model = create_model("mlp", 1, 28, 10, (0.5,), (0.25,))
    x = torch.full((1, 1, 28, 28), 255, dtype=torch.uint8)
    assert torch.allclose(model.normalize(x), torch.full((1, 1, 28, 28), (1.0 - 0.5) / 0.25))


def test_xavier_init_matches_the_glorot_formula():
    torch.manual_seed(0)
    model = create_model("mlp", 1, 28, 10, (0.0,), (1.0,), init="xavier")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(100, 784), (100, 100), (10, 100)]
    for m in linears:
        fan_out, fan_in = m.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))  # sqrt(3) * sqrt(2 / (fan_in + fan_out))
        w = m.weight.detach()
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
        # A uniform on (-a, a) has variance a^2 / 3 = 2 / (fan_in + fan_out).
        assert w.var().item() == pytest.approx(bound**2 / 3, rel=0.1)
        assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_unknown_init_is_rejected():
    with pytest.raises(ValueError, match="init"):
        create_model("mlp", 1, 28, 10, (0.0,), (1.0,), init="he")


def concatenated_mean_grad(model, x, y, bx, by):
    """The paper's ER: one cross-entropy mean over the batch and the buffer minibatch concatenated."""
    model.zero_grad()
    F.cross_entropy(model(torch.cat([x, bx])), torch.cat([y, by])).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("stored", [0, 3, 10, 40])  # empty, fewer than the minibatch, exactly it, more
def test_er_joint_mean_equals_the_concatenated_batch_mean(fused, stored):
    torch.manual_seed(0)
    model = mlp()
    syn = ER(model, buffer_size=40, buffer_sample_size=10, alpha=1.0, method="er", joint_mean=True, fused=fused)
    g = torch.Generator().manual_seed(1)
    if stored:
        sx, sy = torch.randn(stored, 1, 28, 28, generator=g), torch.randint(0, 10, (stored,), generator=g)
        syn.buffer.add({"input:input": sx, "targets": sy})
        syn._input_names = syn._forward.input_names = ("input",)
    x, y = torch.randn(6, 1, 28, 28, generator=g), torch.randint(0, 10, (6,), generator=g)
    # Record which rows the method replays, then recompute the paper's loss on exactly those.
    seen = []
    real_sample = syn._sample
    syn._sample = lambda *a, **k: seen.append(real_sample(*a, **k)) or seen[-1]
    model.zero_grad()
    syn.backward(F.cross_entropy(model(x), y), y, input=x)
    got = [p.grad.clone() for p in model.parameters()]
    if stored:
        sample = seen[0]
        assert sample["targets"].shape[0] == min(10, stored)  # k = min(minibatch, len(buffer))
        want = concatenated_mean_grad(model, x, y, sample["input:input"], sample["targets"])
    else:  # an empty buffer: the batch's own mean, at full weight (not halved)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        want = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-6)


def test_joint_mean_needs_er_and_alpha_one():
    with pytest.raises(ValueError, match="joint_mean"):
        ER(mlp(), method="der", joint_mean=True)
    with pytest.raises(ValueError, match="joint_mean"):
        ER(mlp(), method="er", alpha=0.5, joint_mean=True)


def test_agem_episodic_memory_constrains_only_with_finished_tasks():
    from synapse.functional import project_conflicting_
    from synapse.gradient import AGEM

    torch.manual_seed(0)
    model = mlp()
    syn = AGEM(model, buffer_size=20, buffer_sample_size=30, memory="episodic")
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(5)]

    def plain_grad(x, y):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    for i, (x, y) in enumerate(data):
        want = plain_grad(x, y)
        if i >= 3:  # task 2: the reference is the gradient on all 12 items of task 1 (k = 30 > 12)
            mx, my = syn.buffer.task(0)["input:input"], syn.buffer.task(0)["targets"]
            want = project_conflicting_(want, plain_grad(mx, my))
        model.zero_grad()
        syn.backward(F.cross_entropy(model(x), y), y, input=x)
        got = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert torch.allclose(got, want, atol=1e-6), i
        if i == 2:
            syn.end_task()
            assert syn.buffer.task_sizes == (12,)  # every item of task 1 (12 < the share of 20)


def test_agem_memory_choice_is_checked():
    from synapse.gradient import AGEM

    with pytest.raises(ValueError, match="memory"):
        AGEM(mlp(), memory="ring")
