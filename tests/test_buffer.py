import numpy as np
import pytest
import torch
from scipy import stats

from synapse import ReservoirBuffer


def stream_inclusion_counts(capacity, stream, batch, trials):
    counts = np.zeros(stream)
    for trial in range(trials):
        buf = ReservoirBuffer(capacity, seed=trial)
        ids = torch.arange(stream)
        for start in range(0, stream, batch):
            buf.add({"id": ids[start : start + batch]})
        stored = buf.state_dict()["storage"]["id"][: len(buf)]
        assert len(set(stored.tolist())) == capacity, "an item is stored twice"
        counts[stored.numpy()] += 1
    return counts


@pytest.mark.parametrize("batch", [1, 3, 16])  # 16 > capacity: many rows of one batch compete for slots
def test_reservoir_keeps_every_item_with_probability_capacity_over_n(batch):
    capacity, stream, trials = 5, 40, 3000
    counts = stream_inclusion_counts(capacity, stream, batch, trials)
    expected = np.full(stream, trials * capacity / stream)
    _, p = stats.chisquare(counts, expected)
    assert p > 1e-3, f"inclusion counts are not uniform (p={p:.2g}): {counts}"


def test_chi_square_detects_a_biased_buffer():
    # The same statistic rejects a "keep the newest items" memory, so the test above can fail.
    trials, capacity, stream = 3000, 5, 40
    counts = np.zeros(stream)
    counts[-capacity:] = trials
    _, p = stats.chisquare(counts, np.full(stream, trials * capacity / stream))
    assert p < 1e-10


def test_fills_in_order_then_counts_seen():
    buf = ReservoirBuffer(10, seed=0)
    buf.add({"x": torch.arange(4)})
    assert len(buf) == 4 and buf.num_seen == 4
    assert buf.state_dict()["storage"]["x"][:4].tolist() == [0, 1, 2, 3]
    buf.add({"x": torch.arange(4, 30)})
    assert len(buf) == 10 and buf.num_seen == 30


def test_sampling_is_without_replacement_and_in_range():
    buf = ReservoirBuffer(50, seed=1)
    buf.add({"x": torch.arange(30)})
    idx = buf.sample_indices(20, num_minibatches=3)
    assert idx.shape == (3, 20)
    for row in idx:
        assert len(set(row.tolist())) == 20
        assert row.max() < 30
    assert buf.sample_indices(100).shape == (1, 30)  # capped at len(buffer)


def test_deterministic_under_manual_seed_and_seed_dependent():
    def run(seed):
        torch.manual_seed(seed)
        buf = ReservoirBuffer(8)
        for i in range(10):
            buf.add({"x": torch.arange(i * 5, i * 5 + 5)})
        return buf.state_dict()["storage"]["x"].tolist(), buf.sample_indices(4).tolist()

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_memory_is_exact_and_dtypes_are_kept():
    buf = ReservoirBuffer(100, seed=0)
    buf.add({"img": torch.zeros(4, 1, 28, 28, dtype=torch.uint8), "y": torch.zeros(4, dtype=torch.int64)})
    assert buf.schema()["img"] == ((1, 28, 28), torch.uint8)
    assert buf.bytes_per_item == 784 + 8
    assert buf.nbytes == 100 * (784 + 8)


def test_state_dict_resumes_identically():
    torch.manual_seed(0)
    a = ReservoirBuffer(6)
    a.add({"x": torch.arange(10)})
    b = ReservoirBuffer(6, seed=123)
    b.load_state_dict(a.state_dict())
    for buf in (a, b):
        buf.add({"x": torch.arange(10, 40)})
    assert torch.equal(a.state_dict()["storage"]["x"], b.state_dict()["storage"]["x"])
    assert torch.equal(a.sample_indices(3), b.sample_indices(3))


def test_rejected_batch_changes_nothing():
    buf = ReservoirBuffer(4, seed=0)
    buf.add({"x": torch.zeros(2, 3)})
    before = {k: v.clone() for k, v in buf.state_dict()["storage"].items()}
    with pytest.raises(ValueError, match="per-item shape"):
        buf.add({"x": torch.zeros(2, 5)})
    with pytest.raises(ValueError, match="dtype"):
        buf.add({"x": torch.zeros(2, 3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="fields"):
        buf.add({"y": torch.zeros(2, 3)})
    assert buf.num_seen == 2
    assert all(torch.equal(before[k], v) for k, v in buf.state_dict()["storage"].items())


def test_non_finite_values_are_stored_as_zero():
    buf = ReservoirBuffer(3, seed=0)
    buf.add({"z": torch.tensor([[1.0], [float("nan")], [float("inf")]])})  # while filling
    assert buf.state_dict()["storage"]["z"].flatten().tolist() == [1.0, 0.0, 0.0]
    for _ in range(20):  # and when replacing
        buf.add({"z": torch.full((4, 1), float("-inf"))})
    assert torch.isfinite(buf.state_dict()["storage"]["z"]).all()


def test_plan_resolves_duplicate_slots_as_sequential_insertion_would():
    import numpy as np

    from synapse.functional import reservoir_plan

    for seed in range(50):
        slots, rows = reservoir_plan(10, 40, 5, np.random.Generator(np.random.PCG64(seed)))
        # Replay the same draws one item at a time.
        rng = np.random.Generator(np.random.PCG64(seed))
        t = np.arange(10, 50)
        draws = (rng.random(len(t)) * (t + 1)).astype(np.int64)
        final = {}
        for row, j in enumerate(draws):
            if j < 5:
                final[int(j)] = row
        assert dict(zip(slots, rows)) == final
        assert len(set(slots)) == len(slots)


def test_invalid_capacity():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="capacity"):
            ReservoirBuffer(bad)


def test_widen_pads_with_zeros():
    buf = ReservoirBuffer(2, seed=0)
    buf.add({"z": torch.ones(2, 3)})
    buf.widen("z", 5)
    z = buf.state_dict()["storage"]["z"]
    assert z.shape == (2, 5) and z[:, :3].eq(1).all() and z[:, 3:].eq(0).all()


def test_write_overwrites_the_rows_named_and_no_others():
    buf = ReservoirBuffer(4, seed=0)
    buf.add({"x": torch.arange(4.0).unsqueeze(1), "loss": torch.zeros(4)})
    buf.write("loss", torch.tensor([2, 0]), torch.tensor([5.0, float("nan")], dtype=torch.float64))
    stored = buf.stored()
    assert stored["loss"].tolist() == [0.0, 0.0, 5.0, 0.0] and stored["loss"].dtype == torch.float32
    assert stored["x"].flatten().tolist() == [0.0, 1.0, 2.0, 3.0]
    buf.write("loss", torch.tensor([1]), torch.tensor([7.0]))
    assert buf.stored()["loss"].tolist() == [0.0, 7.0, 5.0, 0.0]  # non-finite as 0 (above); others kept


@pytest.mark.parametrize("n, k", [(6, 2), (6, 4), (5, 5)])  # rejection branch, partition branch, permutation
def test_replay_minibatches_are_uniform_distinct_subsets(n, k):
    import itertools

    import numpy as np

    from synapse.functional import distinct_subsets

    picks = distinct_subsets(np.random.Generator(np.random.PCG64(0)), n, k, 20_000)
    assert picks.shape == (20_000, k)
    assert all(len(set(row)) == k for row in picks.tolist())
    subsets = list(itertools.combinations(range(n), k))
    counts = np.zeros(len(subsets))
    index = {s: i for i, s in enumerate(subsets)}
    for row in np.sort(picks, axis=1):
        counts[index[tuple(row.tolist())]] += 1
    if len(subsets) > 1:
        _, p = stats.chisquare(counts)
        assert p > 1e-3, counts


def test_sampling_state_resumes_identically_once_full():
    torch.manual_seed(0)
    a = ReservoirBuffer(20)
    a.add({"x": torch.arange(50)})
    a.sample_indices(4, 2)  # draws a block of future minibatches
    b = ReservoirBuffer(20, seed=7)
    b.load_state_dict(a.state_dict())
    for _ in range(100):  # across the end of the block
        assert torch.equal(a.sample_indices(4, 2), b.sample_indices(4, 2))


def test_reservoir_stays_uniform_across_draw_blocks():
    # A stream longer than two blocks of pre-drawn replacements, fed in uneven batches.
    import numpy as np

    from synapse.memory.reservoir import DRAW_BLOCK

    stream, capacity, trials, bins = 2 * DRAW_BLOCK + 1000, 6, 400, 9
    sizes = [7, 13, 1, 32]
    counts = np.zeros(bins)
    for trial in range(trials):
        buf = ReservoirBuffer(capacity, seed=trial)
        start, i = 0, 0
        while start < stream:
            size = min(sizes[i % len(sizes)], stream - start)
            buf.add({"id": torch.arange(start, start + size)})
            start, i = start + size, i + 1
        kept = buf.state_dict()["storage"]["id"].numpy()
        counts += np.bincount(kept * bins // stream, minlength=bins)
    _, p = stats.chisquare(counts)  # every stretch of the stream equally represented
    assert p > 1e-3, counts


def test_host_writes_equal_the_torch_path(monkeypatch):
    """CPU insertion writes through numpy views; it must store exactly what the torch ops store."""
    import synapse.buffer as buffer_module

    def fill(buf):
        g = torch.Generator().manual_seed(1)
        for step in range(300):
            z = torch.randn(7, 4, generator=g)
            z[step % 7, step % 4] = (float("nan"), float("inf"), 1.0)[step % 3]
            x = torch.randint(0, 256, (7, 2, 3), generator=g, dtype=torch.uint8)
            w = z[:, 0].clone()  # a 1-d float field, non-finite values included
            buf.add({"x": x, "y": torch.arange(7), "z": z, "w": w})
        return buf.state_dict()["storage"]

    host = fill(ReservoirBuffer(20, seed=0))
    monkeypatch.setattr(buffer_module, "_NUMPY_DTYPES", frozenset())
    reference_buffer = ReservoirBuffer(20, seed=0)
    reference = fill(reference_buffer)
    assert reference_buffer._host is None  # the torch path really ran
    assert all(torch.equal(host[k], reference[k]) for k in reference)
    assert torch.isfinite(host["z"]).all() and torch.isfinite(host["w"]).all()


def test_the_reservoir_keeps_its_old_import_path():
    import synapse.buffer
    import synapse.memory
    from synapse.buffer import ReservoirBuffer as from_buffer

    assert from_buffer is synapse.memory.ReservoirBuffer is ReservoirBuffer
    assert from_buffer.__module__ == "synapse.memory.reservoir"
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        synapse.buffer.Nope  # noqa: B018


def test_draws_from_a_memory_that_is_not_full_are_made_ahead_as_step_by_step_draws_would_be():
    # A memory that is not full and stops changing (X-DER's between task ends) has its draws made
    # SAMPLE_BLOCK steps at a time; every draw, and the generator's state whenever read (a checkpoint, an
    # insertion), must be those of one draw per step.
    import copy

    from synapse._draw_ahead import STEPS
    from synapse.buffer import SAMPLE_BLOCK
    from synapse.functional import distinct_subsets

    buf = ReservoirBuffer(50, seed=3)
    buf.add({"id": torch.arange(20)})  # filling: no draw
    plain = copy.deepcopy(buf.state_dict()["rng_state"])
    ref = np.random.Generator(np.random.PCG64())
    ref.bit_generator.state = plain
    for step in range(2 * SAMPLE_BLOCK + 10):
        if step == SAMPLE_BLOCK + 7:
            buf.add({"id": torch.arange(5)})  # the population grows mid-block (still filling: no draw)
        n = len(buf)
        assert torch.equal(
            buf.sample_indices(4, 2).reshape(-1), torch.from_numpy(distinct_subsets(ref, n, 4, 2).reshape(-1))
        )
        if step == 1:
            assert len(buf._draws_ahead._rows) == STEPS  # drawn ahead from the second alike draw
        if step in (5, SAMPLE_BLOCK + 3, 2 * SAMPLE_BLOCK + 9):
            assert buf.state_dict()["rng_state"] == ref.bit_generator.state
