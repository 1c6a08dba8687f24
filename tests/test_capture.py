"""The forward capture: copies of a hooked model are plain models, and torch.compile never traces the hooks."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

from conftest import mlp
from synapse.rehearsal import ER


def batch(step, n=8):
    g = torch.Generator().manual_seed(step)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def train(model, syn, steps, start=0):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for i in range(start, start + steps):
        x, y = batch(i)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        syn.backward(loss, y, input=x)
        opt.step()


def hooked_model(method="der++"):
    model = mlp()
    syn = ER(model, 32, 8, method=method)
    train(model, syn, 5)
    return model, syn


def count_forward_rows(model):
    """The batch size the model's first layer sees on its next forward."""
    rows = []
    handle = model[1].register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    return rows, handle


@pytest.mark.parametrize("method", ["er", "der", "der++"])
def test_a_deep_copy_of_a_hooked_model_is_a_plain_model(method):
    model, syn = hooked_model(method)
    twin = copy.deepcopy(model)
    rows, handle = count_forward_rows(twin)
    x, _ = batch(99)
    out = twin(x)  # a training-mode forward with grad: the original would append replay rows here
    handle.remove()
    assert rows == [8] and out.shape == (8, 10)
    # No hidden copy of the method rides along: nothing in the copy refers to an ER or a buffer.
    reachable = pickle.dumps(twin)
    assert b"ReservoirBuffer" not in reachable and b"synapse.rehearsal" not in reachable
    # The original still replays.
    rows, handle = count_forward_rows(model)
    model(x)
    handle.remove()
    assert rows[0] > 8


@pytest.mark.parametrize("method", ["er", "der", "der++"])
def test_a_method_attached_to_a_copy_works_and_matches(method):
    model, syn = hooked_model(method)
    twin = copy.deepcopy(model)
    syn2 = ER(twin, 32, 8, method=method)
    syn2.load_state_dict(syn.state_dict())
    x, y = batch(50)
    for m, s in ((model, syn), (twin, syn2)):
        m.zero_grad()
        s.backward(F.cross_entropy(m(x), y), y, input=x)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_torch_save_of_a_hooked_model_does_not_drag_the_method_along():
    model, _ = hooked_model()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    plain = io.BytesIO()
    torch.save(mlp(), plain)
    # A buffer of 32 images would add ~100 KB; the hooked model pickles to about the plain one's size.
    assert buffer.getbuffer().nbytes < plain.getbuffer().nbytes + 2048
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    rows, handle = count_forward_rows(loaded)
    loaded(batch(1)[0])
    handle.remove()
    assert rows == [8]


def test_a_shallow_copy_shares_no_replay():
    model, _ = hooked_model()
    twin = copy.copy(model)  # shares the hook dicts, but is another module
    rows, handle = count_forward_rows(twin)
    twin(batch(3)[0])
    handle.remove()
    assert rows == [8]


def _recording_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


# What the hooks do (concatenate the replay rows, gather them from the buffer, split the output, copy
# indices to the device): none of it may appear in a compiled graph, which must hold the model alone.
HOOK_OPS = ("cat", "index_select", "split", "split_with_sizes", "pin_memory", "to", "from_numpy")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["er", "der++"])
def test_compiled_fused_replay_matches_eager_and_never_traces_the_hooks(method):
    torch._dynamo.reset()
    graphs = []
    torch.manual_seed(0)
    model = mlp()
    compiled = torch.compile(model, backend=_recording_backend(graphs))
    syn = ER(compiled, 32, 8, method=method)
    train(compiled, syn, 6)
    assert graphs, "nothing was compiled"
    traced = {
        getattr(node.target, "__name__", str(node.target))
        for gm in graphs
        for node in gm.graph.nodes
        if node.op in ("call_function", "call_method")
    }
    assert not traced & set(HOOK_OPS), f"hook work traced into the compiled graph: {traced & set(HOOK_OPS)}"
    torch.manual_seed(0)
    eager = mlp()
    train(eager, ER(eager, 32, 8, method=method), 6)
    for a, b in zip(model.parameters(), eager.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_hooks_are_excluded_from_tracing():
    model, syn = hooked_model()
    hooks = list(model._forward_pre_hooks.values()) + list(model._forward_hooks.values())
    assert len(hooks) == 2
    for hook in hooks:
        # torch.compiler.disable marks the function it wraps; Dynamo graph-breaks around it.
        assert getattr(type(hook).__call__, "_torchdynamo_disable", False)
