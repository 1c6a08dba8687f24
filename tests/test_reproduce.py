"""The reproduction at one seed: the paper's orderings must hold (margins from the 3-seed run)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from reproduce import check_orderings, open_failures, run_all, summarize  # noqa: E402


@pytest.mark.slow
def test_seq_mnist_protocol_orderings_on_fashion_mnist(fashion_tasks):
    table = summarize(run_all("fashion-mnist", seeds=[0], workers=2))
    # Every finding holds except the documented gaps (reproduce.KNOWN_GAPS, stated in REPRODUCIBILITY.md).
    assert open_failures(check_orderings(table, single_seed=True)) == []
