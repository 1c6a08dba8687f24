"""Synapse beside the authors' own code: MIR against ``optimass/Maximally_Interfered_Retrieval``.

The authors' ER-MIR is ``retrieve_replay_update`` in their ``mir.py`` with their ``buffer.py``; their
``er_main.py`` drives it over their own MNIST loaders. This script drives the same function, from a local
checkout that the user fetched (never vendored: ``git clone
https://github.com/optimass/Maximally_Interfered_Retrieval``), on the data, network, initial weights and
batch order of Synapse's CLI experiment (Seq-F-MNIST, the DER authors' MLP). The checkout needs no patch:
only ``mir.py``, ``buffer.py``, ``utils.py`` and ``VAE/`` are imported, and they run on torch 2.x as they
are. Run it with a Python that has torch and numpy, with Synapse's sources on the path::

    PYTHONPATH=src python benchmarks/sidebyside_mir.py steps --reference ../Maximally_Interfered_Retrieval \\
        --buffer 200 --seeds 0 --output benchmarks/results/sidebyside_mir_steps_b200.json
    PYTHONPATH=src python benchmarks/sidebyside_mir.py accuracy --reference ../Maximally_Interfered_Retrieval \\
        --buffer 200 --seeds 0 1 2 --output benchmarks/results/sidebyside_mir_b200.json
    PYTHONPATH=src python benchmarks/sidebyside_mir.py render   # benchmarks/results/sidebyside_mir.md

Modes:

- ``steps``: lockstep. Before each of the first ``--steps-per-task`` steps of every task, the authors'
  ``Buffer`` is loaded slot for slot with Synapse's memory and their model with Synapse's weights; Synapse's
  MIR (with the authors' rules: ``candidates='past_tasks'``, and ``compare_to_old_logits`` with
  ``--compare``) takes its step, and the authors' ``retrieve_replay_update`` then takes the same step with
  the candidates Synapse drew forced on their ``numpy.random.choice``. Compared: the virtual parameters,
  the candidates' scores, the replayed items and the gradient. The first step that differs names the cause.
- ``accuracy``: whole runs per seed, the arms of :data:`ARMS`: Synapse's MIR (its default rules, and the
  authors'), Synapse's ER at MIR's lr and minibatch, and the authors' MIR and ER (``--method mir_replay`` and
  ``rand_replay``, with and without ``--compare_to_old_logits``) driven by a loop over the experiment's
  batches. Raw per-seed results go to ``--output`` (JSON). ``--max-train-per-task 1000`` gives the authors'
  MNIST protocol (``--samples_per_task 1000`` in their ``Scripts/ER_experiments.sh``). A checkout the user
  patched (the committed diagnostic: their ``Buffer.sample`` returning memory slots, so that
  ``--compare_to_old_logits`` keeps its logits per item) is named with ``--reference-patch TEXT``; its arms
  render as their own rows.
- ``render``: the markdown section from the committed raw results (``benchmarks/results/sidebyside_mir_*.json``).

Values: the authors' Split-MNIST script (lr 0.1 for the model and the virtual step, 50 candidates, replay
minibatch 10, incoming batch 10, one pass), which are also Synapse's MIR preset on seq-mnist.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import glob
import io
import json
import math
import os
import sys
import time
from argparse import Namespace
from typing import Any, Dict, List, Optional, Tuple

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCHMARKS)

from _runner import config_for, load_results, mean_std, provenance, provenance_lines  # noqa: E402  (benchmarks/ is not a package)

RESULTS = os.path.join(BENCHMARKS, "results")
LR, MB, CANDIDATES = 0.1, 10, 50  # the authors' Split-MNIST values (Scripts/ER_experiments.sh)

# Each arm: (side, Synapse method or the authors' --method, options). The authors' MNIST script runs MIR
# with --compare_to_old_logits, its CIFAR-10 one without.
ARMS: Dict[str, Tuple[str, str, Dict[str, Any]]] = {
    "synapse-mir": ("synapse", "mir", {}),
    "synapse-mir-past": ("synapse", "mir", {"candidates": "past_tasks"}),
    "synapse-mir-authors": ("synapse", "mir", {"candidates": "past_tasks", "compare_to_old_logits": True}),
    "synapse-er": ("synapse", "er", {}),
    "reference-mir": ("reference", "mir_replay", {"compare_to_old_logits": False}),
    "reference-mir-old-logits": ("reference", "mir_replay", {"compare_to_old_logits": True}),
    "reference-er": ("reference", "rand_replay", {}),
}
LABELS = {
    "synapse-mir": "Synapse MIR (candidates from the whole memory)",
    "synapse-mir-past": "Synapse MIR, `candidates='past_tasks'`",
    "synapse-mir-authors": "Synapse MIR, `candidates='past_tasks'`, `compare_to_old_logits`",
    "synapse-er": "Synapse ER (lr 0.1, minibatch 10)",
    "reference-mir": "authors' MIR (`mir_replay`)",
    "reference-mir-old-logits": "authors' MIR (`mir_replay --compare_to_old_logits`)",
    "reference-er": "authors' ER (`rand_replay`)",
}


# ------------------------------------------------------------------------------------------------ reference
def load_reference(path: str) -> Tuple[Any, Any]:
    """The authors' ``mir`` and ``buffer`` modules from the checkout at ``path``. (Their ``utils`` seeds
    torch's global RNG on import: every run seeds it again afterwards.)"""
    sys.path.insert(0, os.path.abspath(path))
    import buffer as ref_buffer  # noqa: E402
    import mir as ref_mir  # noqa: E402

    return ref_mir, ref_buffer


def reference_args(method: str, buffer: int, input_size: List[int], compare: bool) -> Namespace:
    """The ``args`` their functions read, as ``er_main.py`` sets them for Split MNIST on the CPU."""
    return Namespace(
        method=method,
        lr=LR,
        subsample=CANDIDATES,
        buffer_batch_size=MB,
        compare_to_old_logits=compare,
        multiple_heads=False,
        cuda=False,
        device="cpu",
        gen=False,
        dataset="split_mnist",
        mem_size=buffer,  # er_main.py multiplies its per-class size by the classes: this is the total
        n_classes=10,
        input_size=input_size,
    )


def adapter(net: Any) -> Any:
    """The experiment's MLP (its input normalisation, then the DER authors' MLP) as the authors' code calls
    a classifier: ``return_hidden`` and ``linear``."""
    from torch import nn

    assert net.channels == 0 and net.size is None  # Fashion-MNIST: normalisation and MLP only

    class Adapter(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        @property
        def linear(self) -> nn.Module:
            return self.net.backbone[-1]

        def return_hidden(self, x: Any) -> Any:
            return self.net.backbone[:-1](self.net.normalize(x))

        def forward(self, x: Any) -> Any:
            return self.net(x)

    return Adapter(net)


def experiment(
    seed: int, buffer: int, method: str, options: Dict[str, Any], max_train: Optional[int], continual: bool = True
) -> Any:
    """The CLI's experiment for one arm; ``continual=False``: its data, network and batch order with no
    Synapse method attached (the authors' code trains it)."""
    import dataclasses

    from synapse.experiments.run import Experiment

    if method == "mir":
        hp = {"lr": LR, "mb": MB, "virtual_lr": LR, "buffer_candidates": CANDIDATES, **options}
    else:
        hp = {"lr": LR, "mb": MB, "alpha": 1.0, **options}
    cfg = config_for("fashion-mnist", method, buffer, seed, hp=hp, threads=1, max_train_per_task=max_train)
    if not continual:
        cfg = dataclasses.replace(cfg, training_type="sequential")
    return Experiment(cfg)


def outcome(matrix: List[List[float]]) -> Dict[str, Any]:
    return {
        "final": 100.0 * sum(matrix[-1]) / len(matrix[-1]),
        "diagonal": [100.0 * r[i] for i, r in enumerate(matrix)],
        "matrix": [[100.0 * v for v in row] for row in matrix],
    }


# ----------------------------------------------------------------------------------------------- accuracy
def synapse_run(seed: int, buffer: int, method: str, options: Dict[str, Any], max_train: Optional[int]) -> Any:
    return outcome(experiment(seed, buffer, method, options, max_train).run()["accuracy_matrix"]["class_il"])


def reference_run(
    ref: Tuple[Any, Any], seed: int, buffer: int, method: str, options: Dict[str, Any], max_train: Optional[int]
) -> Dict[str, Any]:
    """The authors' ``retrieve_replay_update`` and ``add_reservoir`` over the experiment's batches (the order
    its ``run`` draws), as ``er_main.py``'s loop calls them; evaluated by the experiment."""
    import numpy as np
    import torch

    ref_mir, ref_buffer = ref
    exp = experiment(seed, buffer, "er", {}, max_train, continual=False)
    np.random.seed(seed)  # er_main.py seeds numpy and torch with the run's index
    torch.manual_seed(seed)
    model = adapter(exp.model)
    stages = exp.stages()
    args = reference_args(method, buffer, list(stages[0][1].shape[1:]), bool(options.get("compare_to_old_logits")))
    memory = ref_buffer.Buffer(args)
    opt = exp.optimizer  # the experiment's SGD at lr 0.1 on the same parameters
    matrix: List[List[float]] = []
    for task, (_, x, y) in enumerate(stages):
        model.train()
        order = exp._new_order(len(y))
        b = exp.cfg.batch_size
        for s in range(0, len(order), b):
            idx = order[s : s + b]
            xb, yb = x[idx], y[idx]
            xb = xb.float()  # their memory holds floats (the same values: the network normalises either)
            ref_mir.retrieve_replay_update(args, model, opt, xb, yb, memory, task, None, rehearse=task > 0)
            memory.add_reservoir(xb, yb, None, task)
        matrix.append(exp.evaluate()[0])
    return outcome(matrix)


# -------------------------------------------------------------------------------------------------- steps
class Recorder:
    """What one step computed on each side: the virtual parameters, the candidates' losses and scores, the
    replayed rows and the gradient."""

    def __init__(self) -> None:
        self.values: Dict[str, Any] = {}


def loss_for(logit_target: float, width: int, label: int) -> Any:
    """Logits whose cross-entropy at ``label`` is ``logit_target`` (zero elsewhere): the authors' stored
    logits that stand for a remembered lowest loss ``L``: ``a = -log((e^L - 1) / (W - 1))`` at the label."""
    import torch

    z = torch.zeros(width)
    if logit_target < math.log(width):  # a loss that rounded to 0 stands for one below 1e-30
        z[label] = -math.log(max(math.expm1(logit_target), 1e-30) / (width - 1))
    return z


def steps(ref: Tuple[Any, Any], seed: int, buffer: int, per_task: int, compare: bool) -> Dict[str, Any]:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from synapse import named_batches
    from synapse.rehearsal import mir as syn_mir

    ref_mir, ref_buffer = ref
    options = {"candidates": "past_tasks", "compare_to_old_logits": compare}
    exp = experiment(seed, buffer, "mir", options, None)
    method, model, opt = exp.synapse, exp.model, exp.optimizer
    torch.manual_seed(seed)
    np.random.seed(seed)
    ours = Recorder()
    # Synapse's side, recorded: the candidates' slots, the virtual parameters, the scores, the choice.
    draw, run, most = method._draw_candidates, method._run, method._most_interfered
    scores_fn = syn_mir.interference_scores

    def drawn() -> Any:
        slots, valid = draw()
        ours.values["slots"], ours.values["valid"] = slots.clone(), None if valid is None else valid.clone()
        return slots, valid

    def ran(inputs: Any, parameters: Any, statistics: Any) -> Any:
        if parameters:
            ours.values["theta_v"] = [parameters[n].clone() for n, _ in model.named_parameters()]
        return run(inputs, parameters, statistics)

    def scored(before: Any, after: Any, targets: Any, lowest: Any = None) -> Any:
        out = scores_fn(before, after, targets, lowest)
        ours.values["scores"] = out.clone()
        return out

    def chosen(*a: Any) -> Any:
        out = most(*a)
        ours.values["chosen"] = out.clone()
        return out

    write = method.buffer.write

    def written(name: str, indices: Any, values: Any) -> None:  # the lowest losses kept, before any insertion
        ours.values["lowest"] = values.clone()
        write(name, indices, values)

    method._draw_candidates, method._run, method._most_interfered = drawn, ran, chosen
    method.buffer.write = written
    syn_mir.interference_scores = scored
    rows: List[Dict[str, Any]] = []
    first: Optional[Dict[str, Any]] = None
    stages = exp.stages()
    args = reference_args("mir_replay", buffer, list(stages[0][1].shape[1:]), compare)
    try:
        for t, (_, x, y) in enumerate(stages):
            order = exp._new_order(len(y))
            b = exp.cfg.batch_size
            for step, s in enumerate(range(0, len(order), b)):
                idx = order[s : s + b]
                xb, yb = x[idx], y[idx]
                check = t > 0 and step < per_task  # the first task replays nothing on either side
                if check:
                    net = copy.deepcopy(model)
                    held = method.buffer.stored()
                    held = {k: v.clone() for k, v in held.items()}
                    ours.values.clear()
                opt.zero_grad()
                method.backward(F.cross_entropy(model(xb), yb), yb, inputs=xb)
                if check:
                    row = compare_step(ref_mir, ref_buffer, args, net, held, ours.values, method, xb, yb, t, compare)
                    row.update(task=t, step=step)
                    rows.append(row)
                    if first is None and row["worst"] > 1e-4:
                        first = row
                opt.step()
            method.end_task(named_batches(exp._task_batches(x, y), "inputs"))
    finally:
        syn_mir.interference_scores = scores_fn
    return {"first_difference": first, "steps": rows}


def compare_step(
    ref_mir: Any,
    ref_buffer: Any,
    args: Namespace,
    net: Any,
    held: Dict[str, Any],
    ours: Dict[str, Any],
    method: Any,
    xb: Any,
    yb: Any,
    task: int,
    compare: bool,
) -> Dict[str, Any]:
    """The authors' step on Synapse's model and memory before the step, with Synapse's candidates forced."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    n = held["targets"].shape[0]
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its size
        memory = ref_buffer.Buffer(args)
    memory.bx[:n] = held["input:inputs"]
    memory.by[:n] = held["targets"].long()
    memory.bt[:n] = held["mir_task"]
    memory.current_index = memory.n_seen_so_far = n
    past = (held["mir_task"] != task).nonzero().flatten()  # their view: the slots of other tasks, in order
    position = {int(s): i for i, s in enumerate(past)}
    if compare:  # the lowest loss Synapse remembers, as the logits their code reads at the view's positions
        lowest = held["mir_lowest_loss"]
        for i, s in enumerate(past.tolist()):
            memory.logits[i] = loss_for(float(lowest[s]), 10, int(held["targets"][s]))
    slots = ours["slots"].tolist()
    forced = np.array([position[s] for s in slots], dtype=np.int64)
    theirs: Dict[str, Any] = {}
    future, cross_entropy = ref_mir.get_future_step_parameters, ref_mir.F.cross_entropy
    choice = np.random.choice
    ref_model = adapter(net)

    def recorded_future(*a: Any, **k: Any) -> Any:
        theirs["temp"] = future(*a, **k)
        return theirs["temp"]

    def recorded_ce(logits: Any, target: Any, *a: Any, **k: Any) -> Any:
        out = cross_entropy(logits, target, *a, **k)
        if k.get("reduction") == "none":
            theirs.setdefault("losses", []).append(out.clone())
        theirs["targets"] = target  # the last call's: the replayed labels
        return out

    def forced_choice(size: int, amt: int, replace: bool = True) -> Any:
        return forced

    replayed: List[Any] = []
    hook = ref_model.register_forward_pre_hook(lambda mod, inp: replayed.append(inp[0]))
    ref_mir.get_future_step_parameters, ref_mir.F.cross_entropy = recorded_future, recorded_ce
    np.random.choice = forced_choice
    try:
        opt = torch.optim.SGD(ref_model.parameters(), lr=0.0)  # the gradient stays; the weights are copied in
        ref_mir.retrieve_replay_update(args, ref_model, opt, xb, yb, memory, task, None, rehearse=True)
    finally:
        ref_mir.get_future_step_parameters, ref_mir.F.cross_entropy = future, cross_entropy
        np.random.choice = choice
        hook.remove()
    row: Dict[str, Any] = {}
    # The virtual parameters (their deep copy after the step against Synapse's theta_v).
    theta = [p.detach() for p in theirs["temp"].parameters()]
    row["theta_v"] = max(float((a - b).abs().max()) for a, b in zip(ours["theta_v"], theta))
    # The scores: post - pre, or post - min(pre, old) with --compare_to_old_logits.
    losses = theirs["losses"]  # the incoming batch's, the candidates' before and after, their stored logits'
    pre, post = losses[1], losses[2]
    score = post - (torch.minimum(pre, losses[3]) if compare else pre)
    row["scores"] = float((ours["scores"] - score).abs().max())
    # The replayed items, as multisets of (label, image): the memory may hold one image twice.
    cands, labels = held["input:inputs"][ours["slots"]].float(), held["targets"][ours["slots"]]  # theirs: floats
    mine = sorted((int(labels[i]), cands[i].numpy().tobytes()) for i in ours["chosen"].tolist())
    mem_x, mem_y = replayed[-1], theirs["targets"]  # their replay forward and cross-entropy are the last
    theirs_rows = sorted((int(y), r.numpy().tobytes()) for r, y in zip(mem_x, mem_y))
    row["same_replay"] = mine == theirs_rows
    grads = [p.grad for p in method.module.parameters()]
    ref_grads = [p.grad for p in ref_model.parameters()]
    scale = max(float(g.abs().max()) for g in ref_grads) or 1.0
    row["grad"] = max(float((a - b).abs().max()) for a, b in zip(grads, ref_grads)) / scale
    row["worst"] = max(row["theta_v"], row["scores"], row["grad"], 0.0 if row["same_replay"] else 1.0)
    if compare:  # the lowest loss each side keeps for the candidates after the step
        kept = ours["lowest"].clamp(max=math.log(memory.logits.shape[1]))  # as written, before the insertion
        written = F.cross_entropy(memory.logits[torch.from_numpy(forced)], memory.by[ours["slots"]], reduction="none")
        row["lowest"] = float((kept - written).abs().max())
        row["worst"] = max(row["worst"], row["lowest"])
    return row


# -------------------------------------------------------------------------------------------------- render
def render(files: List[str]) -> str:
    """The markdown section from raw result files (steps and accuracy modes' JSON), in the order given."""
    loaded = load_results(files)
    machine, versions = provenance_lines([r.get("provenance") for _, r in loaded])
    commits = sorted({r["reference_commit"] for _, r in loaded})
    lines = [
        "## MIR: Synapse against the authors' code",
        "",
        "Generated by `benchmarks/sidebyside_mir.py render` from the raw results named below; do not edit by hand.",
        "The authors' `retrieve_replay_update` (`mir.py`) and `Buffer` (`buffer.py`) run from a local checkout",
        "(never vendored) on the CLI experiment's Seq-F-MNIST data, MLP, initial weights and batch order; see the",
        "script's docstring. Values: the authors' Split-MNIST script (lr 0.1, virtual step at 0.1, 50 candidates,",
        "replay minibatch 10, batch 10, one pass).",
        "",
        f"- Reference: optimass/Maximally_Interfered_Retrieval at commit {', '.join(commits)}",
        f"- {machine}; one thread per run",
        f"- {versions}",
        "",
        "### Step by step",
        "",
        "Lockstep over the first steps of tasks 2 to 5 (task 1 replays nothing on either side): Synapse's MIR with",
        "the authors' rules (`candidates='past_tasks'`), the authors' step on Synapse's model and memory before the",
        "step with Synapse's candidates forced. Largest absolute differences; the gradient's relative to the",
        "largest entry of the authors'. With `compare_to_old_logits` the authors' stored logits are loaded so that",
        "their loss is the lowest loss Synapse remembers; the last column compares what each side keeps after.",
        "Replayed items may differ where the scores tie at the k-th place (candidates whose loss rounds to 0 in",
        "float32 before and after the virtual step): `topk` and the authors' `sort` break the tie differently,",
        "and such rows add no gradient, as the gradient column shows.",
        "",
        "| compare_to_old_logits | buffer | seed | steps | first step differing (> 1e-4) | virtual parameters "
        "| scores | same replayed items | gradient | lowest loss kept | raw results |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path, r in loaded:
        if r["mode"] != "steps":
            continue
        for seed, run in r["seeds"].items():
            rows, first = run["steps"], run["first_difference"]
            where = "none" if first is None else f"task {first['task'] + 1}, step {first['step'] + 1}"
            same = sum(row["same_replay"] for row in rows)
            lowest = [row["lowest"] for row in rows if "lowest" in row]
            cells = [
                "yes" if r.get("compare_to_old_logits") else "no",
                r["buffer"],
                seed,
                len(rows),
                where,
                f"{max(row['theta_v'] for row in rows):.1e}",
                f"{max(row['scores'] for row in rows):.1e}",
                f"{same} of {len(rows)}",
                f"{max(row['grad'] for row in rows):.1e}",
                f"{max(lowest):.1e}" if lowest else "-",
                f"`{path}`",
            ]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    groups = merged_accuracy(loaded)
    found = {arm for g in groups.values() for x in g["seeds"].values() for arm in x}
    arms = [arm for arm in ARMS if arm in found] + sorted(found - set(ARMS))
    lines += [
        "",
        "### Accuracy",
        "",
        "Final Class-IL accuracy (mean over the five tasks after the last), in %, mean ± std over seeds; the",
        "same seed gives every arm the same initial weights and batch order. *Full*: Seq-F-MNIST as the",
        "reproduction runs it (6,000 items per class); *1000 per task*: the authors' MNIST protocol",
        "(`--samples_per_task 1000`).",
        "",
        "| arm | " + " | ".join(f"{data}, buffer {buffer}" for data, buffer in groups) + " |",
        "|---|" + "---|" * len(groups),
    ]
    for arm in arms:
        cells = []
        for g in groups.values():
            got = [x[arm]["final"] for x in g["seeds"].values() if arm in x]
            cells.append(f"{mean_std(got)} ({len(got)})" if got else "-")
        lines.append(f"| {label(arm)} | " + " | ".join(cells) + " |")
    patches = sorted({arm.partition(" patched: ")[2] for arm in arms} - {""})
    lines += ["", "In parentheses: the number of seeds (each seed below)."]
    lines += [f"Local patch of the authors' checkout (arms marked so): {patch}." for patch in patches]
    lines += ["Raw results: " + ", ".join(f"`{p}`" for g in groups.values() for p in g["files"]) + "."]
    lines += [
        "",
        "Per seed (final Class-IL, %):",
        "",
        "| data | buffer | seed | " + " | ".join(label(a) for a in arms) + " |",
        "|---|---|---|" + "---|" * len(arms),
    ]
    for (data, buffer), g in groups.items():
        for seed in sorted(g["seeds"], key=int):
            x = g["seeds"][seed]
            cells = [f"{x[a]['final']:.2f}" if a in x else "-" for a in arms]
            lines.append(f"| {data} | {buffer} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def label(arm: str) -> str:
    """An arm's column heading; a patched checkout's arm: the arm's, and the patch."""
    base, _, patch = arm.partition(" patched: ")
    return LABELS[base] + (", logits per item (local patch)" if patch else "")


def merged_accuracy(loaded: List[Tuple[str, Dict[str, Any]]]) -> Dict[Tuple[str, int], Dict[str, Any]]:
    """The accuracy files' runs by (data, buffer): every file's arms and seeds merged, with the files named."""
    groups: Dict[Tuple[str, int], Dict[str, Any]] = {}
    for path, r in loaded:
        if r["mode"] != "accuracy":
            continue
        data = "full" if r.get("max_train_per_task") is None else f"{r['max_train_per_task']} per task"
        g = groups.setdefault((data, r["buffer"]), {"seeds": {}, "files": []})
        g["files"].append(path)
        patch = r.get("reference_patch")
        for seed, row in r["seeds"].items():
            if patch:  # a patched checkout's arms are other arms
                row = {f"{arm} patched: {patch}" if arm.startswith("reference") else arm: x for arm, x in row.items()}
            g["seeds"].setdefault(seed, {}).update(row)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0] != "full", kv[0][1])))


# ---------------------------------------------------------------------------------------------------- main
def section(results_dir: str) -> str:
    """This script's section of REPRODUCIBILITY-sidebyside.md (``benchmarks/sidebyside.py render``)."""
    return render(sorted(glob.glob(os.path.join(results_dir, "sidebyside_mir_*.json"))))


def main(argv: Optional[List[str]] = None) -> None:
    import torch

    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("steps", "accuracy", "render"))
    p.add_argument("--reference", help="a local checkout of optimass/Maximally_Interfered_Retrieval")
    p.add_argument("--results", nargs="+", help="render: raw result files (default: results/sidebyside_mir_*.json)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--buffer", type=int, default=200)
    p.add_argument("--arms", nargs="+", choices=tuple(ARMS), default=list(ARMS), help="accuracy: which runs")
    p.add_argument("--max-train-per-task", type=int, help="accuracy: items per task (the authors' MNIST: 1000)")
    p.add_argument("--steps-per-task", type=int, default=100, help="steps mode: lockstep steps per task")
    p.add_argument("--compare", action="store_true", help="steps mode: with compare_to_old_logits on both sides")
    p.add_argument(
        "--reference-patch",
        help="accuracy: what a locally patched checkout changes (recorded; its arms render as their own columns)",
    )
    p.add_argument("--output", help="JSON file for the raw results (default: stdout)")
    a = p.parse_args(argv)
    if a.mode == "render":
        import glob

        files = a.results or sorted(glob.glob(os.path.join(RESULTS, "sidebyside_mir_*.json")))
        text = render(files)
        out = a.output or os.path.join(RESULTS, "sidebyside_mir.md")
        with open(out, "w") as f:
            f.write(text + "\n")
        print(f"written to {out}")
        return
    needs_reference = a.mode == "steps" or any(ARMS[arm][0] == "reference" for arm in a.arms)
    if needs_reference and not a.reference:
        p.error(f"{a.mode} needs --reference PATH (a local checkout of optimass/Maximally_Interfered_Retrieval)")
    ref = load_reference(a.reference) if needs_reference else None
    commit = os.popen(f"git -C {a.reference} rev-parse HEAD 2>/dev/null").read().strip() if a.reference else ""
    result: Dict[str, Any] = {
        "mode": a.mode,
        "reference": "optimass/Maximally_Interfered_Retrieval mir.py retrieve_replay_update, buffer.py Buffer",
        "reference_commit": commit or "unknown",
        "buffer": a.buffer,
        "max_train_per_task": a.max_train_per_task,
        "reference_patch": a.reference_patch,
        "values": {"lr": LR, "virtual_lr": LR, "mb": MB, "buffer_candidates": CANDIDATES, "batch_size": 10},
        "provenance": provenance(),
        "seeds": {},
    }
    for seed in a.seeds:
        t0 = time.time()
        if a.mode == "steps":
            result["compare_to_old_logits"] = a.compare
            result["seeds"][seed] = steps(ref, seed, a.buffer, a.steps_per_task, a.compare)
        else:
            row: Dict[str, Any] = {}
            for arm in a.arms:
                side, method, options = ARMS[arm]
                if side == "synapse":
                    row[arm] = synapse_run(seed, a.buffer, method, options, a.max_train_per_task)
                else:
                    row[arm] = reference_run(ref, seed, a.buffer, method, options, a.max_train_per_task)
                print(f"seed {seed} {arm}: {row[arm]['final']:.2f} ({time.time() - t0:.0f}s)", file=sys.stderr)
                result["seeds"][seed] = row
                save(result, a.output, final=False)  # what is done so far survives a stop
        print(f"seed {seed}: {time.time() - t0:.0f}s", file=sys.stderr)
    save(result, a.output, final=True)


def save(result: Dict[str, Any], path: Optional[str], final: bool) -> None:
    """The raw results to ``path`` (rewritten as runs finish), or to stdout once at the end."""
    if path:
        with open(path, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
    elif final:
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
