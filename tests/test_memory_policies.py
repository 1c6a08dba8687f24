"""Memory policies: the class-balanced memory (GDumb's greedy balancer), iCaRL's herding, and the
buffer_policy choice of BufferedSynapse and ER/DER/DER++."""

import copy
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from conftest import batches, mlp, train
from synapse import catalog
from synapse._base import BufferedSynapse
from synapse.buffer import Buffer, ReservoirBuffer
from synapse.functional import herding_selection
from synapse.memory import UNIFORM_BLOCK, ClassBalancedBuffer, HerdingMemory, head_input_features, make_buffer
from synapse.rehearsal import ER

# ---------------------------------------------------------------------------------------------- helpers


def naive_balancer(labels, capacity, seed):
    """GDumb's greedy balancer as ClassBalancedBuffer defines it, one item at a time and with no
    bookkeeping (counts recomputed for every item). Returns each slot's class and stream index.

    Its random choices read the same uniforms the memory documents: the memory's generator jumped
    ahead, drawn in blocks, one uniform per choice, ``j = floor(u * n)``.
    """
    rng = np.random.Generator(np.random.PCG64(seed).jumped())
    pool = []

    def choice(n):
        if not pool:
            pool.extend(reversed(rng.random(UNIFORM_BLOCK).tolist()))
        return min(int(pool.pop() * n), n - 1)

    slot_label, slot_item = [], []
    for i, y in enumerate(labels):
        if len(slot_label) < capacity:
            slot_label.append(y)
            slot_item.append(i)
            continue
        counts = Counter(slot_label)
        top = max(counts.values())
        if counts.get(y, 0) >= top:
            continue
        largest = sorted(c for c, n in counts.items() if n == top)
        victim = largest[choice(len(largest))] if len(largest) > 1 else largest[0]
        slots = [s for s, c in enumerate(slot_label) if c == victim]
        s = slots[choice(len(slots))]
        slot_label[s], slot_item[s] = y, i
    return slot_label, slot_item


def feed(memory, labels, batch_sizes, features=3):
    """Offer ``labels`` (with an ``id`` field: the stream index) in batches of the given sizes."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    start, sizes = 0, iter(batch_sizes)
    while start < len(labels):
        b = next(sizes)
        ids = torch.arange(start, min(start + b, len(labels)))
        memory.add({"id": ids, "x": ids[:, None].float().expand(-1, features), "targets": labels[ids]})
        start += b


def assert_balanced(memory, labels):
    """Every class holds min(n_y, M - 1) items or more; the memory is as full as the stream allows."""
    offered = Counter(labels)
    counts = memory.class_counts()
    assert sum(counts.values()) == len(memory) == min(len(labels), memory.capacity)
    top = max(counts.values(), default=0)
    for y, n in offered.items():
        held = counts.get(y, 0)
        assert min(n, top - 1) <= held <= n, f"class {y}: holds {held} of {n} offered, largest class {top}"
    # and the stored rows are the items the slot labels say
    ids = memory.stored(["id"])["id"]
    assert len(set(ids.tolist())) == len(ids), "an item is stored twice"
    assert np.array_equal(np.asarray(labels)[ids.numpy()], memory.slot_labels())


def random_stream(rng):
    classes = int(rng.integers(1, 13))
    n = int(rng.integers(0, 200))
    weights = 1.0 / np.arange(1, classes + 1) ** rng.uniform(0, 2)  # Zipf-like imbalance
    labels = rng.choice(classes, size=n, p=weights / weights.sum())
    if rng.random() < 0.5:
        labels = np.sort(labels, kind="stable")  # class-incremental: one class after another
    return labels.tolist()


def class_balanced(capacity, seed=0, **kw):
    return ClassBalancedBuffer(capacity, seed=seed, **kw)


# ---------------------------------------------------------------------------------------------- class-balanced


@pytest.mark.parametrize(
    "labels, expected",
    [
        ([0] * 50 + [1] * 50, {0: 5, 1: 5}),  # the largest class gives up slots to a new one
        ([0] * 10 + [2] + [3] + [1] * 30, {0: 4, 1: 4, 2: 1, 3: 1}),  # scarce classes keep all they had
        (list(range(20)), None),  # more classes than slots: each new one evicts a random class's only item
        ([c for c in range(5) for _ in range(40)], {0: 2, 1: 2, 2: 2, 3: 2, 4: 2}),  # class-incremental
        ([0] * 9 + [1], {0: 9, 1: 1}),  # while there is room every item enters
    ],
)
def test_adversarial_streams_end_with_the_expected_class_counts(labels, expected):
    for batch_sizes in ([1] * len(labels), [7] * len(labels), [len(labels)]):
        memory = class_balanced(10)
        feed(memory, labels, batch_sizes)
        counts = memory.class_counts()
        assert counts == expected if expected else list(counts.values()) == [1] * 10 and 19 in counts
        assert_balanced(memory, labels)


def test_random_streams_stay_balanced_and_match_the_one_at_a_time_definition():
    rng = np.random.default_rng(0)
    for trial in range(150):
        labels = random_stream(rng)
        capacity = int(rng.integers(1, 31))
        sizes = rng.integers(1, 20, size=len(labels) + 1).tolist()
        memory = class_balanced(capacity, seed=trial)
        feed(memory, labels, sizes)
        assert_balanced(memory, labels)
        slot_label, slot_item = naive_balancer(labels, capacity, seed=trial)
        assert memory.slot_labels().tolist() == slot_label
        assert memory.stored(["id"])["id"].tolist() == slot_item


def test_the_contents_do_not_depend_on_batching_or_on_sampling():
    labels = random_stream(np.random.default_rng(3)) * 3
    one = class_balanced(25, seed=5)
    feed(one, labels, [1] * len(labels))
    other = class_balanced(25, seed=5)
    for start in range(0, len(labels), 13):  # other batches, with replay sampled in between
        feed_part = labels[start : start + 13]
        ids = torch.arange(start, start + len(feed_part))
        other.add({"id": ids, "x": ids[:, None].float().expand(-1, 3), "targets": torch.tensor(feed_part)})
        other.sample(4, 2)
    assert torch.equal(one.stored()["id"], other.stored()["id"])


def test_the_evicted_slot_is_uniform_over_the_largest_class_and_ties_are_uniform():
    trials = 1000
    evicted, loser = np.zeros(4), Counter()
    for seed in range(trials):
        memory = class_balanced(4, seed=seed)
        feed(memory, [0, 0, 0, 0, 1], [5])  # class 1 takes one of class 0's four slots
        kept = set(memory.stored(["id"])["id"].tolist())
        evicted[list({0, 1, 2, 3} - kept)[0]] += 1
        tie = class_balanced(4, seed=seed)
        feed(tie, [0, 0, 1, 1, 2], [5])  # classes 0 and 1 are both largest
        loser[min(tie.class_counts(), key=lambda c: (tie.class_counts()[c], c))] += 1
    _, p = stats.chisquare(evicted)
    assert p > 1e-3, f"evictions are not uniform over the class's slots: {evicted}"
    assert stats.binomtest(loser[0], trials, 0.5).pvalue > 1e-3, f"ties are not broken uniformly: {loser}"
    # The statistic has power: a memory that always evicted its first slot would be rejected.
    assert stats.chisquare([trials, 0, 0, 0])[1] < 1e-10


@pytest.mark.parametrize("sample_between", [False, True])
def test_deferred_insertion_is_one_add_late_and_otherwise_identical(sample_between):
    labels = random_stream(np.random.default_rng(7)) + list(range(15))
    now, late = class_balanced(20, seed=1), class_balanced(20, seed=1, defer=True)
    for start in range(0, len(labels), 9):
        part = labels[start : start + 9]
        ids = torch.arange(start, start + len(part))
        items = {"id": ids, "x": ids[:, None].float().expand(-1, 3), "targets": torch.tensor(part)}
        before = copy.deepcopy(now.stored())
        now.add(items)
        late.add(items)
        assert late.num_pending == len(part)
        assert all(torch.equal(before[k], late.stored()[k]) for k in before)  # it holds what `now` held before
        if sample_between and len(late):
            late.sample(3)
    late.flush()
    assert late.num_pending == 0
    assert torch.equal(now.stored()["id"], late.stored()["id"]) and now.class_counts() == late.class_counts()


@pytest.mark.parametrize("defer", [False, True])
def test_state_dict_round_trip_is_exact_with_a_pending_batch(defer):
    labels = random_stream(np.random.default_rng(11)) + [9] * 30
    cut = len(labels) // 2 + 3

    def run(memory, part, offset):
        out = []
        for start in range(0, len(part), 6):
            ids = torch.arange(offset + start, offset + min(start + 6, len(part)))
            memory.add({"id": ids, "x": ids[:, None].float(), "targets": torch.tensor(part[start : start + 6])})
            if len(memory):
                out.append(memory.sample(4, 2)["id"])
        return out

    a = class_balanced(16, seed=2, defer=defer)
    run(a, labels[:cut], 0)
    state = copy.deepcopy(a.state_dict())
    assert (state["pending"] is not None) == defer
    b = class_balanced(16, seed=99, defer=defer)
    b.load_state_dict(state)
    assert b.num_pending == a.num_pending and torch.equal(a.stored()["id"], b.stored()["id"])
    sa, sb = run(a, labels[cut:], cut), run(b, labels[cut:], cut)
    assert all(torch.equal(x, y) for x, y in zip(sa, sb)) and len(sa) == len(sb)
    a.flush(), b.flush()
    assert torch.equal(a.stored()["id"], b.stored()["id"]) and a.class_counts() == b.class_counts()


def test_states_of_other_policies_are_refused():
    reservoir, balanced = ReservoirBuffer(5, seed=0), class_balanced(5)
    reservoir.add({"x": torch.zeros(2), "targets": torch.zeros(2, dtype=torch.int64)})
    balanced.add({"x": torch.zeros(2), "targets": torch.zeros(2, dtype=torch.int64)})
    with pytest.raises(ValueError, match="'reservoir' memory"):
        class_balanced(5).load_state_dict(reservoir.state_dict())
    with pytest.raises(ValueError, match="'class_balanced' memory"):
        ReservoirBuffer(5).load_state_dict(balanced.state_dict())


@pytest.mark.parametrize("defer", [False, True])
def test_rejected_batches_change_nothing(defer):
    memory = class_balanced(6, defer=defer)
    feed(memory, [0, 1, 2, 0], [4])
    before = copy.deepcopy(memory.state_dict())
    ids = torch.arange(2)
    bad = [
        ({"id": ids, "x": torch.zeros(2, 3)}, "differ from the stored fields"),
        ({"id": ids, "x": torch.zeros(2, 3), "targets": torch.zeros(2)}, "dtype"),
        ({"id": ids, "x": torch.zeros(2, 3), "targets": torch.zeros(3, dtype=torch.int64)}, "batch size"),
    ]
    for items, message in bad:
        with pytest.raises(ValueError, match=message):
            memory.add(items)
    fresh = class_balanced(6)
    with pytest.raises(ValueError, match="needs each item's class in field 'targets'"):
        fresh.add({"x": torch.zeros(2, 3)}, validate=False)
    for labels in (torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2)):
        with pytest.raises(ValueError, match="1-d integer"):
            fresh.add({"x": torch.zeros(2, 3), "targets": labels})
    assert len(fresh) == 0 and not fresh.names
    after = memory.state_dict()
    assert after["num_seen"] == before["num_seen"] and memory.num_pending == (4 if defer else 0)
    assert all(torch.equal(after["storage"][k], before["storage"][k]) for k in before["storage"])
    for bad_args in ({"label_field": ""}, {"defer": "yes"}, {"seed": None, "label_field": 3}):
        with pytest.raises(ValueError):
            ClassBalancedBuffer(4, **bad_args)


def test_a_pending_batch_follows_field_growth():
    memory = class_balanced(5, defer=True)
    memory.add({"logits": torch.ones(2, 3), "targets": torch.tensor([0, 1])})
    memory.add({"logits": torch.full((2, 3), 2.0), "targets": torch.tensor([2, 3])})  # pending
    memory.add_field("logit_width", torch.tensor(3, dtype=torch.int32))
    memory.widen("logits", 5)
    width = torch.tensor([5], dtype=torch.int32)
    memory.add({"logits": torch.full((1, 5), 7.0), "targets": torch.tensor([4]), "logit_width": width})
    memory.flush()
    stored = memory.stored()
    assert stored["logit_width"].tolist() == [3, 3, 3, 3, 5]
    assert stored["logits"][2:].tolist() == [[2.0, 2, 2, 0, 0], [2.0, 2, 2, 0, 0], [7.0] * 5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # numpy writes; torch's index_copy
def test_non_finite_values_are_stored_as_zero_on_every_path(dtype):
    for defer in (False, True):
        memory = class_balanced(6, defer=defer)
        x = torch.tensor([[float("nan")], [1.0], [2.0], [3.0], [4.0], [5.0]], dtype=dtype)
        memory.add({"x": x, "targets": torch.zeros(6, dtype=torch.int64)})  # filling: a slice copy
        inf = torch.full((3, 1), float("inf"), dtype=dtype)
        memory.add({"x": inf, "targets": torch.tensor([1, 2, 3])})  # three swaps at scattered slots
        memory.flush()
        assert memory.class_counts() == {0: 3, 1: 1, 2: 1, 3: 1} and torch.isfinite(memory.stored()["x"]).all()


# ---------------------------------------------------------------------------------------------- ER with it


@pytest.mark.parametrize("name", ["er", "der", "der++"])
@pytest.mark.parametrize("defer", [None, True])
def test_er_family_with_a_class_balanced_memory_resumes_bit_identically(name, defer):
    data = batches(20)
    spec = catalog.get(name)

    def build(model):
        syn = spec.create(model, {"buffer_policy": "class_balanced"}, buffer_size=40, buffer_sample_size=8)
        syn.buffer.defer = defer
        return syn

    torch.manual_seed(0)
    model = mlp()
    syn = build(model)
    opt = train(model, syn, data[:11], task_length=10)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), syn.state_dict()))
    train(model, syn, data[11:], task_length=10)
    assert isinstance(syn.buffer, ClassBalancedBuffer) and syn.buffer_policy == "class_balanced"
    assert "targets" in syn.buffer.names  # DER stores them for the balancer
    syn.buffer.flush()
    labels = [int(v) for _, y in data for v in y]
    counts = syn.buffer.class_counts()
    assert sum(counts.values()) == 40 and max(counts.values()) - min(counts.values()) <= 1
    assert all(counts.get(c, 0) >= min(n, max(counts.values()) - 1) for c, n in Counter(labels).items())

    torch.manual_seed(5)
    resumed = mlp()
    resumed.load_state_dict(saved[0])
    syn2 = build(resumed)
    syn2.load_state_dict(saved[2])
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.05)
    opt2.load_state_dict(saved[1])
    for i, (x, y) in enumerate(data[11:], start=11):
        loss = F.cross_entropy(resumed(x), y)
        opt2.zero_grad()
        syn2.backward(loss, y, input=x)
        opt2.step()
        if (i + 1) % 10 == 0:
            syn2.end_task([(y, {"input": x}) for x, y in data[i - 9 : i + 1]])
    syn2.buffer.flush()
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert all(torch.equal(syn.buffer.stored()[k], syn2.buffer.stored()[k]) for k in syn.buffer.names)


def test_buffer_policy_is_checked_and_listed_in_the_catalog():
    with pytest.raises(ValueError, match="buffer_policy must be one of"):
        ER(mlp(), 10, 4, buffer_policy="herding")  # filled at task ends: not for a per-step method
    with pytest.raises(ValueError, match="buffer_policy"):
        ER(mlp(), 10, 4, buffer_policy="balanced")
    assert isinstance(ER(mlp(), 10, 4).buffer, ReservoirBuffer)
    for name in ("er", "der", "der++"):
        hparam = next(h for h in catalog.get(name).hparams if h.name == "buffer_policy")
        assert hparam.default == "reservoir" and hparam.choices == ("reservoir", "class_balanced")


def test_make_buffer_and_a_method_that_declares_its_policies():
    assert [type(make_buffer(p, 8, seed=0)) for p in ("reservoir", "class_balanced", "herding")] == [
        ReservoirBuffer,
        ClassBalancedBuffer,
        HerdingMemory,
    ]
    assert all(isinstance(make_buffer(p, 8), Buffer) for p in ("reservoir", "herding"))
    with pytest.raises(ValueError, match="buffer_policy"):
        make_buffer("fifo", 8)

    class Exemplars(BufferedSynapse):  # e.g. iCaRL: a memory filled at task ends
        buffer_policies = ("herding",)

        def _backward(self, loss, targets, model_inputs):
            self._run_backward(loss)

    assert isinstance(Exemplars(mlp(), 20, 4, buffer_policy="herding").buffer, HerdingMemory)
    with pytest.raises(ValueError, match=r"\('herding',\)"):
        Exemplars(mlp(), 20, 4)


# ---------------------------------------------------------------------------------------------- herding


def naive_herding(features, m):
    """Algorithm 4 written out: normalise, then for k = 1..m try every unchosen item (float64)."""
    phi = [f / np.linalg.norm(f) for f in np.asarray(features, dtype=np.float64)]
    mu = sum(phi) / len(phi)
    chosen, total = [], np.zeros_like(mu)
    for k in range(1, min(m, len(phi)) + 1):
        best, best_distance = None, np.inf
        for i, f in enumerate(phi):
            if i in chosen:
                continue
            distance = np.linalg.norm(mu - (total + f) / k)
            if distance < best_distance:
                best, best_distance = i, distance
        chosen.append(best)
        total = total + phi[best]
    return chosen


def test_herding_matches_hand_computations():
    # 1-d, unnormalised: mean 3.2. k=1: 3 (|3-3.2|). k=2: (3+x)/2 nearest 3.2 -> x=2 (2.5). k=3: (5+x)/3
    # -> x=1 (2.0, vs 1.67 for 0 and 5.0 for 10). k=4: (6+x)/4 -> x=10 (4.0, vs 1.5 for 0). Then 0.
    # Nearest-to-the-mean order would be 3, 2, 1, 0, 10: herding takes 10 earlier, to balance the mean.
    features = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    assert herding_selection(features, 5, normalize=False).tolist() == [3, 2, 1, 4, 0]
    assert herding_selection(features, 2, normalize=False).tolist() == [3, 2]
    # 2-d, normalised: (5,0) -> a=(1,0), (0,.5) -> b=(0,1), (2,2) -> c=(s,s), s=1/sqrt(2); mean (.569, .569).
    # k=1: c is nearest (.038 vs .510). k=2: a and b tie exactly (.127): the lower index, a. Then b.
    features = torch.tensor([[5.0, 0.0], [0.0, 0.5], [2.0, 2.0]])
    assert herding_selection(features, 3).tolist() == [2, 0, 1]
    assert herding_selection(features, 0).tolist() == []


def test_herding_matches_a_naive_implementation_and_keeps_prefixes():
    g = torch.Generator().manual_seed(0)
    for trial in range(6):
        n, d = 25 + trial, 2 + trial
        features = torch.randn(n, d, generator=g) + torch.randn(d, generator=g)  # off-centre, as features are
        assert herding_selection(features, 12).tolist() == naive_herding(features, 12)
        assert herding_selection(features, n + 5).tolist() == naive_herding(features, n + 5)  # all of them
        # Algorithm 5's reduction is a prefix; and rescaling an item does not move it (phi is normalised)
        assert herding_selection(features, 5).tolist() == herding_selection(features, 12)[:5].tolist()
        scales = torch.rand(n, 1, generator=g) * 10 + 0.1
        assert herding_selection(features * scales, 12).tolist() == naive_herding(features, 12)
    with pytest.raises(ValueError, match="features"):
        herding_selection(torch.zeros(4), 2)
    with pytest.raises(ValueError, match="m must"):
        herding_selection(torch.zeros(4, 2), -1)


def task_data(classes, per_class, seed, batch=7):
    """Batches of items whose input encodes (class, index); features are the inputs themselves."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(per_class, 4, generator=g) + 3 * torch.eye(4)[c % 4] for c in classes])
    y = torch.tensor([c for c in classes for _ in range(per_class)])
    order = torch.randperm(len(y), generator=g)
    x, y = x[order], y[order]
    return [(y[i : i + batch], {"x": x[i : i + batch]}) for i in range(0, len(y), batch)], x, y


def identity_features(inputs):
    return inputs["x"]


def test_herding_memory_selects_by_herding_and_reduces_old_classes_to_a_prefix():
    memory = HerdingMemory(12, seed=0)
    data, x, y = task_data([0, 1], 10, seed=1)
    memory.select_task(data, identity_features)
    assert memory.exemplars_per_class == 6 and memory.class_ranges() == {0: (0, 6), 1: (6, 12)}
    for c in (0, 1):
        members = torch.nonzero(y == c).flatten()
        expected = x[members[herding_selection(x[members], 6)]]
        assert torch.equal(memory.class_items(c)["input:x"], expected)
        assert (memory.class_items(c)["targets"] == c).all()
    first = {c: memory.class_items(c)["input:x"].clone() for c in (0, 1)}

    data2, x2, y2 = task_data([2, 3], 10, seed=2)
    data2 = data2 + [(torch.tensor([4, 4]), {"x": torch.randn(2, 4)})]  # class 4: fewer items than m
    memory.select_task(data2, identity_features)
    assert memory.exemplars_per_class == 2 and memory.classes == (0, 1, 2, 3, 4) and len(memory) == 10
    for c in (0, 1):
        assert torch.equal(memory.class_items(c)["input:x"], first[c][:2])  # the first m of the old set
    members = torch.nonzero(y2 == 3).flatten()
    assert torch.equal(memory.class_items(3)["input:x"], x2[members[herding_selection(x2[members], 2)]])
    assert memory.sample(4)["input:x"].shape == (4, 4)


def test_herding_memory_state_round_trip_and_rejections():
    memory = HerdingMemory(8, seed=3)
    memory.select_task(task_data([0, 1], 6, seed=4)[0], identity_features)
    memory.sample(3, 2)
    saved = copy.deepcopy(memory.state_dict())
    twin = HerdingMemory(8, seed=77)
    twin.load_state_dict(saved)
    assert twin.class_ranges() == memory.class_ranges()
    assert torch.equal(twin.sample(3, 2)["input:x"], memory.sample(3, 2)["input:x"])

    before = copy.deepcopy(memory.state_dict())
    with pytest.raises(ValueError, match="cannot hold 9 classes"):
        memory.select_task(task_data(list(range(2, 9)), 2, seed=5)[0], identity_features)
    with pytest.raises(ValueError, match="features_fn must return"):
        memory.select_task(task_data([5], 3, seed=5)[0], lambda inputs: inputs["x"][:1])
    with pytest.raises(ValueError, match="non-finite"):
        memory.select_task(task_data([5], 3, seed=5)[0], lambda inputs: inputs["x"] / 0)
    with pytest.raises(ValueError, match="per-item shape"):
        memory.select_task([(torch.tensor([5]), {"x": torch.zeros(1, 3)})], identity_features)
    with pytest.raises(TypeError, match="select_task"):
        memory.add({"input:x": torch.zeros(1, 4), "targets": torch.zeros(1, dtype=torch.int64)})
    after = memory.state_dict()
    assert after["classes"] == before["classes"] and after["sizes"] == before["sizes"]
    assert torch.equal(after["storage"]["input:x"], before["storage"]["input:x"])
    memory.select_task([], identity_features)  # a task without data changes nothing
    assert memory.state_dict()["classes"] == before["classes"]
    with pytest.raises(ValueError, match="'herding' memory"):
        ReservoirBuffer(8).load_state_dict(before)


def test_head_input_features_is_the_model_minus_its_head():
    torch.manual_seed(0)
    model = mlp()
    x = torch.randn(5, 1, 28, 28)
    by_name, by_module = head_input_features(model, "5"), head_input_features(model, model[5])
    with torch.no_grad():
        assert torch.equal(by_name({"input": x}), model[:5](x))
        assert torch.equal(by_module({"input": x}), model[:5](x))
    with pytest.raises(ValueError, match="no submodule 'fc'"):
        head_input_features(model, "fc")
    with pytest.raises(ValueError, match="submodule of the model"):
        head_input_features(model, torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------- CUDA


@pytest.mark.parametrize("name", ["er", "der++"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_class_balanced_backward_never_synchronises_and_matches_the_cpu(name):
    memories = []
    for device in ("cpu", "cuda"):
        data = [(x.to(device), y.to(device)) for x, y in batches(30)]
        torch.manual_seed(0)
        model = mlp().to(device)
        syn = catalog.get(name).create(
            model, {"buffer_policy": "class_balanced"}, buffer_size=64, buffer_sample_size=16
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for i, (x, y) in enumerate(data):
            if device == "cuda" and i >= 10:  # from when it is full and past the first evictions
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                syn.backward(loss, y, input=x)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            opt.step()
        assert device == "cpu" or syn.buffer.num_pending == 8  # on CUDA the last batch waits
        syn.buffer.flush()
        memories.append((syn.buffer.slot_labels(), syn.buffer.stored()["targets"].cpu()))
    # The same seed keeps the same items on both devices (insertion is only later on CUDA, and the
    # balancer's choices do not depend on when replay is sampled).
    assert np.array_equal(memories[0][0], memories[1][0]) and torch.equal(memories[0][1], memories[1][1])
