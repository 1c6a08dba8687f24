"""The reproduction's findings: on the committed raw runs always, and at one seed from scratch on request."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from reproduce import check_orderings, open_failures, results_from_raw, run_all, summarize  # noqa: E402

RAW = os.path.join(ROOT, "benchmarks", "results", "reproduce_fashion-mnist.json")


def test_committed_runs_keep_the_papers_orderings():
    """The raw runs REPRODUCIBILITY.md is rendered from hold every finding it states, known gaps aside."""
    with open(RAW) as f:
        results = results_from_raw(json.load(f))
    assert ("der++", 500) in results and len(results[("der++", 500)]) == 3
    assert open_failures(check_orderings(summarize(results))) == []


def test_a_broken_ordering_is_reported():
    with open(RAW) as f:
        results = results_from_raw(json.load(f))
    chance = [{**r, "average_accuracy": {"class_il": 0.1, "task_il": 0.5}} for r in results[("der++", 500)]]
    failures = open_failures(check_orderings(summarize({**results, ("der++", 500): chance})))
    assert any(f.startswith("buffer 500: DER++ 10.00 <") for f in failures)


def test_runs_are_kept_in_seed_order_whatever_order_they_finish(monkeypatch):
    """Two or more workers return runs as they finish; a row's runs (and the --json per-seed lists) must
    still follow the seeds (they followed the finishing order, which mislabelled seeds in the raw file)."""
    import reproduce

    def finish_backwards(work, jobs, workers):
        for method, buffer, seed, *_ in reversed(jobs):
            yield (method, buffer, seed), {"seed": seed, "average_accuracy": {"class_il": seed / 10, "task_il": 0.5},
                                           "wall_time_s": 0.0}  # fmt: skip

    monkeypatch.setattr(reproduce, "run_jobs", finish_backwards)
    results = reproduce.run_all("fashion-mnist", [2, 0, 1], 2, rows=[("er", 200), ("der", 500)])
    for runs in results.values():
        assert [r["seed"] for r in runs] == [2, 0, 1]
        assert [r["average_accuracy"]["class_il"] for r in runs] == [0.2, 0.0, 0.1]


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("SYNAPSE_FULL_REPRODUCTION"),
    reason="a full Seq-F-MNIST reproduction at one seed (about 5 CPU-min on 2 cores); CI runs none: set "
    "SYNAPSE_FULL_REPRODUCTION=1",
)
def test_seq_mnist_protocol_orderings_on_fashion_mnist(fashion_tasks):
    table = summarize(run_all("fashion-mnist", seeds=[0], workers=2))
    # Every finding holds except the documented gaps (reproduce.KNOWN_GAPS, stated in REPRODUCIBILITY.md).
    assert open_failures(check_orderings(table, single_seed=True)) == []
