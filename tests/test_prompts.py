"""L2P, DualPrompt and the prompt injection (synapse.pretrained._prompt): the pure functions against hand
computations, and the invariants of the methods on tiny random ViTs."""

import math

import pytest
import torch
import torch.nn.functional as F

from synapse.functional import key_pull, key_similarity, l2_normalize, prefix_attention, select_prompts
from synapse.pretrained import L2P, DualPrompt
from synapse.pretrained._prompt import Injection, PromptedViT
from synapse.pretrained.dualprompt import DualPromptFloor
from synapse.pretrained.l2p import L2PFloor

timm = pytest.importorskip("timm")


def vit(embed_dim=32, heads=2, depth=2, classes=10):
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=depth, embed_dim=embed_dim,
        num_heads=heads, num_classes=classes,
    )


def images(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 16, 16, generator=g), torch.randint(0, 10, (batch,), generator=g)


# ------------------------------------------------------------------------------------------- functional
def test_l2_normalize_by_hand():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert torch.allclose(l2_normalize(x), torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


def test_key_similarity_by_hand():
    query = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    keys = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, -1.0]])
    r = 1 / math.sqrt(2)
    expected = torch.tensor([[1.0, 0.0, -r], [r, r, -1.0]])
    assert torch.allclose(key_similarity(query, keys), expected, atol=1e-6)


def test_select_prompts_per_sample_and_batchwise_by_hand():
    similarity = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.1, 0.9, 0.8, 0.0], [0.0, 0.1, 0.8, 0.9]])
    idx = select_prompts(similarity, 2)
    assert idx.tolist() == [[0, 1], [1, 2], [3, 2]]
    # Counts over the batch: prompt 0 once, 1 twice, 2 twice, 3 once: 1 and 2 (a tie broken by index order
    # does not arise); every row gets them, most frequent first.
    assert select_prompts(similarity, 2, batchwise=True).tolist() == [[1, 2]] * 3
    # A tie: prompts 0 and 3 both once after 1 and 2: top 3 takes the lower index, 0.
    assert select_prompts(similarity, 3, batchwise=True)[0].tolist()[:2] == [1, 2]
    ties = torch.tensor([[0.9, 0.0, 0.0, 0.8], [0.0, 0.9, 0.8, 0.0]])  # counts 1, 1, 1, 1
    assert select_prompts(ties, 2, batchwise=True).tolist() == [[0, 1], [0, 1]]


def test_key_pull_by_hand():
    query = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    keys = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    idx = torch.tensor([[0, 1], [1, 2]])
    r = 1 / math.sqrt(2)
    # sample 0: cos(q0, k0) + cos(q0, k1) = 1 + r; sample 1: cos(q1, k1) + cos(q1, k2) = r - 1; over B = 2
    assert torch.isclose(key_pull(query, keys, idx), torch.tensor((1 + r + r - 1) / 2))


def test_prefix_attention_by_hand():
    # One head of width 1, one token: q = 1, k = 0, v = 2; prefix key 1, value 4; scale 1:
    # weights softmax([1*1, 1*0]) = (e, 1) / (e + 1); output (4e + 2) / (e + 1).
    one = lambda value: torch.tensor(value).view(1, 1, 1, 1)  # noqa: E731
    out = prefix_attention(one(1.0), one(0.0), one(2.0), one(1.0), one(4.0), scale=1.0)
    assert torch.isclose(out.squeeze(), torch.tensor((4 * math.e + 2) / (math.e + 1)))


def test_prefix_attention_with_an_empty_prefix_is_plain_attention():
    q, k, v = torch.randn(3, 2, 2, 5, 4).unbind(0)
    empty = torch.zeros(1, 2, 0, 4)
    assert torch.allclose(prefix_attention(q, k, v, empty, empty), F.scaled_dot_product_attention(q, k, v), atol=1e-6)
    with pytest.raises(ValueError, match="both or neither"):
        prefix_attention(q, k, v, empty, None)


# ------------------------------------------------------------------------------------------- injection
def test_an_empty_prefix_and_no_prompt_leave_the_model_as_it_was():
    torch.manual_seed(0)
    model, (x, _) = vit(depth=3), images()
    plain = model(x)
    empty = torch.zeros(1, 0, 32)
    injector = PromptedViT(model, lambda q, t: Injection(prefixes={1: (empty, empty)}), prefix_blocks=(1,))
    assert torch.allclose(model(x), plain, atol=1e-6)
    assert torch.allclose(injector.last_query, model.forward_head(model.forward_features(x), pre_logits=True))
    injector.remove()
    assert "forward" not in model.blocks[1].attn.__dict__ and torch.equal(model(x), plain)


def test_the_query_runs_in_eval_mode_and_gives_each_module_its_mode_back():
    """The query forward of a model with dropout is the eval-mode forward; a module the user put in eval mode
    stays so, the others train again."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=2, embed_dim=32, num_heads=2,
        num_classes=10, drop_rate=0.5, attn_drop_rate=0.5, drop_path_rate=0.5,
    )
    model.blocks[1].mlp.eval()
    modes = [m.training for m in model.modules()]
    x, _ = images()
    with torch.no_grad():
        expected = model.eval().forward_head(model.forward_features(x), pre_logits=True)
    for m, mode in zip(model.modules(), modes):
        m.training = mode
    injector = PromptedViT(model, lambda q, t: Injection())
    model(x)
    assert torch.equal(injector.last_query, expected)
    assert [m.training for m in model.modules()] == modes and True in modes and False in modes


def test_prefix_attention_in_a_block_is_the_attention_over_the_concatenated_keys():
    torch.manual_seed(0)
    model, (x, _) = vit(), images()
    kp, vp = torch.randn(1, 3, 32), torch.randn(1, 3, 32)
    seen = {}
    model.blocks[0].attn.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    injector = PromptedViT(model, lambda q, t: Injection(prefixes={0: (kp, vp)}), prefix_blocks=(0,))
    out = {}
    model.blocks[0].attn.register_forward_hook(lambda m, a, o: out.__setitem__("y", o))
    model(x)
    attn, h = model.blocks[0].attn, seen["x"]
    q, k, v = attn.qkv(h).reshape(4, -1, 3, 2, 16).permute(2, 0, 3, 1, 4)
    heads = lambda t: t.reshape(1, 3, 2, 16).transpose(1, 2)  # noqa: E731
    k, v = torch.cat([heads(kp).expand(4, -1, -1, -1), k], 2), torch.cat([heads(vp).expand(4, -1, -1, -1), v], 2)
    weights = ((q @ k.transpose(-2, -1)) * 16**-0.5).softmax(-1)  # the authors' PreT_Attention, written out
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(4, -1, 32))
    assert torch.allclose(out["y"], expected, atol=1e-5)
    assert not torch.allclose(out["y"], type(attn).forward(attn, h), atol=1e-3)  # the prefix made a difference
    del injector  # the hooks hold it weakly: once it is gone the model is plain again
    model(x)
    assert torch.equal(out["y"], type(attn).forward(attn, seen["x"]))


def test_a_model_that_is_not_a_vit_is_refused_and_left_as_it_was():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10))
    with pytest.raises(TypeError, match="VisionTransformer"):
        L2P(model)
    assert all(p.requires_grad for p in model.parameters()) and not model._forward_pre_hooks
    shallow = vit(depth=2)
    with pytest.raises(ValueError, match="depth"):
        DualPrompt(shallow)  # E-prompts in blocks 2-4
    assert all(p.requires_grad for p in shallow.parameters()) and not shallow._forward_pre_hooks


# ------------------------------------------------------------------------------------------- methods
@pytest.mark.parametrize("embed_dim, heads, depth", [(32, 2, 2), (48, 3, 3)])
def test_prompt_and_key_shapes_follow_the_model(embed_dim, heads, depth):
    l2p = L2P(vit(embed_dim, heads, depth), pool_size=6, prompt_length=3, top_k=2)
    assert l2p.prompt.shape == (6, 3, embed_dim) and l2p.key.shape == (6, embed_dim)
    dual = DualPrompt(vit(embed_dim, heads, depth), g_prompt_layers="0", e_prompt_layers=str(depth - 1))
    assert dual.g_prompt.shape == (1, 2, 5, embed_dim) and dual.e_prompt.shape == (1, 2, 10, 5, embed_dim)
    assert dual.key.shape == (10, embed_dim) and dual.prompts.num_heads == heads and dual.prompts.depth == depth


def test_l2p_inserts_top_k_prompts_after_the_class_token():
    torch.manual_seed(0)
    model = vit()
    l2p = L2P(model, pool_size=6, prompt_length=3, top_k=2, batchwise_prompt=False)
    tokens = {}
    model.blocks[0].register_forward_pre_hook(lambda m, a: tokens.__setitem__("n", a[0].shape[1]))
    x, _ = images(5)
    model(x)
    assert tokens["n"] == 1 + 2 * 3 + 4  # [cls, 2 prompts of 3 tokens, 2x2 patches]
    idx = l2p.last_selection
    assert idx.shape == (5, 2) and all(len(set(row)) == 2 for row in idx.tolist())
    assert torch.equal(idx, select_prompts(key_similarity(l2p.prompts.last_query, l2p.key), 2))


@pytest.mark.parametrize("method", ["l2p", "dualprompt"])
def test_the_backbone_is_unchanged_and_the_prompts_train(method):
    torch.manual_seed(0)
    model = vit(depth=3)
    syn = L2P(model) if method == "l2p" else DualPrompt(model, g_prompt_layers="0", e_prompt_layers="1,2")
    frozen = {n: p.clone() for n, p in model.named_parameters() if not n.startswith("head")}
    own = [p.clone() for p in syn.own_parameters()]
    optimizer = torch.optim.Adam(syn.trainable_parameters(), lr=0.01)
    for seed in range(3):
        x, y = images(8, seed)
        optimizer.zero_grad()
        syn.backward(F.cross_entropy(model(x), y), y, x=x)
        optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not torch.equal(a, b) for a, b in zip(own, syn.own_parameters()))
    assert syn.trainable_parameters()[-2] is model.head.weight


@pytest.mark.parametrize("current_loss", ["method", "user"])
def test_l2p_backward_is_the_masked_cross_entropy_minus_the_pull(current_loss):
    torch.manual_seed(0)
    model = vit()
    l2p = L2P(model, pool_size=4, prompt_length=2, top_k=2, current_loss=current_loss)
    x, y = images(8)
    y = y % 3  # the task's classes: 0, 1, 2 (those of its batches so far)
    logits = model(x)
    user = F.cross_entropy(logits, y)
    params = l2p.trainable_parameters()
    masked = logits.masked_fill(torch.arange(10) >= 3, float("-inf"))
    ce = F.cross_entropy(masked, y) if current_loss == "method" else user
    pull = key_pull(l2p.prompts.last_query, l2p.key, l2p.last_selection)
    expected = torch.autograd.grad(ce - 0.1 * pull, params, retain_graph=True)
    l2p.backward(user, y, x=x)
    got = [p.grad for p in params]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, expected))


def test_dualprompt_trains_each_task_on_its_e_prompt_and_passes_it_on():
    torch.manual_seed(0)
    model = vit(depth=3)
    dual = DualPrompt(model, pool_size=3, g_prompt_layers="0", e_prompt_layers="1,2")
    x, y = images(6)
    dual.backward(F.cross_entropy(model(x), y), y, x=x)
    assert dual.last_selection.tolist() == [[0]] * 6
    untrained = dual.e_prompt[:, :, 1].detach().clone()
    dual.end_task()
    with torch.no_grad():
        model.eval()
        ended = dual.predict(x=x)
        model.train()
    # Task 1's E-prompt is untouched until task 1 trains: the evaluation after end_task sees it untrained, as
    # the authors' (they copy at the next task's start).
    assert torch.equal(dual.e_prompt[:, :, 1], untrained) and not torch.equal(untrained, dual.e_prompt[:, :, 0])
    assert dual.started_task == 0
    logits = model(x)  # task 1's first training forward: shared_prompt_pool copies task 0's E-prompt in
    assert torch.equal(dual.e_prompt[:, :, 1], dual.e_prompt[:, :, 0]) and dual.started_task == 1
    assert dual.last_selection.tolist() == [[1]] * 6
    dual.backward(F.cross_entropy(logits, y), y, x=x)
    assert ended.shape == (6, 10)
    dual.end_task()
    dual.end_task()  # task 3 of a pool of 3: matched by its keys, as at test
    model(x)
    with torch.no_grad():
        model.eval()
        model(x)
    assert torch.equal(dual.last_selection, select_prompts(key_similarity(dual.prompts.last_query, dual.key), 1, True))


def test_dualprompt_copies_at_each_task_start_in_turn_as_the_authors():
    """Task ends without training in between: each task's start copies the previous task's E-prompt, in
    order (the authors' train_and_evaluate at every task's start), all at the first training forward."""
    torch.manual_seed(0)
    model = vit(depth=2)
    dual = DualPrompt(model, pool_size=4, g_prompt_layers="0", e_prompt_layers="1")
    pool = dual.e_prompt.detach().clone()
    dual.end_task()
    dual.end_task()
    with torch.no_grad():
        model.eval()
        model(images(6)[0])  # an evaluation: no task start
        model.train()
    assert torch.equal(dual.e_prompt, pool)
    model(images(6)[0])  # task 2's first training forward: task 1's start, then task 2's
    for slot in (1, 2):
        assert torch.equal(dual.e_prompt[:, :, slot], pool[:, :, 0])
    assert torch.equal(dual.e_prompt[:, :, 3], pool[:, :, 3])


def test_the_l2p_floor_computes_the_same_logits_as_the_hooked_model():
    """Two implementations of one forward: hooks on the user's model, and timm's forward written out."""
    torch.manual_seed(0)
    spec_hp = {"pool_size": 4, "prompt_length": 2}
    a, b = vit(depth=3), vit(depth=3)
    b.load_state_dict(a.state_dict())
    syn = L2P(a, top_k=2, **spec_hp)
    floor = L2PFloor(b, 8, 4, (3, 16, 16), {**spec_hp, "top_k": 2, "batchwise_prompt": True, "pull_constraint": 0.1})
    with torch.no_grad():
        for mine, theirs in zip(syn.own_parameters(), floor.extra):
            theirs.copy_(mine)
    x, _ = images(4)
    assert torch.allclose(a(x), floor.forward(x), atol=1e-5)


@pytest.mark.parametrize("pool_size, chosen", [(4, 2), (2, 1)], ids=["task-2-prompt", "past-the-pool"])
def test_the_dualprompt_floor_is_the_hooked_step_after_two_task_ends(pool_size, chosen):
    """The floor is the step the benchmark times, after two task ends: task 2's own E-prompt while the pool has
    it, else the key match's (here key 1, made to match every query). Same logits, same gradients."""
    from synapse import catalog

    torch.manual_seed(0)
    a, b = vit(depth=3), vit(depth=3)
    b.load_state_dict(a.state_dict())
    layers = {"g_prompt_layers": "0", "e_prompt_layers": "1,2"}
    hp = catalog.get("dualprompt").resolve({"pool_size": pool_size, "prompt_length": 2, **layers})
    dual = DualPrompt(a, **hp)
    x, y = images(4)
    dual.end_task()
    dual.end_task()
    a(x)  # task 2's first training forward: the task starts copy the E-prompts along
    with torch.no_grad():
        dual.e_prompt.uniform_(-1, 1)  # every E-prompt different: the wrong one changes the logits
        mean = dual.prompts.query(x).mean(0)
        dual.key.copy_(torch.stack([-mean, mean, -mean, -mean][:pool_size]))
    floor = DualPromptFloor(b, 8, 4, (3, 16, 16), hp)
    with torch.no_grad():
        for mine, theirs in zip(dual.own_parameters(), floor.extra):
            theirs.copy_(mine)
    logits, floor_logits = a(x), floor.forward(x)
    assert dual.last_selection is not None and dual.last_selection.eq(chosen).all()
    assert torch.allclose(logits, floor_logits, atol=1e-5)
    dual.backward(F.cross_entropy(logits, y), y, x=x)
    floor.backward(F.cross_entropy(floor_logits, y), y, x, floor_logits)
    for mine, theirs in zip([*dual.own_parameters(), a.head.weight], [*floor.extra, b.head.weight]):
        assert torch.allclose(mine.grad, theirs.grad, atol=1e-5)


def test_a_ddp_wrapped_model_is_refused_before_anything_changes(monkeypatch):
    """Freezing the backbone after DDP was built breaks DDP's reducer at the first backward with an error that
    does not say why: the method refuses the wrapped model up front and points to the right order."""
    from torch import nn

    from synapse import testing
    from synapse.pretrained import L2P

    model = testing.toy_vit()
    monkeypatch.setattr(nn.parallel.DistributedDataParallel, "__init__", lambda self, module: nn.Module.__init__(self))
    wrapped = nn.parallel.DistributedDataParallel(model)
    wrapped.module = model
    before = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="before wrapping the model in DistributedDataParallel"):
        L2P(wrapped)
    assert [p.requires_grad for p in model.parameters()] == before and not model._forward_pre_hooks
