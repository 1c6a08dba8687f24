"""GEM (Lopez-Paz & Ranzato 2017): its dual QP, its projection, the per-task episodic memory, the method."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from synapse.episodic import EpisodicMemory
from synapse.functional import gem_dual, gem_project, gem_project_, project_conflicting_
from synapse.gradient import GEM


def state_equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    return a == b


def scipy_dual(gram, dots, margin):
    """Reference: ``min 1/2 v'Pv + d'v, v >= margin`` as a non-negative least-squares problem.

    With ``v = margin + u`` and ``P = L L'``: ``1/2 u'Pu + c'u = 1/2 ||L'u + L^-1 c||^2 + const``,
    ``c = d + margin P 1``; scipy's ``nnls`` (Lawson-Hanson, an exact active-set method) solves it.
    """
    from scipy.optimize import nnls  # here, so that the CUDA checks below run where scipy is missing

    p, d = gram.double().numpy(), dots.double().numpy()
    c = d + margin * p.sum(1)
    lower = np.linalg.cholesky(p)
    u, _ = nnls(lower.T, -np.linalg.solve(lower, c))
    return torch.from_numpy(u + margin)


def random_problem(t, p, seed, eps=1e-3):
    g = torch.Generator().manual_seed(seed)
    refs = torch.randn(t, p, generator=g, dtype=torch.float64)
    dots = torch.randn(t, generator=g, dtype=torch.float64) * 3
    return refs @ refs.T + eps * torch.eye(t, dtype=torch.float64), dots


# ---------------------------------------------------------------------- the QP and the projection
def test_projection_by_hand():
    # G = [[1, 0], [1, 1]], g = (-2, 1): G g = (-2, -1), both constraints violated.
    # P = G G' = [[1, 1], [1, 2]]. The unconstrained minimiser P^-1 (2, 1) = (3, -1) is infeasible; on the
    # face v2 = 0: v1 = 2 / 1 = 2, and the dual gradient there, P_21 v1 + d_2 = 2 - 1 = 1 >= 0: v* = (2, 0).
    # g~ = g + G' v* = (-2, 1) + 2 (1, 0) = (0, 1), the Euclidean projection of g onto {z1 >= 0, z1 + z2 >= 0}.
    refs = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    grad = torch.tensor([-2.0, 1.0])
    assert torch.allclose(gem_dual(refs @ refs.T, refs @ grad), torch.tensor([2.0, 0.0]), atol=1e-6)
    assert torch.allclose(gem_project(grad, refs, margin=0.0, eps=0.0), torch.tensor([0.0, 1.0]), atol=1e-6)
    # G = I, g = (-1, 2): v* = max(margin, -G g) per coordinate. margin 0: v* = (1, 0), g~ = (0, 2);
    # margin 0.5: v* = (1, 0.5), g~ = (0, 2.5).
    eye, grad = torch.eye(2), torch.tensor([-1.0, 2.0])
    assert torch.allclose(gem_project(grad, eye, margin=0.0, eps=0.0), torch.tensor([0.0, 2.0]), atol=1e-6)
    assert torch.allclose(gem_project(grad, eye, margin=0.5, eps=0.0), torch.tensor([0.0, 2.5]), atol=1e-6)
    # eps on the diagonal: v1 = 1 / (1 + 0.25) = 0.8, g~ = (-0.2, 2).
    assert torch.allclose(gem_project(grad, eye, margin=0.0, eps=0.25), torch.tensor([-0.2, 2.0]), atol=1e-6)
    assert torch.equal(grad, torch.tensor([-1.0, 2.0]))  # gem_project leaves its input alone


@pytest.mark.parametrize("t", [1, 2, 3, 4])
@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_dual_matches_scipy(t, margin):
    for seed in range(12):
        gram, dots = random_problem(t, 3 if seed % 2 else 40, seed)  # p = 3 < t: near-singular G G'
        expected = scipy_dual(gram, dots, margin)
        assert torch.allclose(gem_dual(gram, dots, margin), expected, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("t", [3, 6, 12])
def test_the_iterative_fallback_matches_scipy(t):
    # exact_limit=0 forces the fallback at small t; t = 12 is past the default limit.
    limit = 0 if t < 12 else 10
    for seed in range(4):
        gram, dots = random_problem(t, 50, seed)
        expected = scipy_dual(gram, dots, 0.5)
        assert torch.allclose(gem_dual(gram, dots, 0.5, exact_limit=limit), expected, atol=1e-6, rtol=1e-6)


def test_no_violation_leaves_the_gradient_exactly_as_it_is():
    g = torch.Generator().manual_seed(0)
    refs, grad = torch.rand(3, 10, generator=g), torch.rand(10, generator=g)  # non-negative: no conflict
    refs[2, :5], grad[5:] = 0.0, 0.0  # <g, g_2> = 0 exactly: on the boundary, still no violation
    assert (refs @ grad >= 0).all() and refs[2] @ grad == 0
    for margin in (0.0, 0.5, 1.0):  # even with a margin: the authors' code projects only on a violation
        assert torch.equal(gem_project(grad, refs, margin), grad)
    gram = (refs @ refs.T).double()
    assert torch.equal(gem_dual(gram, (refs @ grad).double(), 0.0), torch.zeros(3, dtype=torch.float64))


def test_one_constraint_without_margin_is_agem():
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        ref, grad = torch.randn(20, generator=g, dtype=torch.float64), torch.randn(20, generator=g, dtype=torch.float64)
        grad = grad - 2 * ref * (grad @ ref).clamp(min=0) / (ref @ ref)  # make it conflict
        expected = project_conflicting_(grad.clone(), ref)
        assert torch.allclose(gem_project(grad, ref[None], margin=0.0, eps=0.0), expected, atol=1e-10)


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_the_projection_satisfies_every_constraint(margin):
    g = torch.Generator().manual_seed(2)
    for t in (1, 2, 4, 8):
        refs = torch.randn(t, 30, generator=g, dtype=torch.float64)
        grad = -refs.sum(0) + torch.randn(30, generator=g, dtype=torch.float64)  # violates most constraints
        projected = gem_project(grad, refs, margin, eps=0.0)
        assert (refs @ projected >= -1e-9).all()
        # ... and no point of the cone is closer to g (the primal, eq. 10), checked against random feasible points.
        v = gem_dual(refs @ refs.T, refs @ grad, 0.0)
        if margin == 0.0:
            for _ in range(20):
                other = projected + 0.1 * torch.randn(30, generator=g, dtype=torch.float64)
                if (refs @ other >= 0).all():
                    assert (other - grad).norm() >= (projected - grad).norm() - 1e-9
        assert (v >= 0).all()


def test_projection_in_place_and_bad_shapes():
    refs, grad = torch.eye(2), torch.tensor([-1.0, 2.0])
    out = gem_project_(grad, refs, 0.0, 0.0)
    assert out is grad and torch.allclose(grad, torch.tensor([0.0, 2.0]))
    assert gem_project_(grad, torch.zeros(0, 2)) is grad  # no past task: nothing to do
    with pytest.raises(ValueError, match="references"):
        gem_project(torch.zeros(3), refs)
    with pytest.raises(ValueError, match="gram"):
        gem_dual(torch.eye(2), torch.zeros(3))


# ---------------------------------------------------------------------- the episodic memory
def task_batch(task, start, n):
    """Items whose value says where they came from: ``x = 1000 task + index``, ``y = task``."""
    return {
        "x": (1000.0 * task + torch.arange(start, start + n, dtype=torch.float32)).unsqueeze(1),
        "y": torch.full((n,), task),
    }


def test_memory_shares_the_budget_among_the_tasks_seen():
    memory = EpisodicMemory(12, seed=0)
    for b in range(3):
        memory.add(task_batch(0, 10 * b, 10))
    assert (memory.task_sizes, memory.current_size, len(memory)) == ((), 12, 12)
    memory.end_task()
    assert memory.task_sizes == (12,) and memory.share == 12  # shrinking waits for the next task's items
    memory.add(task_batch(1, 0, 4))
    assert (memory.task_sizes, memory.share, memory.current_size) == ((6,), 6, 4)
    memory.add(task_batch(1, 4, 20))
    memory.end_task()
    memory.end_task()  # a task that stored nothing takes no share
    memory.add(task_batch(2, 0, 2))  # a short task
    memory.end_task()
    assert memory.task_sizes == (4, 4, 2)  # 12 // 3
    memory.add(task_batch(3, 0, 5))
    assert (memory.task_sizes, memory.share, memory.current_size, len(memory)) == ((3, 3, 2), 3, 3, 11)
    streams = {0: set(range(30)), 1: set(range(24)), 2: {0, 1}}
    for task, size in enumerate(memory.task_sizes):
        items = memory.task(task)
        assert items["x"].shape == (size, 1) and (items["y"] == task).all()
        values = items["x"][:, 0] - 1000 * task
        assert set(values.long().tolist()) <= streams[task] and len(set(values.tolist())) == size  # distinct
    assert memory.nbytes == 12 * (4 + 8)


def test_memory_keeps_a_uniform_random_sample_of_each_task():
    # Task 0 streams 10 items into a memory of 4 (a reservoir of 4), then shrinks to 2 when task 1 starts:
    # each of its 10 items must survive with probability 2/10. 1500 memories; 5 sigma is 0.052.
    counts = np.zeros(10)
    trials = 1500
    for seed in range(trials):
        memory = EpisodicMemory(4, seed=seed)
        memory.add(task_batch(0, 0, 3))
        memory.add(task_batch(0, 3, 7))
        memory.end_task()
        memory.add(task_batch(1, 0, 1))
        counts[memory.task(0)["x"][:, 0].long().numpy()] += 1
    assert np.abs(counts / trials - 0.2).max() < 0.052


def test_memory_sampling():
    memory = EpisodicMemory(12, seed=0)
    for task in range(2):
        memory.add(task_batch(task, 0, 9))
        memory.end_task()
    memory.add(task_batch(2, 0, 3))  # shrinks tasks 0 and 1 to 4 items; task 2 is running
    assert [b["x"].shape[0] for b in memory.sample_tasks()] == [4, 4]
    batches = memory.sample_tasks(3)
    for task, b in enumerate(batches):
        assert b["x"].shape == (3, 1) and (b["y"] == task).all() and b["x"].unique().numel() == 3
        assert set(b["x"][:, 0].tolist()) <= set(memory.task(task)["x"][:, 0].tolist())
    union = memory.sample(6, names=["x"])
    assert union.keys() == {"x"} and union["x"].unique().numel() == 6 and (union["x"] < 2000).all()  # no task 2
    assert memory.sample(100)["x"].shape[0] == 8
    with pytest.raises(ValueError, match="k must be a positive int"):
        memory.sample(0)
    with pytest.raises(IndexError, match="task 2"):
        memory.task(2)
    with pytest.raises(RuntimeError, match="no finished task"):
        EpisodicMemory(4).sample(1)


def test_memory_rejects_without_changing_anything():
    memory = EpisodicMemory(2, seed=0)
    memory.add(task_batch(0, 0, 3))
    memory.end_task()
    memory.add(task_batch(1, 0, 3))
    memory.end_task()
    before = copy.deepcopy(memory.state_dict())
    bad = [
        ({"x": torch.zeros(3, 1)}, ValueError),  # a field missing
        ({"x": torch.zeros(3, 2), "y": torch.zeros(3, dtype=torch.long)}, ValueError),  # another shape
        ({"x": torch.zeros(3, 1), "y": torch.zeros(2, dtype=torch.long)}, ValueError),  # batch sizes differ
        ({"x": torch.zeros(3, 1), "y": [0, 0, 0]}, TypeError),
        (task_batch(2, 0, 1), ValueError),  # a third task in two rows: no share left
    ]
    for items, error in bad:
        with pytest.raises(error):
            memory.add(items)
        assert state_equal(memory.state_dict(), before) and memory.task_sizes == (1, 1)
    with pytest.raises(ValueError, match="no room for task 3"):
        memory.check_batch(task_batch(2, 0, 1))


def test_memory_state_dict_round_trip():
    memory = EpisodicMemory(10, seed=3)
    memory.add(task_batch(0, 0, 25))
    memory.end_task()
    memory.add(task_batch(1, 0, 7))  # mid-task, after a shrink
    restored = EpisodicMemory(10, seed=99)
    restored.load_state_dict(copy.deepcopy(memory.state_dict()))
    for m in (memory, restored):
        m.add(task_batch(1, 7, 30))
        m.end_task()
        m.add(task_batch(2, 0, 4))
    a, b = memory.state_dict(), restored.state_dict()
    assert state_equal(a, b)  # storage, layout, counters and the generator's state
    assert torch.equal(memory.sample(5)["x"], restored.sample(5)["x"])
    with pytest.raises(ValueError, match="capacity"):
        EpisodicMemory(11).load_state_dict(a)


# ---------------------------------------------------------------------- the method
def small_mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 6))


def stream(num_tasks=3, steps=5, batch=4, seed=0):
    """Task k: inputs around a task-specific mean, labels 2k and 2k + 1."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for k in range(num_tasks):
        tasks.append(
            [
                (torch.randn(batch, 6, generator=g) + 2 * k, torch.randint(2 * k, 2 * k + 2, (batch,), generator=g))
                for _ in range(steps)
            ]
        )
    return tasks


def train(model, syn, opt, batches, scaler=None):
    for x, y in batches:
        opt.zero_grad()
        syn.backward(F.cross_entropy(model(x), y), y, input=x)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def memory_gradients(model, syn):
    """G by hand: the gradient of the cross-entropy on each past task's whole memory."""
    rows = []
    for k in range(syn.memory.num_tasks):
        items = syn.memory.task(k)
        loss = F.cross_entropy(model(items["input:input"]), items["targets"])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]))
    return torch.stack(rows)


def test_gem_projects_the_step_gradient_against_every_past_task():
    torch.manual_seed(0)
    model = small_mlp()
    syn = GEM(model, buffer_size=30, gamma=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tasks = stream()
    x, y = tasks[0][0]
    plain = copy.deepcopy(model)
    F.cross_entropy(plain(x), y).backward()
    syn.backward(F.cross_entropy(model(x), y), y, input=x)
    assert torch.equal(flat_grad(model), flat_grad(plain))  # no past task yet: plain training
    train(model, syn, opt, tasks[0])
    syn.end_task()
    train(model, syn, opt, tasks[1])
    syn.end_task()
    train(model, syn, opt, tasks[2][:2])
    assert syn.memory.task_sizes == (10, 10) and syn.memory.current_size == 8  # 30 // 3 each

    projected = 0
    for x, y in tasks[2][2:]:
        plain = copy.deepcopy(model)
        F.cross_entropy(plain(x), y).backward()
        refs = memory_gradients(plain, syn)  # before this step stores its batch
        model.zero_grad()
        syn.backward(F.cross_entropy(model(x), y), y, input=x)
        g, got = flat_grad(plain), flat_grad(model)
        expected = gem_project(g, refs, margin=0.5, eps=1e-3)
        assert torch.allclose(got, expected, atol=1e-6, rtol=1e-5)
        # The dual's optimality makes G g~ = (G G' + eps I) v* + G g - eps v* >= -eps v*: in the cone, up to eps.
        gram = (refs @ refs.T).double() + 1e-3 * torch.eye(len(refs), dtype=torch.float64)
        v = gem_dual(gram, (refs @ g).double(), 0.5)
        assert (refs @ got >= -1e-3 * v.float() - 1e-6).all()
        projected += bool((refs @ g < 0).any())
        opt.step()
    assert projected  # this stream does violate a constraint


def test_gem_under_a_grad_scaler_matches_unscaled():
    tasks = stream(steps=3)
    grads = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**12)):
        torch.manual_seed(0)
        model = small_mlp()
        syn = GEM(model, buffer_size=12, scaler=scaler)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        train(model, syn, opt, tasks[0], scaler)
        syn.end_task()
        x, y = tasks[1][0]
        model.zero_grad()
        syn.backward(F.cross_entropy(model(x), y), y, input=x)
        grads.append(flat_grad(model) / (1.0 if scaler is None else scaler.get_scale()))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        # (the memory's and gamma's ranges are the contract's: tests/test_contract.py)
        ({"scaler": "amp"}, "scaler"),
    ],
)
def test_bad_arguments_are_rejected_before_anything_happens(kwargs, match):
    model = small_mlp()
    rng = torch.get_rng_state()
    with pytest.raises((TypeError, ValueError), match=match):
        GEM(model, **kwargs)
    assert torch.equal(torch.get_rng_state(), rng)  # not even the seed of the memory was drawn


def test_a_rejected_step_changes_nothing():
    tasks = stream(num_tasks=3, steps=2)
    model = small_mlp()
    syn = GEM(model, buffer_size=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for k in range(2):
        train(model, syn, opt, tasks[k])
        syn.end_task()
    before = copy.deepcopy(syn.state_dict())
    x, y = tasks[2][0]
    model.zero_grad()
    calls = [  # (other names, shapes and dtypes of inputs are the contract's: tests/test_contract.py)
        lambda: syn.backward(F.cross_entropy(model(x), y), y, input=x),  # a third task in a memory of two items
    ]
    for call in calls:
        with pytest.raises(ValueError):
            call()
        assert state_equal(syn.state_dict(), before)
        assert all(p.grad is None for p in model.parameters())
    assert GEM.needs_task_boundaries


# ---------------------------------------------------------------------- CUDA (skipped without it)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("buffer_sample_size", [None, 3])
def test_gem_never_synchronises_and_its_memory_stays_flat_on_cuda(buffer_sample_size):
    tasks = [[(x.cuda(), y.cuda()) for x, y in task] for task in stream(num_tasks=3, steps=6)]
    model = small_mlp().cuda()
    syn = GEM(model, buffer_size=24, buffer_sample_size=buffer_sample_size)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for task in tasks[:2]:
        train(model, syn, opt, task)
        syn.end_task()
    gram, dots = random_problem(12, 40, 0)  # past GEM_EXACT_LIMIT: the iterative solve
    gram, dots = gram.cuda(), dots.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in tasks[2]:  # the first one shrinks the memory to three tasks' shares
            model.zero_grad()
            syn.backward(F.cross_entropy(model(x), y), y, input=x)
        gem_dual(gram, dots, 0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert syn.memory.task_sizes == (8, 8)
    for x, y in tasks[2] * 5:  # warm
        train(model, syn, opt, [(x, y)])
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    for x, y in tasks[2] * 20:
        train(model, syn, opt, [(x, y)])
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == allocated


@pytest.mark.gpu
@cuda
def test_gem_on_cuda_matches_the_cpu():
    for t in (1, 3, 10, 12):
        gram, dots = random_problem(t, 40, t)
        assert torch.allclose(gem_dual(gram.cuda(), dots.cuda(), 0.5).cpu(), gem_dual(gram, dots, 0.5), atol=1e-8)
    tasks = stream(steps=3)
    torch.manual_seed(0)
    model = small_mlp()
    syn = GEM(model, buffer_size=12)
    train(model, syn, torch.optim.SGD(model.parameters(), lr=0.1), tasks[0])
    syn.end_task()
    gpu_model = copy.deepcopy(model).cuda()
    gpu_syn = GEM(gpu_model, buffer_size=12)
    gpu_syn.load_state_dict(syn.state_dict())
    x, y = tasks[1][0]
    for m, s, device in ((model, syn, "cpu"), (gpu_model, gpu_syn, "cuda")):
        m.zero_grad()
        s.backward(F.cross_entropy(m(x.to(device)), y.to(device)), y.to(device), input=x.to(device))
    assert torch.allclose(flat_grad(model), flat_grad(gpu_model).cpu(), atol=1e-5, rtol=1e-4)
