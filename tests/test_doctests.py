"""The docstrings' examples run as doctests, so they cannot rot.

Every module of the package except the experiment program (which needs datasets) is searched. Each
example runs in its module's globals plus a fresh set of the names the examples use:

* ``model``: a tiny network, ``forward(self, inputs)``, 8 features, a head ``model.fc`` with 4 classes;
* ``tasks``: two tasks of three random batches of 10 (classes 0-1, then 2-3); ``loader``: the first
  task; ``stream``: both tasks' batches one after the other (task-free); ``inputs``, ``targets``: a batch;
* ``optimizer`` (SGD), ``criterion`` (cross-entropy), ``device`` (the CPU), ``torch``, ``nn``, ``F``.

An example that cannot run here (it reads or downloads a dataset) is marked ``# doctest: +SKIP`` where
it stands, with the reason in the text around it."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import synapse

NOT_SEARCHED = ("synapse.experiments",)  # the CLI's world: datasets, plots, progress bars
OPTIONAL = ("synapse.integrations",)  # adapters whose framework may be missing: skipped then, not failed


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.fc = nn.Linear(16, 4)  # the head

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(inputs))


def example_globals() -> Dict[str, Any]:
    """The names the examples use, made afresh for each docstring."""
    torch.manual_seed(0)
    model = TinyNet()

    def task(classes: Tuple[int, ...]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        labels = torch.tensor(classes)
        return [(torch.randn(10, 8), labels[torch.randint(len(classes), (10,))]) for _ in range(3)]

    tasks = [task((0, 1)), task((2, 3))]
    inputs, targets = tasks[0][0]
    return {
        "torch": torch,
        "nn": nn,
        "F": F,
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "criterion": nn.CrossEntropyLoss(),
        "tasks": tasks,
        "loader": tasks[0],
        "stream": tasks[0] + tasks[1],
        "inputs": inputs,
        "targets": targets,
        "device": torch.device("cpu"),
    }


def _collect() -> List[Any]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    names = ["synapse"] + [
        info.name
        for info in pkgutil.walk_packages(synapse.__path__, "synapse.")
        if not info.name.startswith(NOT_SEARCHED)
    ]
    found: List[Any] = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            if not name.startswith(OPTIONAL):
                raise
            found.append(pytest.param(None, id=name, marks=pytest.mark.skip(reason=f"{name}: {e}")))
            continue
        found.extend(pytest.param(t, id=t.name) for t in finder.find(module) if t.examples)
    return found


DOCTESTS = _collect()


def test_the_examples_are_found():
    # The method docstrings have examples: finding none would mean the search broke, not that all passed.
    found = {p.id for p in DOCTESTS}
    assert {"synapse.rehearsal.er.ER", "synapse.memory.reservoir.ReservoirBuffer", "synapse.tasks.TaskDict"} <= found


@pytest.mark.parametrize("test", DOCTESTS)
def test_docstring_example(test):
    test.globs = {**test.globs, **example_globals()}
    report: List[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    result = runner.run(test, out=report.append)
    assert result.failed == 0, "".join(report)
    if result.attempted == 0:
        pytest.skip("every line of this example is marked +SKIP")
