"""Synapse's MAS beside Avalanche's ``MASPlugin`` (``avalanche/training/plugins/mas.py``).

Avalanche's plugin runs from a local checkout that the user fetched (never vendored:
``git clone https://github.com/ContinualAI/avalanche``), driven by a loop written here over the CLI
experiment's data, model, initial weights and batch order; the plugin sees the few attributes of an
Avalanche strategy it reads. Avalanche needs a few packages Synapse does not (``dill``, ``gputil``,
``gdown``, ``pytorchcv``, ``qpsolvers``, ``psutil``): install them in a separate environment, e.g.::

    python3 -m venv /path/to/venv_avalanche      # torch as Synapse's, or from a .pth to its site-packages
    /path/to/venv_avalanche/bin/pip install dill gputil gdown pytorchcv qpsolvers psutil
    PY="env PYTHONPATH=src /path/to/venv_avalanche/bin/python benchmarks/sidebyside_mas.py"
    $PY steps --reference ../avalanche --dataset fashion-mnist --seeds 0 --steps-per-task 50 \
        --check-samples 500 --synapse-args '{"accumulate": "sum"}' \
        --output benchmarks/results/sidebyside_mas_steps_seq_sum.json
    $PY steps --reference ../avalanche --dataset perm-fashion-mnist --seeds 0 --steps-per-task 10 \
        --check-samples 300 --max_train_per_task 10000 --synapse-args '{"accumulate": "sum"}' \
        --output benchmarks/results/sidebyside_mas_steps_perm_sum.json
    $PY accuracy --reference ../avalanche --dataset fashion-mnist --seeds 0 1 2 3 4 \
        --synapse-args '{"accumulate": "sum"}' --output benchmarks/results/sidebyside_mas_seq.json
    $PY accuracy --reference ../avalanche --dataset fashion-mnist --seeds 0 1 2 3 4 --which synapse \
        --synapse-args '{"accumulate": "average"}' --output benchmarks/results/sidebyside_mas_seq_average.json
    $PY accuracy --reference ../avalanche --dataset perm-fashion-mnist --seeds 0 1 2 --max_train_per_task 10000 \
        --which reference sgd --output benchmarks/results/sidebyside_mas_perm_ref.json   # and rot-, and
        # --which synapse with each accumulation (sidebyside_mas_{perm,rot}_{sum,average}.json)
    PYTHONPATH=src python benchmarks/sidebyside_mas.py render   # the section, from sidebyside_mas_*.json

``--reference-commit`` records the checkout's commit where it has no git metadata (a ``git archive``). The
committed files ran with the presets of their commit (``lr`` and ``mas_lambda``: 0.03 and 0.1 on Seq-F-MNIST,
0.2 and 0.1 on P-/R-F-MNIST), scored on the first 2000 test items of each task, one thread per run.

Modes:

- ``steps``: lockstep on Synapse's trajectory. Each of the first ``--steps-per-task`` steps of a task, the
  plugin's ``before_backward`` runs on a copy of Synapse's model before the step, twice: with Avalanche's
  own importance and anchor (estimated by its ``after_training_exp`` at every task end on Synapse's weights
  and the task's items in the order Synapse's ``end_task`` sees them), and with Synapse's importance and
  anchor loaded into it (the penalty's formula alone: its factor, its lambda). The gradients are compared
  with Synapse's. At each task end, on the task's first ``--check-samples`` items, one task's importance
  from Synapse's pass against Avalanche's ``_get_importance`` at batch size 1 (the per-sample estimate)
  and at the run's batch size (Avalanche's), and the accumulated importances, with what they mean for
  plain SGD: the penalty's step on a weight overshoots its anchor, and grows, once
  ``lr * lambda * Omega > 1`` (its gradient is ``2 lambda Omega (theta - theta*)``).
- ``accuracy``: whole runs per seed: Synapse's CLI experiment (``--synapse-args`` adds MAS options), the
  plugin driven over the same batches from the same initial weights, and fine-tuning (SGD), each
  evaluated by the experiment after every task. Raw per-seed results go to ``--output`` (JSON).
- ``render``: the markdown section from the committed raw results (also written to
  ``benchmarks/results/sidebyside_mas.md``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import glob
import json
import math
import os
import sys
import time
from types import SimpleNamespace
from typing import Any, Dict, Iterator, List, Optional, Tuple

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCHMARKS)

from _runner import config_for, load_results, mean_std, provenance, provenance_lines  # noqa: E402  (benchmarks/ is not a package)

RESULTS = os.path.join(BENCHMARKS, "results")
ALPHA = 0.5  # MASPlugin's default alpha (its running average's weight on the old importance)


def load_reference(path: str) -> Any:
    """Avalanche's ``MASPlugin`` from the checkout at ``path``."""
    sys.path.insert(0, os.path.abspath(path))
    from avalanche.training.plugins.mas import MASPlugin

    return MASPlugin


def hyperparameters(dataset: str, lr: Optional[float], mas_lambda: Optional[float]) -> Dict[str, Any]:
    """The reproduction's MAS preset for the dataset's protocol, with ``lr``/``mas_lambda`` overridden."""
    from synapse.experiments import presets

    hp = dict(presets.values("mas", presets.protocol_of(dataset), None))
    if lr is not None:
        hp["lr"] = lr
    if mas_lambda is not None:
        hp["mas_lambda"] = mas_lambda
    return hp


def experiment(args: argparse.Namespace, seed: int, hp: Dict[str, Any], training_type: str = "continual") -> Any:
    from synapse.experiments.run import Experiment

    limits = {"max_train_per_task": args.max_train_per_task, "max_test_per_task": args.max_test_per_task}
    cfg = config_for(args.dataset, "mas", None, seed, hp=hp, threads=1, **limits)
    if training_type != "continual":
        cfg = dataclasses.replace(cfg, training_type=training_type, method_args={})
    return Experiment(cfg)


class Driver:
    """The little of an Avalanche strategy that ``MASPlugin`` reads."""

    def __init__(self, model: Any, optimizer: Any, batch_size: int) -> None:
        import torch

        self.model, self.optimizer, self.train_mb_size = model, optimizer, batch_size
        self.device = torch.device("cpu")
        self.clock = SimpleNamespace(train_exp_counter=0)
        self.experience: Any = None
        self.loss: Any = None

    def step(self, plugin: Any, x: Any, y: Any) -> Any:
        """Avalanche's training iteration: criterion, the plugin's ``before_backward``, backward."""
        import torch.nn.functional as F

        self.model.train()
        self.optimizer.zero_grad()
        self.loss = F.cross_entropy(self.model(x), y)
        plugin.before_backward(self)
        self.loss.backward()
        return self.loss

    def data(self, x: Any, y: Any) -> None:
        """The experience's dataset: ``(x, y, task label)`` items, as Avalanche's datasets yield them."""
        import torch
        from torch.utils.data import TensorDataset

        self.experience = SimpleNamespace(dataset=TensorDataset(x, y, torch.zeros(len(y), dtype=torch.long)))

    def task_end(self, plugin: Any, x: Any, y: Any) -> None:
        self.data(x, y)
        plugin.after_training_exp(self)
        self.clock.train_exp_counter += 1  # Avalanche's clock is the strategy's last plugin


def train_batches(exp: Any, stage: int, x: Any, y: Any) -> Iterator[Tuple[Any, Any]]:
    """The stage's batches in the order ``Experiment.run`` draws them (one epoch)."""
    gather = exp._gather(stage, x, y)
    order = exp._new_order(len(y))
    b = exp.cfg.batch_size
    for s in range(0, len(order), b):
        idx = order[s : s + b]
        yield (x[idx], y[idx]) if gather is None else gather(idx)


def task_items(exp: Any, stage: int, x: Any, y: Any) -> Tuple[Any, Any]:
    """The task's items in the order Synapse's ``end_task`` sees them (transformed as the task is)."""
    import torch

    xs, ys = zip(*exp._task_batches(x, y, exp._gather(stage, x, y)))
    return torch.cat(xs), torch.cat(ys)


def names_of(model: Any) -> List[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def flat(tensors: Any) -> Any:
    import torch

    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def rel_diff(ours: Any, theirs: Any) -> float:
    scale = float(theirs.abs().max()) or 1.0
    return float((ours - theirs).abs().max()) / scale


def stability(omega: Any, hp: Dict[str, Any]) -> Dict[str, float]:
    """``lr * lambda * Omega``: above 1 the penalty's SGD step on that weight overshoots its anchor and grows."""
    k = hp["lr"] * hp["mas_lambda"] * omega
    return {
        "max_omega": float(omega.max()),
        "max_lr_lambda_omega": float(k.max()),
        "weights_above_1": int((k > 1).sum()),
    }


# -------------------------------------------------------------------------------------------------- steps
def steps(plugin_cls: Any, args: argparse.Namespace, seed: int, hp: Dict[str, Any]) -> Dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from synapse import named_batches
    from synapse.structure import MAS

    exp = experiment(args, seed, {**hp, **args.synapse_args})
    method, model, opt = exp.synapse, exp.model, exp.optimizer
    ref_exp = experiment(args, seed, hp, "sequential")
    same_init = all(torch.equal(p, q) for p, q in zip(model.parameters(), ref_exp.model.parameters()))
    names = names_of(model)
    ref_model = copy.deepcopy(model)
    driver = Driver(ref_model, torch.optim.SGD(ref_model.parameters(), lr=0.0), exp.cfg.batch_size)
    own = plugin_cls(lambda_reg=hp["mas_lambda"], alpha=args.alpha)  # Avalanche's importance, on our weights
    formula = plugin_cls(lambda_reg=hp["mas_lambda"], alpha=args.alpha)  # Synapse's importance loaded in
    rows: List[Dict[str, Any]] = []
    ends: List[Dict[str, Any]] = []
    first: Dict[str, Optional[Dict[str, Any]]] = {"avalanche": None, "formula": None}
    for t, (_, x, y) in enumerate(exp.stages()[: args.tasks]):
        for step, (xb, yb) in enumerate(train_batches(exp, t, x, y)):
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            method.backward(loss, yb, inputs=xb)
            if step < args.steps_per_task:
                ours = flat(p.grad for p in model.parameters())
                row: Dict[str, Any] = {"task": t, "step": step, "loss": float(loss.detach())}
                for key, plugin in (("avalanche", own), ("formula", formula)):
                    ref_model.load_state_dict(model.state_dict())
                    driver.step(plugin, xb, yb)
                    row[key] = rel_diff(ours, flat(p.grad for p in ref_model.parameters()))
                    if first[key] is None and row[key] > 1e-4:
                        first[key] = {"task": t, "step": step, "relative_grad_diff": row[key]}
                rows.append(row)
            opt.step()
        # The task end: one task's importance three ways on its first items, then both accumulations.
        tx, ty = task_items(exp, t, x, y)
        n = min(args.check_samples, len(ty))
        probe = MAS(copy.deepcopy(model), hp["mas_lambda"])
        probe.end_task(named_batches([(tx[:n], ty[:n])], "inputs"))
        synapse_one = flat(probe.importance)
        ref_model.load_state_dict(model.state_dict())
        driver.data(tx[:n], ty[:n])
        batched: Dict[int, Any] = {}
        for size in (1, exp.cfg.batch_size):
            driver.train_mb_size = size
            batched[size] = flat(own._get_importance(driver)[k].data for k in names)
        driver.train_mb_size = exp.cfg.batch_size
        method.end_task(named_batches(exp._task_batches(x, y, exp._gather(t, x, y)), "inputs"))
        driver.task_end(own, tx, ty)
        formula.importance = {k: v.clone() for k, v in zip(names, method.importance)}
        formula.params = {k: v.clone() for k, v in zip(names, method.anchor)}
        ours_acc, theirs_acc = flat(method.importance), flat(own.importance[k].data for k in names)
        ends.append(
            {
                "task": t,
                "samples_checked": n,
                "per_sample_rel_diff": rel_diff(synapse_one, batched[1]),
                "batched_over_per_sample_sum": float(batched[exp.cfg.batch_size].sum() / synapse_one.sum()),
                "accumulated_synapse": stability(ours_acc, hp),
                "accumulated_avalanche": stability(theirs_acc, hp),
            }
        )
        print(f"  task {t + 1}: {ends[-1]}", file=sys.stderr, flush=True)
    return {"same_initial_weights": same_init, "first_difference": first, "steps": rows, "task_ends": ends}


# ----------------------------------------------------------------------------------------------- accuracy
def outcome(exp: Any, matrix: Dict[str, List[List[float]]], finite: bool) -> Dict[str, Any]:
    cil = matrix["class_il"]
    result: Dict[str, Any] = {
        "final_class_il": 100.0 * sum(cil[-1]) / len(cil[-1]),
        "diagonal_class_il": [100.0 * r[i] for i, r in enumerate(cil)],
        "diverged": not finite,
    }
    if exp.task_il_applies:
        til = matrix["task_il"]
        result["final_task_il"] = 100.0 * sum(til[-1]) / len(til[-1])
    return result


def finite_model(model: Any) -> bool:
    import torch

    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def synapse_run(
    args: argparse.Namespace, seed: int, hp: Dict[str, Any], training_type: str = "continual"
) -> Dict[str, Any]:
    exp = experiment(args, seed, {**hp, **args.synapse_args} if training_type == "continual" else hp, training_type)
    results = exp.run()
    return outcome(exp, results["accuracy_matrix"], finite_model(exp.model))


def reference_run(plugin_cls: Any, args: argparse.Namespace, seed: int, hp: Dict[str, Any]) -> Dict[str, Any]:
    """Avalanche's plugin over the experiment's batches (the order its ``run`` draws), evaluated by it."""
    exp = experiment(args, seed, hp, "sequential")  # no method: the plugin is the continual part
    driver = Driver(exp.model, exp.optimizer, exp.cfg.batch_size)
    plugin = plugin_cls(lambda_reg=hp["mas_lambda"], alpha=args.alpha)
    matrix: Dict[str, List[List[float]]] = {"class_il": [], "task_il": []}
    for t, (_, x, y) in enumerate(exp.stages()):
        for xb, yb in train_batches(exp, t, x, y):
            driver.step(plugin, xb, yb)
            exp.optimizer.step()
        driver.task_end(plugin, *task_items(exp, t, x, y))
        cil, til, _ = exp.evaluate()
        matrix["class_il"].append(cil)
        matrix["task_il"].append(til)
    return outcome(exp, matrix, finite_model(exp.model))


# -------------------------------------------------------------------------------------------------- render
def accumulation(r: Dict[str, Any]) -> str:
    """The accumulation Synapse's MAS ran with in a results file: its options over the preset's."""
    return str({**r["hp"], **r["synapse_args"]}.get("accumulate", "sum"))


def _finite(values: Any) -> List[float]:
    """The finite values (a diverged run's last task ends are NaN)."""
    return [v for v in values if v is not None and math.isfinite(v)] or [math.nan]


def _side(runs: List[Dict[str, Any]], side: str, key: str) -> str:
    got = [r[side] for r in runs if side in r]
    values = [g[key] for g in got if key in g]
    if not values:
        return "-"
    diverged = sum(1 for g in got if g["diverged"] or (g["final_class_il"] <= 10.5 and key == "final_class_il"))
    text = mean_std(values, 2)
    return text + (f" ({diverged} of {len(got)} diverged)" if diverged and key == "final_class_il" else "")


def render(results_dir: str = RESULTS) -> str:
    """The markdown section for REPRODUCIBILITY-crosscheck.md / -sidebyside.md from the raw results."""
    loaded = load_results(sorted(glob.glob(os.path.join(results_dir, "sidebyside_mas_*.json"))))
    machine, versions = provenance_lines([r.get("provenance") for _, r in loaded])
    commits = sorted({r["reference_commit"] for _, r in loaded})
    lines = [
        "## MAS: Synapse against Avalanche's `MASPlugin`",
        "",
        "Generated by `benchmarks/sidebyside_mas.py render` from the raw results named below; do not edit by hand.",
        f"Reference: ContinualAI/avalanche `avalanche/training/plugins/mas.py` at commit {', '.join(commits)}",
        "(`unknown`: a checkout without git metadata, as a `git archive`, run without `--reference-commit`),",
        "driven by a loop over the CLI experiment's data, initial weights and batch order (see the script).",
        f"{machine}; {versions}.",
        "",
        "### Step by step",
        "",
        "Lockstep on Synapse's trajectory. Gradient differences are relative to the largest entry of the",
        "plugin's gradient: `avalanche` with the plugin's own importance (estimated at each task end on",
        "Synapse's weights), `formula` with Synapse's importance and anchor loaded into the plugin. Task ends:",
        "one task's importance on its first items, Synapse's pass against the plugin's at batch size 1",
        "(per-sample) and the ratio of the plugin's at the run's batch size to it; then the largest",
        "`lr * lambda * Omega` of the accumulated importances (above 1, plain SGD on the penalty overshoots).",
        "",
        "| data | Synapse accumulate | seed | steps | first step differing, avalanche | first, formula "
        "| per-sample importance diff (worst task) | batched / per-sample (tasks) "
        "| max lr·λ·Ω Synapse (tasks) | max lr·λ·Ω Avalanche (tasks) | raw |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def where(first: Optional[Dict[str, Any]], rows: List[Dict[str, Any]]) -> str:
        if first is None:
            return "none"
        losses = [x["loss"] for x in rows if (x["task"], x["step"]) == (first["task"], first["step"])]
        blown = losses and not (math.isfinite(losses[0]) and losses[0] < 1e3)
        late = f" (after the blow-up: loss {losses[0]:.0e})" if blown else ""
        return f"task {first['task'] + 1}, step {first['step'] + 1}{late}"

    for path, r in loaded:
        if r["mode"] != "steps":
            continue
        for seed, run in r["seeds"].items():
            ends = run["task_ends"]
            cells = [
                r["dataset"],
                accumulation(r),
                seed,
                len(run["steps"]),
                where(run["first_difference"]["avalanche"], run["steps"]),
                where(run["first_difference"]["formula"], run["steps"]),
                f"{max(_finite(e['per_sample_rel_diff'] for e in ends)):.1e}",
                " ".join(f"{e['batched_over_per_sample_sum']:.2f}" for e in ends),
                " ".join(f"{e['accumulated_synapse']['max_lr_lambda_omega']:.2g}" for e in ends),
                " ".join(f"{e['accumulated_avalanche']['max_lr_lambda_omega']:.2g}" for e in ends),
                f"`{path}`",
            ]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += [
        "",
        "### Accuracy",
        "",
        "Final average accuracy in %, mean ± std over seeds (Task-IL only where tasks have their own classes),",
        "each side over the same seeds' batches; the files of one configuration are read together. The count",
        "after a Class-IL cell: runs that ended at chance or with non-finite weights (diverged).",
        "",
        "| data | lr, λ | seeds | Synapse, sum | Synapse, average | Avalanche | SGD "
        "| Task-IL: Synapse, sum | Synapse, average | Avalanche | SGD | raw |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (dataset, lr, lam, limit, _), (sides, seeds, files) in accuracy_groups(loaded).items():
        names = {"sum": "synapse", "average": "synapse", "reference": "reference", "sgd": "sgd"}
        cells = [
            dataset + (f" ({limit} train items per task)" if limit else ""),
            f"{lr}, {lam}",
            " ".join(sorted(seeds, key=int)),
            *(_side(sides[k], names[k], "final_class_il") for k in sides),
            *(_side(sides[k], names[k], "final_task_il") for k in sides),
            " ".join(f"`{path}`" for path, _ in files),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *finding(loaded)]
    return "\n".join(lines)


def finding(loaded: List[Tuple[str, Dict[str, Any]]]) -> List[str]:
    """The step-level finding and what was done, its numbers read from the steps results."""
    ends = [e for _, r in loaded if r["mode"] == "steps" for run in r["seeds"].values() for e in run["task_ends"]]
    sums = [
        (r, run) for _, r in loaded if r["mode"] == "steps" and accumulation(r) == "sum" for run in r["seeds"].values()
    ]
    if not ends or not sums:
        return []
    per_sample = max(_finite(e["per_sample_rel_diff"] for e in ends))
    sane = [e for e in ends if e["accumulated_synapse"]["max_lr_lambda_omega"] < 10]  # not yet blown up
    ratios = _finite(e["batched_over_per_sample_sum"] for e in sane)
    crossed = [
        f"{r['dataset']} (lr {r['hp']['lr']}, λ {r['hp']['mas_lambda']}): task "
        + str(
            next((e["task"] + 1 for e in run["task_ends"] if e["accumulated_synapse"]["max_lr_lambda_omega"] > 1), "-")
        )
        for r, run in sums
    ]
    return [
        "**Finding.** One task's importance is the plugin's at batch size 1 to "
        f"{per_sample:.0e} (relative): the same squared L2 norm of the logits, the same mean over samples. The",
        "penalty's gradient with the same importance and anchor is the plugin's (`formula` column): the same λ,",
        "no ½. The first step that differs (second task, once the penalty acts) comes from the plugin's",
        "batched importance, the absolute value of each batch's mean gradient: "
        f"{min(ratios):.2f} to {max(ratios):.2f} of the per-sample one (task ends before a run blew up).",
        "The difference that matters is the accumulation: Synapse summed the tasks' importances (as the MAS",
        "authors' code does), Avalanche keeps a running average (alpha 0.5), so Synapse's largest lr·λ·Ω grows",
        "with every task and passes 1 (plain SGD then overshoots the anchor and diverges) at the task listed per",
        "run: " + "; ".join(crossed) + ".",
        "",
        "**Done.** `MAS(accumulate='average', alpha=0.5)` offers Avalanche's running average (the sum stays the",
        "default, as the paper's authors'). The Seq-MNIST preset uses it with λ chosen on a validation split",
        "(`benchmarks/results/tune_mas_average.json`); the P-MNIST and R-MNIST stand-ins take the same λ and",
        "the running average at their protocol's lr.",
    ]


Sides = Dict[str, List[Dict[str, Any]]]  # "sum", "average", "reference", "sgd": {side name: run} per seed


def accuracy_groups(
    loaded: List[Tuple[str, Dict[str, Any]]],
) -> Dict[Tuple[Any, ...], Tuple[Sides, List[str], List[Tuple[str, Dict[str, Any]]]]]:
    """The accuracy files' runs by configuration (dataset, lr, lambda, train items per task, Avalanche's
    alpha): the runs of each side, the seeds, and the files read together."""
    groups: Dict[Tuple[Any, ...], List[Tuple[str, Dict[str, Any]]]] = {}
    for path, r in loaded:
        if r["mode"] == "accuracy":
            key = (
                r["dataset"],
                r["hp"]["lr"],
                r["hp"]["mas_lambda"],
                r.get("max_train_per_task"),
                r["avalanche_alpha"],
            )
            groups.setdefault(key, []).append((path, r))
    out = {}
    for key, files in groups.items():
        sides: Sides = {"sum": [], "average": [], "reference": [], "sgd": []}
        seeds: List[str] = []
        for _, r in files:
            for seed, run in r["seeds"].items():
                seeds += [seed] if seed not in seeds else []
                if "synapse" in run:
                    sides[accumulation(r)].append({"synapse": run["synapse"]})
                for side in ("reference", "sgd"):
                    if side in run:
                        sides[side].append({side: run[side]})
        out[key] = (sides, seeds, files)
    return out


def run_diverged(run: Dict[str, Any]) -> bool:
    """Whether one side's run in an accuracy file diverged: non-finite weights, or a final Class-IL at chance
    (the rule of the accuracy table's counts)."""
    return bool(run["diverged"]) or run["final_class_il"] <= 10.5


# ---------------------------------------------------------------------------------------------------- main
def section(results_dir: str) -> str:
    """This script's section of REPRODUCIBILITY-sidebyside.md (``benchmarks/sidebyside.py render``)."""
    return render(results_dir)


def main(argv: Optional[List[str]] = None) -> None:
    import torch

    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("steps", "accuracy", "render"))
    p.add_argument("--reference", help="a local checkout of ContinualAI/avalanche (steps and accuracy)")
    p.add_argument("--reference-commit", help="the checkout's commit, when it is not a git work tree (an archive)")
    p.add_argument(
        "--dataset", default="fashion-mnist", choices=("fashion-mnist", "perm-fashion-mnist", "rot-fashion-mnist")
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--lr", type=float, default=None, help="default: the MAS preset's for the dataset's protocol")
    p.add_argument("--mas_lambda", type=float, default=None, help="default: the MAS preset's")
    p.add_argument("--alpha", type=float, default=ALPHA, help="MASPlugin's alpha")
    p.add_argument("--synapse-args", type=json.loads, default={}, help="extra MAS options for Synapse, JSON")
    p.add_argument("--max_train_per_task", type=int, default=None)
    p.add_argument("--max_test_per_task", type=int, default=2000)
    p.add_argument("--tasks", type=int, default=None, help="steps mode: the first this many tasks")
    p.add_argument("--steps-per-task", type=int, default=100, help="steps mode: lockstep steps per task")
    p.add_argument("--check-samples", type=int, default=2000, help="steps mode: items per task-end check")
    p.add_argument(
        "--which", nargs="+", choices=("synapse", "reference", "sgd"), default=["synapse", "reference", "sgd"]
    )
    p.add_argument("--output", help="JSON file for the raw results (default: stdout)")
    a = p.parse_args(argv)
    if a.mode == "render":
        text = render()
        with open(os.path.join(RESULTS, "sidebyside_mas.md"), "w") as f:
            f.write(text + "\n")
        print(text)
        return
    if not a.reference:
        p.error(f"{a.mode} needs --reference PATH (a local checkout of ContinualAI/avalanche)")
    plugin_cls = load_reference(a.reference)
    commit = (
        a.reference_commit or os.popen(f"git -C {a.reference} rev-parse HEAD 2>/dev/null").read().strip() or "unknown"
    )
    hp = hyperparameters(a.dataset, a.lr, a.mas_lambda)
    result: Dict[str, Any] = {
        "mode": a.mode,
        "reference": "ContinualAI/avalanche avalanche/training/plugins/mas.py",
        "reference_commit": commit,
        "dataset": a.dataset,
        "hp": hp,
        "avalanche_alpha": a.alpha,
        "synapse_args": a.synapse_args,
        "max_train_per_task": a.max_train_per_task,
        "max_test_per_task": a.max_test_per_task,
        "provenance": provenance(),
        "seeds": {},
    }
    for seed in a.seeds:
        t0 = time.time()
        if a.mode == "steps":
            result["seeds"][seed] = steps(plugin_cls, a, seed, hp)
        else:
            row: Dict[str, Any] = {}
            if "synapse" in a.which:
                row["synapse"] = synapse_run(a, seed, hp)
            if "reference" in a.which:
                row["reference"] = reference_run(plugin_cls, a, seed, hp)
            if "sgd" in a.which:
                row["sgd"] = synapse_run(a, seed, hp, "sequential")
            result["seeds"][seed] = row
            print(f"seed {seed}: {json.dumps(row)}", file=sys.stderr, flush=True)
        print(f"seed {seed}: {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    text = json.dumps(result, indent=1)  # a diverged run's NaN is written as NaN (Python's json reads it)
    if a.output:
        with open(a.output, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
