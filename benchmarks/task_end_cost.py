"""What a task end of EWC and MAS costs, as a ratio to one epoch of training on the same data and model.

Each model trains for one epoch over a task of ``--items`` items in the user's own loop (forward, loss,
``loss.backward()``, optimizer step), and each method's ``end_task(named_batches(loader))`` runs over
the same batches. The two alternate for ``--rounds`` rounds in one process, so that a slow spell of the
machine hits both alike; the table gives the median of each and their ratio.

Models:

* ``cnn``: the small CNN of a public tutorial's shape (the PyTorch MNIST example, narrowed): two 3x3
  convolutions (1->8->16), max-pooling, dropout, a 2304->64 layer, a 64->10 layer and ``log_softmax``;
  Adadelta (lr 1), batch 64, as in the issue that measured 0.99 s an epoch against 5.06 s for
  ``EWC.end_task``.
* ``mlp``: the 784-100-100 MLP of the DER paper's protocol (``synapse.experiments.models``), SGD, batch
  10 as in the reproduction.

    python benchmarks/task_end_cost.py                      # both models, 1 CPU thread
    python benchmarks/task_end_cost.py --device cuda --threads 0

Inputs are random ``uint8`` images and labels: the cost does not depend on the values. Writes
benchmarks/results/task_end_cost_<device>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import synapse  # noqa: E402
from synapse import named_batches  # noqa: E402
from synapse.experiments.models import create_model  # noqa: E402
from synapse.structure import EWC, MAS  # noqa: E402


class TutorialCNN(nn.Module):
    """The PyTorch MNIST example's network, narrowed (8 and 16 channels, 64 hidden units), ``forward(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 16, 3)
        self.dropout1, self.dropout2 = nn.Dropout(0.25), nn.Dropout(0.5)
        self.fc1, self.fc2 = nn.Linear(2304, 64), nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x.float() / 255)))), 2)
        x = self.dropout2(F.relu(self.fc1(self.dropout1(x).flatten(1))))
        return F.log_softmax(self.fc2(x), dim=1)


# name -> (model factory, optimizer factory, batch size, the name of forward's input)
SETTINGS: Dict[str, Tuple[Callable[[], nn.Module], Callable[[nn.Module], torch.optim.Optimizer], int, str]] = {
    "cnn": (TutorialCNN, lambda m: torch.optim.Adadelta(m.parameters(), lr=1.0), 64, "x"),
    "mlp": (
        lambda: create_model("mlp", 1, 28, 10, [0.2860], [0.3530]),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.03),
        10,
        "inputs",
    ),
}

METHODS: Dict[str, Callable[[nn.Module], synapse.Synapse]] = {
    "EWC": lambda m: EWC(m),
    "EWC (fisher='true')": lambda m: EWC(m, fisher="true"),
    "MAS": lambda m: MAS(m),
}


def measure(name: str, items: int, rounds: int, device: torch.device, seed: int = 0) -> Dict[str, Any]:
    """Median seconds of an epoch and of each method's task end, alternating, on model ``name``."""
    make_model, make_opt, batch, arg = SETTINGS[name]
    torch.manual_seed(seed)
    model = make_model().to(device)
    opt = make_opt(model)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (items, 1, 28, 28), generator=g, dtype=torch.uint8).to(device)
    y = torch.randint(0, 10, (items,), generator=g).to(device)
    loader = [(x[i : i + batch], y[i : i + batch]) for i in range(0, items, batch)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def epoch() -> None:
        model.train()
        for inputs, targets in loader:
            opt.zero_grad()
            F.nll_loss(F.log_softmax(model(inputs), 1), targets).backward()
            opt.step()

    methods = {label: make(model) for label, make in METHODS.items()}
    work: Dict[str, Callable[[], None]] = {"epoch": epoch}
    for label, method in methods.items():
        work[label] = lambda method=method: method.end_task(named_batches(loader, arg))
    times: Dict[str, List[float]] = {k: [] for k in work}
    for r in range(rounds + 1):  # round 0 warms up
        for k, fn in work.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r:
                times[k].append(time.perf_counter() - t0)
    epoch_s = statistics.median(times["epoch"])
    rows = [
        {"method": k, "median_s": statistics.median(t), "x_epoch": statistics.median(t) / epoch_s}
        for k, t in times.items()
        if k != "epoch"
    ]
    return {"model": name, "batch": batch, "items": items, "epoch_s": epoch_s, "rows": rows}


def table_lines(result: Dict[str, Any]) -> List[str]:
    lines = [
        f"{result['model']}, {result['items']} items, batch {result['batch']}: one epoch of training "
        f"{result['epoch_s']:.3f} s",
        "",
        "| task end                 | seconds | x epoch |",
        "|--------------------------|---------|---------|",
    ]
    lines += [f"| {r['method']:<24} | {r['median_s']:7.3f} | {r['x_epoch']:6.2f}x |" for r in result["rows"]]
    return lines


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--items", type=int, default=2000, help="items in the task")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (median), after one warm-up round")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", default=None, help="default: benchmarks/results/task_end_cost_<device>.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    results = [measure(name, args.items, args.rounds, device) for name in args.models]
    print(f"{device_name}, torch {torch.__version__}, median of {args.rounds} rounds\n")
    for result in results:
        print("\n".join(table_lines(result)) + "\n")
    path = args.json or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"task_end_cost_{device.type}.json"
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(
            {"device": str(device), "device_name": device_name, "torch": torch.__version__, "results": results},
            f,
            indent=2,
        )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
