"""Synapse beside the authors' own code: DER++ on the task-free stream against mammoth's ``models/derpp.py``.

``benchmarks/crosscheck.py derpp-360`` compares Synapse's DER++ on ``fashion-mnist-360`` with a plain loop
written from the authors' description. This script runs the authors' ``Derpp`` itself, from a local checkout
that the user fetched (never vendored: ``git clone https://github.com/aimagelab/mammoth``), loaded as
``benchmarks/sidebyside.py`` loads ``xder_ce``. Run it with a Python that has mammoth's dependencies (torch,
kornia), with Synapse's sources on the path::

    PYTHONPATH=src /path/to/ref-venv/bin/python benchmarks/sidebyside_derpp360.py steps \\
        --reference ../mammoth --seeds 1 --output benchmarks/results/sidebyside_derpp360_steps.json
    PYTHONPATH=src /path/to/ref-venv/bin/python benchmarks/sidebyside_derpp360.py accuracy \\
        --reference ../mammoth --seeds 0 1 2 --output benchmarks/results/sidebyside_derpp360.json
    PYTHONPATH=src python benchmarks/sidebyside_derpp360.py render   # benchmarks/results/sidebyside_derpp360.md

Modes:

- ``steps``: lockstep over the stream's first ``--steps`` steps. Before each, mammoth's model is set to
  Synapse's weights and its buffer to Synapse's memory, slot for slot; Synapse takes its step, and
  mammoth's ``observe`` the same one with its two replay draws forced to the indices Synapse drew (the
  logit-matching minibatch, then the cross-entropy one). The gradients are compared.
- ``accuracy``: per seed, the CLI's experiment (``fashion-mnist-360``, ``der++``, buffer 500, its preset:
  the authors' MNIST-360 values lr 0.2, replay minibatch 16, alpha 0.5, beta 1, batch 16), and beside it
  mammoth's ``Derpp`` on a second build of the same experiment with no method attached (the same initial
  weights, data and optimizer), fed the stream's batches in order as ``observe(inputs, labels, inputs)``
  (no augmentation), with its own buffer and numpy's global RNG seeded with the seed (as mammoth's
  ``main.py`` does). Both are scored once, after the stream, by the experiment's evaluation. Recorded per
  side: the final Class-IL accuracy, whether any training loss was not finite, how many classes the model
  predicts on the test set, and ``diverged`` (either of: a non-finite loss, one class predicted).
- ``render``: the markdown section from the committed raw results (``benchmarks/results/sidebyside_derpp360*.json``).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time
from argparse import Namespace
from typing import Any, Dict, List, Optional, Tuple

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCHMARKS)

from _runner import load_results, mean_std, provenance, provenance_lines  # noqa: E402  (benchmarks/ is not a package)
from sidebyside_mir import save  # noqa: E402

RESULTS = os.path.join(BENCHMARKS, "results")
PATTERN = "sidebyside_derpp360*.json"
SIDES = ("synapse", "reference")
NAMES = ("Synapse", "mammoth `Derpp`")


# ------------------------------------------------------------------------------------------------ reference
def reference_model(cls: Any, exp: Any, hp: Dict[str, Any]) -> Any:
    """mammoth's ``Derpp`` on the experiment's network and optimizer (``hp``: the method's resolved values
    and its replay minibatch ``mb``)."""
    import torch.nn.functional as F

    from sidebyside import TaskData

    args = Namespace(
        buffer_size=exp.cfg.buffer_size,
        minibatch_size=hp["mb"],
        batch_size=exp.cfg.batch_size,
        alpha=hp["alpha"],
        beta=hp["beta"],
        label_perc=1,
    )
    model = cls(exp.model, F.cross_entropy, args, None, dataset=TaskData())  # its class counts are never read
    model.opt = exp.optimizer
    model.to("cpu")
    return model


def predicted_classes(exp: Any) -> int:
    """How many distinct classes the experiment's model predicts over its test sets."""
    import torch

    model = exp.model
    model.eval()
    seen: set = set()
    with torch.no_grad():
        for x, _ in exp.test_sets:
            for s in range(0, len(x), 1000):
                seen.update(model(x[s : s + 1000]).argmax(1).tolist())
    return len(seen)


def outcome(exp: Any, matrix: List[List[float]], finite_loss: bool) -> Dict[str, Any]:
    """A side's record: final Class-IL %, whether every loss was finite, classes predicted, diverged."""
    from crosscheck import _outcome

    classes = predicted_classes(exp)
    return {
        **_outcome(matrix),
        "finite_loss": finite_loss,
        "predicted_classes": classes,
        "diverged": not finite_loss or classes <= 1,
    }


def synapse_run(seed: int) -> Dict[str, Any]:
    from crosscheck import DERPP_360, _experiment

    exp, _ = _experiment(*DERPP_360, seed, continual=True)
    result = exp.run()
    finite = all(math.isfinite(row["train_loss"]) for row in result["epoch_log"])
    return outcome(exp, result["accuracy_matrix"]["class_il"], finite)


def reference_run(cls: Any, seed: int) -> Dict[str, Any]:
    """mammoth's ``Derpp`` over the stream's batches, in the stream's order; scored by the experiment."""
    import numpy as np
    import torch

    from crosscheck import DERPP_360, _experiment

    exp, hp = _experiment(*DERPP_360, seed, continual=False)
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = reference_model(cls, exp, hp)
    model.net.train()
    _, x, y = exp.stages()[0]
    bounds = exp.stream.boundaries
    finite = True
    for b in range(len(bounds) - 1):
        xb, yb = x[bounds[b] : bounds[b + 1]], y[bounds[b] : bounds[b + 1]]
        finite = math.isfinite(model.observe(xb, yb, xb)) and finite
    cil, _, _ = exp.evaluate()
    return outcome(exp, [cil], finite)


# -------------------------------------------------------------------------------------------------- steps
def load_memory(model: Any, method: Any) -> None:
    """mammoth's buffer set to Synapse's memory, slot for slot (fewer items than its size: no reservoir draw)."""
    import torch

    model.buffer.empty()
    n = len(method.buffer)
    if n:
        held = method.buffer.gather(torch.arange(n))
        model.buffer.add_data(
            examples=held["input:inputs"].clone(), labels=held["targets"].long(), logits=held["logits"].float()
        )


def steps(cls: Any, seed: int, count: int) -> Dict[str, Any]:
    """Lockstep over the stream's first ``count`` steps: before each, mammoth's model and buffer are set to
    Synapse's, and its two replay draws take the indices Synapse drew; the gradients are compared."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from crosscheck import DERPP_360, _experiment
    from sidebyside import force_indices

    exp, hp = _experiment(*DERPP_360, seed, continual=True)
    method, model, opt = exp.synapse, exp.model, exp.optimizer
    ref_exp, _ = _experiment(*DERPP_360, seed, continual=False)
    ref = reference_model(cls, ref_exp, hp)
    ref.opt = torch.optim.SGD(ref.net.parameters(), lr=0.0)  # the gradient stays; the weights are copied in
    np.random.seed(seed)
    drawn: List[Any] = []
    draw = method.buffer._next_indices  # what Buffer.sample draws from (flat: minibatch after minibatch)

    def recorded(k: int, num_minibatches: int) -> Any:
        idx = draw(k, num_minibatches)
        drawn.extend(idx.view(num_minibatches, -1).cpu())
        return idx

    method.buffer._next_indices = recorded
    queue: List[Any] = []
    force_indices(ref, queue)  # mammoth draws the logit-matching minibatch first, then the CE one: as Synapse
    _, x, y = exp.stages()[0]
    bounds = exp.stream.boundaries
    rows: List[Dict[str, Any]] = []
    for b in range(min(count, len(bounds) - 1)):
        xb, yb = x[bounds[b] : bounds[b + 1]], y[bounds[b] : bounds[b + 1]]
        ref.net.load_state_dict(model.state_dict())
        load_memory(ref, method)
        drawn.clear()
        opt.zero_grad()
        out = model(xb)
        method.backward(F.cross_entropy(out, yb), yb, inputs=xb)
        queue[:] = list(drawn)
        ref.observe(xb, yb, xb)
        theirs = [p.grad for p in ref.net.parameters()]
        scale = max(float(g.abs().max()) for g in theirs) or 1.0
        diff = max(float((p.grad - g).abs().max()) for p, g in zip(model.parameters(), theirs)) / scale
        rows.append({"step": b, "replay": bool(drawn), "unused_forced": len(queue), "relative_grad_diff": diff})
        opt.step()
        if not torch.isfinite(out).all():
            break
    first = next((r for r in rows if r["relative_grad_diff"] > 1e-4 or r["unused_forced"]), None)
    return {"first_difference": first, "steps": rows}


# -------------------------------------------------------------------------------------------------- render
def merged(loaded: List[Tuple[str, Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """The accuracy files' runs by seed, every file's sides merged."""
    runs: Dict[str, Dict[str, Any]] = {}
    for _, r in loaded:
        if r["mode"] == "accuracy":
            for seed, row in r["seeds"].items():
                runs.setdefault(seed, {}).update(row)
    return dict(sorted(runs.items(), key=lambda kv: int(kv[0])))


def render(files: List[str]) -> str:
    """The markdown section from raw result files (steps and accuracy modes' JSON); empty without any."""
    loaded = load_results(files)
    if not loaded:
        return ""
    machine, versions = provenance_lines([r.get("provenance") for _, r in loaded])
    commits = sorted({r["reference_commit"] for _, r in loaded})
    lines = [
        "## DER++ on the task-free stream (fashion-mnist-360): Synapse against mammoth's `Derpp`",
        "",
        "Generated by `benchmarks/sidebyside_derpp360.py render` from the raw results named below; do not edit by",
        "hand. mammoth's `models/derpp.py` runs from a local checkout (never vendored) on the CLI experiment's",
        "stream, MLP, initial weights and optimizer, fed the stream's batches in order with no augmentation; see",
        "the script's docstring.",
        "",
        f"- Reference: aimagelab/mammoth `models/derpp.py` at commit {', '.join(commits)}",
        f"- Values (the preset: the authors' MNIST-360 row, buffer {loaded[0][1]['buffer']}): "
        + json.dumps(loaded[0][1]["values"]),
        f"- {machine}; one thread per run",
        f"- {versions}",
    ]
    for path, r in loaded:
        if r["mode"] != "steps":
            continue
        lines += [
            "",
            "### Step by step",
            "",
            "Before each step, mammoth's model and buffer are set to Synapse's (slot for slot) and its two replay",
            "draws take the indices Synapse drew; the gradient difference is relative to the largest entry of",
            "mammoth's gradient.",
            "",
            "| seed | steps compared | of them replaying | first step differing (> 1e-4) | worst gradient difference "
            "| raw results |",
            "|---|---|---|---|---|---|",
        ]
        for seed, run in r["seeds"].items():
            rows, first = run["steps"], run["first_difference"]
            where = "none" if first is None else f"step {first['step'] + 1}"
            worst = max(row["relative_grad_diff"] for row in rows)
            replaying = sum(row["replay"] for row in rows)
            lines.append(f"| {seed} | {len(rows)} | {replaying} | {where} | {worst:.1e} | `{path}` |")
    runs = merged(loaded)
    if runs:
        lines += [
            "",
            "### Accuracy",
            "",
            "Each side with its own buffer and RNG; both scored once, after the stream, by the experiment's",
            "evaluation. Final Class-IL accuracy, %. *Diverged*: a training loss that is not finite, or one class",
            "predicted on the whole test set; the mean without them is over the other seeds.",
            "",
            "| side | seeds | mean | mean without diverged | diverged |",
            "|---|---|---|---|---|",
        ]
        for side, name in zip(SIDES, NAMES):
            got = [row[side] for row in runs.values() if side in row]
            if got:
                ok = [x["final"] for x in got if not x["diverged"]]
                cells = [name, str(len(got)), mean_std([x["final"] for x in got], 2), mean_std(ok, 2) if ok else "-"]
                lines.append("| " + " | ".join(cells) + f" | {len(got) - len(ok)} of {len(got)} |")
        lines += [
            "",
            "Per seed (final Class-IL %; `*`: diverged; in brackets: classes predicted on the test set):",
            "",
            "| seed | " + " | ".join(NAMES) + " |",
            "|---|---|---|",
        ]
        for seed, row in runs.items():
            lines.append(f"| {seed} | " + " | ".join(seed_cell(row.get(side)) for side in SIDES) + " |")
    lines += ["", "Raw results: " + ", ".join(f"`{p}`" for p, _ in loaded) + "."]
    return "\n".join(lines)


def seed_cell(run: Optional[Dict[str, Any]]) -> str:
    if run is None:
        return "-"
    return f"{run['final']:.2f}{'*' if run['diverged'] else ''} ({run['predicted_classes']})"


def committed(results_dir: str) -> List[Tuple[str, Dict[str, Any]]]:
    """The raw result files of this script in ``results_dir``, loaded."""
    return load_results(sorted(glob.glob(os.path.join(results_dir, PATTERN))))


def stream_runs(results_dir: str) -> Tuple[List[int], Dict[str, List[Dict[str, Any]]], List[str]]:
    """The seeds with both sides committed (in order), each side's runs of them, and the files."""
    loaded = committed(results_dir)
    both = {int(seed): row for seed, row in merged(loaded).items() if all(side in row for side in SIDES)}
    files = [p for p, r in loaded if r["mode"] == "accuracy"]
    return list(both), {side: [row[side] for row in both.values()] for side in SIDES}, files


def lockstep_runs(results_dir: str) -> List[Tuple[str, str, Dict[str, Any]]]:
    """The committed lockstep runs: ``(file, seed, run)``."""
    return [
        (p, seed, run) for p, r in committed(results_dir) if r["mode"] == "steps" for seed, run in r["seeds"].items()
    ]


# ---------------------------------------------------------------------------------------------------- main
def section(results_dir: str) -> str:
    """This script's section of REPRODUCIBILITY-sidebyside.md (``benchmarks/sidebyside.py render``)."""
    return render(sorted(glob.glob(os.path.join(results_dir, PATTERN))))


def main(argv: Optional[List[str]] = None) -> None:
    import torch

    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("steps", "accuracy", "render"))
    p.add_argument("--reference", help="a local checkout of aimagelab/mammoth")
    p.add_argument("--reference-commit", help="the checkout's commit, where it is not a git work tree")
    p.add_argument("--results", nargs="+", help=f"render: raw result files (default: results/{PATTERN})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--which", choices=("both", *SIDES), default="both", help="accuracy: which sides run")
    p.add_argument("--steps", type=int, default=300, help="steps mode: lockstep steps from the stream's start")
    p.add_argument("--output", help="JSON file for the raw results (default: stdout)")
    a = p.parse_args(argv)
    if a.mode == "render":
        text = render(a.results or sorted(glob.glob(os.path.join(RESULTS, PATTERN))))
        out = a.output or os.path.join(RESULTS, "sidebyside_derpp360.md")
        with open(out, "w") as f:
            f.write(text + "\n")
        print(f"written to {out}")
        return
    if (a.mode == "steps" or a.which != "synapse") and not a.reference:
        p.error(f"{a.mode} needs --reference PATH (a local checkout of aimagelab/mammoth)")
    from crosscheck import DERPP_360, _experiment
    from sidebyside import load_reference

    output = os.path.abspath(a.output) if a.output else None  # mammoth's import changes the directory
    cls = load_reference(a.reference, "derpp", "Derpp") if a.reference else None
    commit = a.reference_commit or (
        os.popen(f"git -C {a.reference} rev-parse HEAD 2>/dev/null").read().strip() if a.reference else ""
    )
    exp, hp = _experiment(*DERPP_360, 0, continual=False)
    result: Dict[str, Any] = {
        "mode": a.mode,
        "reference": "aimagelab/mammoth models/derpp.py Derpp",
        "reference_commit": commit or "unknown",
        "dataset": DERPP_360[0],
        "buffer": DERPP_360[2],
        "values": {"lr": exp.cfg.lr, "batch_size": exp.cfg.batch_size, **{k: hp[k] for k in ("mb", "alpha", "beta")}},
        "provenance": provenance(),
        "seeds": {},
    }
    for seed in a.seeds:
        t0 = time.time()
        if a.mode == "steps":
            result["seeds"][str(seed)] = run = steps(cls, seed, a.steps)
            worst = max(r["relative_grad_diff"] for r in run["steps"])
            print(
                f"seed {seed}: {len(run['steps'])} steps, worst {worst:.1e} ({time.time() - t0:.0f}s)", file=sys.stderr
            )
            continue
        row: Dict[str, Any] = {}
        if a.which in ("both", "synapse"):
            row["synapse"] = synapse_run(seed)
        if a.which in ("both", "reference"):
            row["reference"] = reference_run(cls, seed)
        result["seeds"][str(seed)] = row
        save(result, output, final=False)  # what is done so far survives a stop
        summary = ", ".join(f"{side} {x['final']:.2f}{' diverged' if x['diverged'] else ''}" for side, x in row.items())
        print(f"seed {seed}: {summary} ({time.time() - t0:.0f}s)", file=sys.stderr)
    save(result, output, final=True)


if __name__ == "__main__":
    main()
