"""Draws made ahead (synapse._draw_ahead) against the same draws made step by step: every row, and the
generator's state whenever it is read, through failed steps, key changes, other uses and checkpoints; then
its users (BiC's held-out reservoir here; the memory's and X-DER's in test_buffer.py and test_xder.py)."""

import copy
import random

import numpy as np
import pytest
import torch

from synapse._draw_ahead import STEPS, DrawAhead
from synapse.functional import distinct_subsets, reservoir_plan
from synapse.rehearsal.bic import _HeldOutReservoir


def subsets(n, k, calls):
    """A draw with rejection (its use of the generator varies), counting its calls' step counts."""

    def draw(rng, steps):
        calls.append(steps)
        return [distinct_subsets(rng, n, k, 2) for _ in range(steps)]

    return draw


def doubles(n):
    return lambda rng, steps: list(rng.random((steps, n)))


def take(ahead, key, draw):
    """A step that cannot fail: its row, consumed."""
    row = ahead.peek(key, draw)
    ahead.consume()
    return row


def test_rows_and_the_generator_equal_step_by_step_draws_through_every_kind_of_use():
    plain = np.random.Generator(np.random.PCG64(5))
    ahead = DrawAhead(copy.deepcopy(plain))
    schedule = random.Random(0)
    calls, steps = [], 0
    for _ in range(1500):
        action = schedule.choices(["take", "fail", "commit", "other", "read"], weights=[60, 8, 20, 2, 3])[0]
        n = schedule.choice([30, 30, 30, 9]) if schedule.random() < 0.05 else 30  # mostly one key: streaks
        if action == "take":
            assert np.array_equal(take(ahead, ("subsets", n), subsets(n, 3, calls)), distinct_subsets(plain, n, 3, 2))
        elif action in ("fail", "commit"):  # peeked for a step that fails (nothing taken) or succeeds
            got = ahead.peek(("doubles", n), doubles(n))
            want = copy.deepcopy(plain).random(n)
            assert np.array_equal(got, want)
            if action == "commit":
                assert np.array_equal(ahead.peek(("doubles", n), doubles(n)), want)  # the same row until taken
                ahead.consume()
                plain.random(n)
        elif action == "other":  # another use of the generator, between steps
            assert np.array_equal(ahead.generator().integers(0, 9, 4), plain.integers(0, 9, 4))
        else:
            assert ahead.generator().bit_generator.state == plain.bit_generator.state
        steps += 1
    assert ahead.generator().bit_generator.state == plain.bit_generator.state
    assert calls.count(STEPS) > 5  # the draws were made ahead, blocks left part-used included


def test_consuming_a_row_dropped_by_another_use_is_refused():
    ahead = DrawAhead(np.random.Generator(np.random.PCG64(0)))
    ahead.peek("k", doubles(2))
    ahead.generator()  # drops the peeked row: taking it now would leave the generator behind
    with pytest.raises(RuntimeError, match="used after the peek"):
        ahead.consume()


def test_one_step_at_a_time_draws_no_row_ahead():
    calls = []
    ahead = DrawAhead(np.random.Generator(np.random.PCG64(0)), steps=1)
    for _ in range(5):
        take(ahead, "k", subsets(10, 3, calls))
    assert calls == [1] * 5


# ---------------------------------------------------------------------------------------- BiC's held-out set
def held_out_step(memory, batch, commit, base):
    """One step's plan of ``memory`` (committed, or a failed step's), its items numbered from ``base``."""
    slots, rows, drew = memory.plan(batch)
    if commit:
        memory.commit({"id": torch.arange(base, base + batch)}, slots, rows, drew)
    return slots, rows


def test_held_out_plans_equal_step_by_step_plans_through_failed_steps_batch_changes_and_a_checkpoint():
    memory = _HeldOutReservoir(6, seed=4)
    plain = np.random.Generator(np.random.PCG64())
    plain.bit_generator.state = memory.state_dict()["rng_state"]
    schedule = random.Random(1)
    saved, window, window_end = None, [], None
    for step in range(4 * STEPS):
        batch = 7 if step % 90 == 89 else 10  # another count of draws now and then: the block is dropped
        commit = schedule.random() > 0.1  # else the step fails after its plan
        if step == 3 * STEPS:
            memory.reset()  # a new task: filling again (no draws), then replacing
        seen = memory.num_seen
        want = reservoir_plan(seen, batch, 6, copy.deepcopy(plain))
        assert held_out_step(memory, batch, commit, step * 10) == want
        if commit:
            reservoir_plan(seen, batch, 6, plain)  # the reference draws as the step did
        if step % 50 == 0:
            assert memory.state_dict()["rng_state"] == plain.bit_generator.state
        if saved is not None and len(window) < STEPS:
            window.append((batch, commit, step * 10, want))
            window_end = copy.deepcopy(plain.bit_generator.state)
        if step == STEPS + 20:  # in the middle of a block (drawn from step 52 on, after the read at step 50)
            assert 0 < memory._draws_ahead._used < len(memory._draws_ahead._rows) == STEPS
            saved = copy.deepcopy(memory.state_dict())
    resumed = _HeldOutReservoir(6, seed=99)
    resumed.load_state_dict(saved)
    for batch, commit, base, want in window:
        assert held_out_step(resumed, batch, commit, base) == want
    assert resumed.state_dict()["rng_state"] == window_end


def test_a_held_out_plan_changes_nothing_until_committed():
    memory = _HeldOutReservoir(3, seed=0)
    memory.add({"id": torch.arange(5)})
    before = copy.deepcopy(memory.state_dict())
    for _ in range(3):
        memory.plan(4)
    after = memory.state_dict()
    assert after["num_seen"] == before["num_seen"] and after["rng_state"] == before["rng_state"]
    assert torch.equal(after["storage"]["id"], before["storage"]["id"])
