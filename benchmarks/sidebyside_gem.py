"""Synapse's GEM beside the GEM authors' own code (``facebookresearch/GradientEpisodicMemory``, ``model/gem.py``)
on the P-MNIST protocol of the DER paper, run on Fashion-MNIST (``perm-fashion-mnist``).

The reference is a local checkout the user fetched (never vendored:
``git clone https://github.com/facebookresearch/GradientEpisodicMemory``). Its ``Net`` needs ``quadprog``, so
run this with a Python that has it, and Synapse's sources on the path::

    PYTHONPATH=src /path/to/ref-venv/bin/python benchmarks/sidebyside_gem.py run \\
        --reference ../GradientEpisodicMemory --seeds 0 1 2 --gamma 0.5 \\
        --output benchmarks/results/sidebyside_gem_g0.5.json
    PYTHONPATH=src python benchmarks/sidebyside_gem.py render   # a markdown section from the committed raw results

One run drives both in lockstep: the CLI's experiment (``Experiment``) trains Synapse's GEM as the
reproduction does, and every batch that reaches ``synapse.backward`` is handed, unchanged, to the authors'
``Net.observe`` on their own MLP, which starts from Synapse's initial weights (the same 784-100-100-10
layout). So both see the same batches in the same order under the same task permutations, with the same lr,
margin (``gamma`` is the authors' ``memory_strength``) and memory per task (``buffer // tasks``, the DER
authors' split). What differs is what each code does with them:

- the memory: the authors keep a ring buffer of each task's latest ``n_memories`` items; Synapse keeps a
  random sample of each task in a budget split evenly among the tasks seen so far;
- the QP: the authors solve it with quadprog in float64 on the host; Synapse on the device (exact up to 10
  constraints, FISTA beyond).

After each task both models are scored on every task's test items; the raw per-seed results carry each
task's accuracy right after it was trained, which is where the collapse shows, and the fraction of steps
whose gradient was projected, and the norms of the gradients before and after.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time
from argparse import Namespace
from typing import Any, Dict, List

import torch
from torch import Tensor, nn

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCHMARKS)

from _runner import ROOT, config_for, mean_std, provenance, provenance_lines  # noqa: E402  (benchmarks/ is not a package)

DATASET = "perm-fashion-mnist"


def _reference_net(reference: str, tasks: int, buffer: int, lr: float, gamma: float) -> Any:
    """The authors' ``Net`` for the MNIST MLP, with its own SGD optimiser."""
    sys.path.insert(0, os.path.abspath(reference))
    from model.gem import Net  # type: ignore[import-not-found]  (the reference checkout)

    args = Namespace(
        n_layers=2,
        n_hiddens=100,
        memory_strength=gamma,
        data_file="perm.pt",
        lr=lr,
        n_memories=buffer // tasks,
        cuda=False,
    )
    return Net(784, 10, tasks, args)


def _copy_weights(source: nn.Module, target: nn.Module) -> None:
    """Synapse's MLP (Flatten, then Linear/ReLU) into the authors' (Linear/ReLU): linear layers in order."""
    src = [m for m in source.modules() if isinstance(m, nn.Linear)]
    dst = [m for m in target.modules() if isinstance(m, nn.Linear)]
    assert [m.weight.shape for m in src] == [m.weight.shape for m in dst], "the two MLPs differ in shape"
    with torch.no_grad():
        for s, d in zip(src, dst):
            d.weight.copy_(s.weight)
            d.bias.copy_(s.bias)


@torch.no_grad()
def _accuracies(predict: Any, test_sets: List[Any]) -> List[float]:
    return [float((predict(x).argmax(1) == y).float().mean()) for x, y in test_sets]


def run_seed(reference: str, seed: int, buffer: int, gamma: float, lr: float, max_test: int) -> Dict[str, Any]:
    from synapse.experiments.run import Experiment

    torch.set_num_threads(1)
    cfg = config_for(
        DATASET, "gem", buffer, seed, hp={"lr": lr, "gamma": gamma, "mb": buffer}, max_test_per_task=max_test
    )
    exp = Experiment(cfg)
    method = exp.synapse
    assert method is not None
    tasks = len(exp.train_sets)
    net = _reference_net(reference, tasks, buffer, lr, gamma)
    _copy_weights(exp.model, net.net)
    task = [0]

    def scale(x: Tensor) -> Tensor:  # the experiment's uint8 -> [0, 1] step, which the authors' MLP lacks
        with torch.no_grad():
            return exp.model.normalize(x).reshape(len(x), -1)

    counts = {"synapse": [0, 0], "reference": [0, 0]}  # [steps projected, steps] after the first task
    shrink: Dict[str, List[float]] = {"synapse": [], "reference": []}  # ||g~|| / ||g|| per projected step
    accuracy: Dict[str, List[List[float]]] = {"synapse": [], "reference": []}
    plain_backward, plain_end_task = method.backward, method.end_task

    def backward(loss: Tensor, targets: Tensor, **inputs: Tensor) -> Any:
        # Synapse: the projection happens inside backward; the gradient before it is the loss's own.
        params = method.trainable_parameters()
        before = torch.autograd.grad(loss, params, retain_graph=True)
        out = plain_backward(loss, targets, **inputs)
        after = [p.grad for p in params]
        if task[0] > 0:
            g0 = float(torch.sqrt(sum((g**2).sum() for g in before)))
            g1 = float(torch.sqrt(sum((g**2).sum() for g in after)))
            projected = not all(torch.equal(a, b) for a, b in zip(before, after))
            counts["synapse"][0] += int(projected)
            counts["synapse"][1] += 1
            if projected:
                shrink["synapse"].append(g1 / max(g0, 1e-12))
        # The authors: observe() stores, projects and steps on its own model.
        (x,) = inputs.values()
        xr, yr = scale(x), targets.detach()
        g0r: List[Tensor] = []
        if task[0] > 0:
            net.zero_grad()
            nn.functional.cross_entropy(net(xr, task[0]), yr).backward()
            g0r = [p.grad.clone() for p in net.parameters()]
        step = net.opt.step
        seen: Dict[str, Any] = {}

        def spy() -> Any:
            seen["g1"] = [p.grad.clone() for p in net.parameters()]
            return step()

        net.opt.step = spy
        try:
            net.observe(xr, task[0], yr)
        finally:
            net.opt.step = step
        if task[0] > 0:
            # Forward and backward of a batch repeated: equal up to float noise unless projected.
            projected = not all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(g0r, seen["g1"]))
            counts["reference"][0] += int(projected)
            counts["reference"][1] += 1
            if projected:
                norm = lambda gs: float(torch.sqrt(sum((g**2).sum() for g in gs)))  # noqa: E731
                shrink["reference"].append(norm(seen["g1"]) / max(norm(g0r), 1e-12))
        return out

    def end_task(data: Any = None) -> Any:
        out = plain_end_task(data)
        exp.model.eval()
        net.eval()
        accuracy["synapse"].append(_accuracies(exp.model, exp.test_sets))
        accuracy["reference"].append(_accuracies(lambda x: net(scale(x), 0), exp.test_sets))
        exp.model.train()
        net.train()
        task[0] += 1
        return out

    method.backward, method.end_task = backward, end_task  # type: ignore[method-assign]
    start = time.perf_counter()
    results = exp.run()
    out: Dict[str, Any] = {
        "seed": seed,
        "buffer": buffer,
        "gamma": gamma,
        "lr": lr,
        "max_test_per_task": max_test,
        "wall_time_s": time.perf_counter() - start,
        "provenance": provenance(),
    }
    for name in ("synapse", "reference"):
        rows = accuracy[name]
        out[name] = {
            "final_average": statistics.mean(rows[-1]),
            "just_trained": [rows[t][t] for t in range(len(rows))],
            "final_row": rows[-1],
            "projected_fraction": counts[name][0] / max(counts[name][1], 1),
            "median_shrink": statistics.median(shrink[name]) if shrink[name] else None,
        }
    out["synapse"]["experiment_class_il"] = results["average_accuracy"]["class_il"]
    return out


def render(results_dir: str) -> str:
    files = sorted(glob.glob(os.path.join(results_dir, "sidebyside_gem_*.json")))
    if not files:
        return ""
    runs = [r for f in files for r in json.load(open(f))["runs"]]
    machine, versions = provenance_lines(r.get("provenance") for r in runs)
    lines = [
        "## GEM beside the GEM authors' code on P-MNIST (Fashion-MNIST)",
        "",
        "`benchmarks/sidebyside_gem.py`: Synapse's GEM through the experiment program and the authors' "
        "`model/gem.py` (`facebookresearch/GradientEpisodicMemory`) on the same batches, task permutations, "
        "initial weights, lr and margin; 20 tasks, buffer split 200 / 20 = 10 items per task for the "
        "authors' ring buffer. Final Class-IL (= Domain-IL) average over the tasks, mean ± std over seeds, "
        "and each task's accuracy right after training it (mean over seeds).",
        "",
        f"- {machine}",
        f"- {versions}",
        "",
        "| gamma (margin) | lr | code | seeds | final average (%) | just-trained accuracy, tasks 1-20 (%) "
        "| steps projected | median ‖g̃‖/‖g‖ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: Dict[Any, List[Dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["gamma"], r["lr"], r["buffer"]), []).append(r)
    for (gamma, lr, _buffer), rs in sorted(groups.items()):
        for name, label in (("synapse", "Synapse"), ("reference", "authors")):
            finals = [100 * r[name]["final_average"] for r in rs]
            trained = [
                statistics.mean(100 * r[name]["just_trained"][t] for r in rs)
                for t in range(len(rs[0][name]["just_trained"]))
            ]
            frac = statistics.mean(r[name]["projected_fraction"] for r in rs)
            shr = [r[name]["median_shrink"] for r in rs if r[name]["median_shrink"] is not None]
            lines.append(
                f"| {gamma:g} | {lr:g} | {label} | {', '.join(str(r['seed']) for r in rs)} | "
                f"{mean_std(finals, 2)} | {' '.join(f'{a:.0f}' for a in trained)} | "
                f"{100 * frac:.0f}% | {f'{statistics.median(shr):.2f}' if shr else 'n/a'} |"
            )
    lines += [
        "",
        "The margin `gamma` is the authors' `memory_strength`: a lower bound on every dual variable of the QP, so "
        "once any constraint is violated the update adds at least `gamma` times the gradient of every stored task "
        "(`median ‖g̃‖/‖g‖` above 1), a term that grows with the number of tasks. Compare the rows at `gamma` 0 "
        "and 0.5, which differ in nothing else, in both codes.",
    ]
    return "\n".join(lines) + "\n"


def section(results_dir: str) -> str:
    """This script's section of REPRODUCIBILITY-sidebyside.md (``benchmarks/sidebyside.py render``)."""
    return render(results_dir)


def main(argv: Any = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    run = sub.add_parser("run", help="both codes in lockstep, per seed")
    run.add_argument("--reference", required=True, help="a checkout of facebookresearch/GradientEpisodicMemory")
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--buffer", type=int, default=200)
    run.add_argument("--gamma", type=float, default=0.5)
    run.add_argument("--lr", type=float, default=0.1)
    run.add_argument("--max_test_per_task", type=int, default=2000)
    run.add_argument("--output", required=True)
    ren = sub.add_parser("render", help="the markdown section from the raw results")
    ren.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    if args.mode == "render":
        print(render(args.results))
        return
    runs = []
    for seed in args.seeds:
        r = run_seed(args.reference, seed, args.buffer, args.gamma, args.lr, args.max_test_per_task)
        print(
            json.dumps(
                {k: r[k] for k in ("seed", "wall_time_s")}
                | {
                    n: {k: r[n][k] for k in ("final_average", "projected_fraction", "median_shrink")}
                    for n in ("synapse", "reference")
                }
            ),
            flush=True,
        )
        runs.append(r)
        with open(args.output, "w") as f:
            json.dump({"command": " ".join(sys.argv), "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
