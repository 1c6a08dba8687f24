"""CODA-Prompt's invariants on tiny random ViTs: the backbone and the frozen components never move, new
components start orthogonal, shapes follow the model, the loss is the authors' masked cross-entropy."""

import copy

import pytest
import torch
import torch.nn.functional as F

from synapse import catalog, testing
from synapse.functional import coda_assemble_prompt, coda_component_weights, coda_gram_schmidt
from synapse.pretrained import CODAPrompt

timm = pytest.importorskip("timm")

SMALL = {"pool_size": 6, "num_tasks": 3, "prompt_layers": 2}


def vit(embed_dim=32, num_heads=2, depth=2, classes=10):
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=8,
        depth=depth,
        embed_dim=embed_dim,
        num_heads=num_heads,
        num_classes=classes,
    )


def batch(seed, classes=(0, 1), n=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=g)]
    return x, y


def train_task(model, coda, classes, steps=3, seed=0, lr=0.05):
    optimizer = torch.optim.Adam(coda.trainable_parameters(), lr=lr)  # a new optimizer per task, as the authors
    for step in range(steps):
        x, y = batch(seed + step, classes)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        coda.backward(loss, y, x=x)
        optimizer.step()


def test_new_components_are_orthonormal_to_untrained_earlier_ones():
    torch.manual_seed(0)
    coda = CODAPrompt(vit(), **SMALL)
    coda.end_task()  # nothing trained: the first slice is still as Gram-Schmidt made it
    coda.end_task()
    for part in ("keys", "attention", "components"):
        # (layers, 6, n): two frozen slices, then the current one (drawn, not yet in use)
        rows = torch.cat([coda.pool(part), getattr(coda, part)], dim=1).detach().flatten(2)
        for layer in rows:
            assert torch.allclose(layer @ layer.T, torch.eye(6), atol=1e-5), part


def test_new_components_are_the_authors_gram_schmidt_of_the_trained_ones():
    torch.manual_seed(0)
    model = vit()
    coda = CODAPrompt(model, **SMALL)
    train_task(model, coda, (0, 1))
    generator = copy.deepcopy(coda.generator)
    trained = {part: getattr(coda, part).detach().clone() for part in ("keys", "attention", "components")}
    coda.end_task()
    for layer in range(2):
        for part in ("keys", "attention", "components"):  # the authors' draw order within a block
            earlier = trained[part][layer].flatten(1)
            draws = torch.stack([torch.randn(earlier.shape[1], generator=generator) for _ in range(2)])
            expected = coda_gram_schmidt(earlier, draws)
            assert torch.allclose(getattr(coda, part)[layer].detach().flatten(1), expected, atol=1e-6)


def test_the_next_slice_joins_the_prediction_at_the_next_tasks_first_training_forward():
    """The authors draw the next task's slice at its start, after evaluating the ended task: the logits right
    after end_task are those before it; the slice drawn at end_task joins at the next training forward."""
    torch.manual_seed(0)
    model = vit()
    coda = CODAPrompt(model, **SMALL)
    train_task(model, coda, (0, 1))
    x, _ = batch(99)
    before = coda.predict(x=x)
    coda.end_task()
    assert torch.equal(coda.predict(x=x), before)
    assert coda.pool("keys").shape[1] == 2 and not coda.slice_in_use
    drawn = coda.keys.detach().clone()
    x1, y1 = batch(5, (2, 3))
    model(x1)  # task 1's first training forward
    assert coda.slice_in_use and coda.pool("keys").shape[1] == 4
    assert torch.equal(coda.pool("keys")[:, 2:], drawn)  # the same draws as at end_task
    assert not torch.equal(coda.predict(x=x), before)


def test_a_vit_inside_the_experiment_programs_wrapper():
    from synapse.experiments.models import Classifier, Normalize

    torch.manual_seed(0)
    wrapped = Classifier(Normalize((0.5,), (0.5,)), testing.toy_vit(), channels=3)
    coda = CODAPrompt(wrapped, **SMALL)
    x = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    y = torch.tensor([0, 1, 0, 1])
    optimizer = torch.optim.Adam(coda.trainable_parameters(), lr=0.05)
    coda.backward(F.cross_entropy(wrapped(x), y), y, inputs=x)
    optimizer.step()
    assert coda.keys.grad is not None and coda.keys.grad.abs().sum() > 0
    coda.end_task()
    assert coda.predict(inputs=x).shape == (4, 10)


def test_frozen_components_and_the_backbone_never_move():
    torch.manual_seed(0)
    model = vit()
    backbone = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    head = model.head.weight.detach().clone()
    coda = CODAPrompt(model, **SMALL)
    train_task(model, coda, (0, 1))
    coda.end_task()
    frozen = {part: coda.pool(part)[:, :2].detach().clone() for part in ("keys", "attention", "components")}
    fresh = coda.keys.detach().clone()
    train_task(model, coda, (2, 3), seed=10)
    for part, before in frozen.items():
        assert torch.equal(coda.pool(part)[:, :2], before), part
    assert not torch.equal(coda.keys, fresh)  # the current slice trains
    assert not torch.equal(model.head.weight, head)  # and the head
    for k, v in model.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, backbone[k]), k


@pytest.mark.parametrize("embed_dim, num_heads, depth", [(32, 2, 2), (48, 4, 3)])
def test_shapes_follow_the_model(embed_dim, num_heads, depth):
    model = vit(embed_dim, num_heads, depth)
    coda = CODAPrompt(model, pool_size=6, num_tasks=3, prompt_length=4, prompt_layers=depth)
    assert coda.keys.shape == coda.attention.shape == (depth, 2, embed_dim)
    assert coda.components.shape == (depth, 2, 4, embed_dim)
    assert coda.frozen_components.shape == (depth, 6, 4, embed_dim)
    x, _ = batch(0)
    query = coda.query(x=x)
    prefixes = coda.prefixes(query)
    assert sorted(prefixes) == list(range(depth))
    assert all(k.shape == v.shape == (8, 2, embed_dim) for k, v in prefixes.values())
    assert model(x).shape == (8, 10)


def test_the_prefix_is_the_weighted_sum_of_the_components_for_the_query():
    torch.manual_seed(0)
    model = vit()
    coda = CODAPrompt(model, **SMALL)
    x, _ = batch(0)
    model(x)
    query = coda.query(x=x)
    with torch.no_grad():
        for i, alpha in enumerate(coda.last_weights):
            assert torch.allclose(alpha, coda_component_weights(query, coda.keys[i], coda.attention[i]))
            keys, values = coda.prefixes(query)[i]
            prompt = coda_assemble_prompt(alpha, coda.components[i])
            assert torch.allclose(torch.cat([keys, values], 1), prompt)


def test_the_loss_is_the_cross_entropy_over_the_current_tasks_classes():
    torch.manual_seed(0)
    model = vit()
    coda = CODAPrompt(model, **SMALL)
    train_task(model, coda, (0, 1))
    coda.end_task()
    x, y = batch(5, (2, 3))
    y[0] = 4  # class 4 joins the task in this batch
    logits = model(x)
    allowed = torch.zeros(10, dtype=torch.bool)
    allowed[[2, 3, 4]] = True  # the task's classes so far: past classes 0, 1 and unseen ones are out
    reference = F.cross_entropy(logits.masked_fill(~allowed, float("-inf")), y)
    params = coda.trainable_parameters()
    expected = torch.autograd.grad(reference, params, retain_graph=True)
    for p in params:
        p.grad = None
    coda.backward(F.cross_entropy(logits, y), y, x=x)
    for p, g in zip(params, expected):
        assert torch.allclose(p.grad, g, atol=1e-6)
    assert coda.predict(x=x)[:, 5:].isinf().all() and coda.predict(x=x)[:, :5].isfinite().all()


def test_user_loss_is_kept_with_current_loss_user():
    torch.manual_seed(0)
    model = vit()
    coda = CODAPrompt(model, **SMALL, current_loss="user")
    x, y = batch(0)
    loss = F.cross_entropy(model(x), y) * 3.0
    params = coda.trainable_parameters()
    expected = torch.autograd.grad(loss, params, retain_graph=True)
    coda.backward(loss, y, x=x)
    for p, g in zip(params, expected):
        assert torch.allclose(p.grad, g, atol=1e-6)


def test_ortho_penalty_adds_its_gradient():
    torch.manual_seed(0)
    model = vit()
    coda = CODAPrompt(model, **SMALL, ortho_mu=0.5, current_loss="user")
    x, y = batch(0)
    loss = F.cross_entropy(model(x), y)
    penalty = sum(
        ((p[i].flatten(1) @ p[i].flatten(1).T - torch.eye(2)) ** 2).mean()
        for p in (coda.keys, coda.attention, coda.components)
        for i in range(2)
    )
    expected = torch.autograd.grad(loss + 0.5 * penalty, [coda.keys], retain_graph=True)[0]
    coda.backward(loss, y, x=x)
    assert torch.allclose(coda.keys.grad, expected, atol=1e-6)


def test_training_past_the_last_slice_is_refused_and_changes_nothing():
    model = vit()
    coda = CODAPrompt(model, pool_size=2, num_tasks=2, prompt_layers=1)
    coda.end_task()
    coda.end_task()
    before = copy.deepcopy(coda.state_dict())
    x, y = batch(0)
    with pytest.raises(ValueError, match="num_tasks=2"):
        coda.backward(F.cross_entropy(model(x), y), y, x=x)
    assert testing.state_equal(coda.state_dict(), before)
    assert coda.predict(x=x).shape == (8, 10)  # it still predicts, with every frozen component


def test_a_model_it_cannot_prompt_is_refused_untouched():
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10))
    with pytest.raises(TypeError, match="VisionTransformer"):
        CODAPrompt(mlp)
    assert all(p.requires_grad for p in mlp.parameters())
    model = vit(depth=2)
    with pytest.raises(ValueError, match="prompt_layers=5"):
        CODAPrompt(model)
    assert all(p.requires_grad for p in model.parameters()) and not model.blocks[0].attn.__dict__.get("forward")


def test_resume_and_rejections_through_the_harness():
    spec = catalog.get("coda-prompt")
    testing.check_resume(spec)
    testing.check_rejected_calls(spec)


def test_the_floor_computes_the_same_logits_and_gradients_as_the_hooked_model():
    from synapse.pretrained.coda_prompt import CODAPromptFloor

    torch.manual_seed(0)
    a, b = vit(depth=3), vit(depth=3)
    b.load_state_dict(a.state_dict())
    hp = {**catalog.get("coda-prompt").defaults(), **SMALL, "prompt_layers": 3}
    coda = CODAPrompt(a, **{k: v for k, v in hp.items() if k != "current_loss"})
    for _ in range(2):  # the floor's point: after two task ends, two frozen slices and the current one
        coda.end_task()
    floor = CODAPromptFloor(b, 8, 4, (3, 16, 16), hp)
    past = 2 * hp["pool_size"] // hp["num_tasks"]
    assert coda.frozen_count == past and all(frozen.shape[1] == past for frozen in floor.frozen.values())
    with torch.no_grad():
        for mine, theirs in zip(coda.own_parameters(), floor.extra):
            theirs.copy_(mine)
        for part, frozen in floor.frozen.items():
            frozen.copy_(getattr(coda, f"frozen_{part}")[:, :past])
    x, y = batch(0)
    logits = floor.forward(x)
    assert torch.allclose(a(x), logits, atol=1e-5)
    loss = F.cross_entropy(a(x), y)
    coda.backward(loss, y, x=x)
    floor.backward(loss, y, x, logits)
    for mine, theirs in zip(coda.own_parameters(), floor.extra):
        assert torch.allclose(mine.grad, theirs.grad, atol=1e-5)
