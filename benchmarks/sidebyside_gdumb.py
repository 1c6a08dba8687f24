"""Synapse beside the authors' own code: GDumb on Seq-F-MNIST against mammoth's ``models/gdumb.py``.

``benchmarks/sidebyside.py gdumb --gdumb port`` runs Synapse's GDumb with the DER authors' port's retraining
(256 epochs, CutMix with alpha 1). This script runs the port itself, mammoth's ``GDumb``, from a local
checkout that the user fetched (never vendored: ``git clone https://github.com/aimagelab/mammoth``), loaded
as ``benchmarks/sidebyside.py`` loads ``xder_ce``. Run it with a Python that has mammoth's dependencies::

    PYTHONPATH=src /path/to/ref-venv/bin/python benchmarks/sidebyside_gdumb.py accuracy --reference ../mammoth \\
        --seeds 0 1 2 3 4 5 6 7 8 9 --buffer 500 --which both \\
        --output benchmarks/results/sidebyside_gdumb_ref_b500.json
    PYTHONPATH=src /path/to/ref-venv/bin/python benchmarks/sidebyside_gdumb.py accuracy --reference ../mammoth \\
        --seeds 0 1 2 3 4 5 6 7 8 9 --buffer 500 --which synapse --synapse port-optimizer \\
        --output benchmarks/results/sidebyside_gdumb_ref_portopt_b500.json
    PYTHONPATH=src python benchmarks/sidebyside_gdumb.py render   # the section, to stdout

Modes:

- ``accuracy``: per seed, mammoth's ``GDumb`` on a build of the CLI experiment (``fashion-mnist``, ``gdumb``,
  the seq-mnist preset) with no method attached: the same data, network and initial weights. It is fed the
  five tasks' batches in the order the experiment's own run draws them, as ``observe(inputs, labels,
  inputs)`` (its reservoir buffer; no augmentation), with torch's and numpy's global RNGs seeded with the
  seed (as mammoth's ``main.py`` does). After the last task its ``end_task`` retrains with the port's own
  defaults (:data:`PORT`; mammoth has no seq-mnist configuration for ``gdumb``). Scored by the experiment's
  evaluation: Class-IL after the last task. ``--which both`` also runs Synapse's side
  (``sidebyside.gdumb_run`` at the preset); ``--synapse port-optimizer`` gives Synapse the port's retraining
  optimizer and minibatch (:data:`PORT_OPTIMIZER`). Where no file holds Synapse's preset run, the section
  reads it from ``sidebyside_gdumb_port_b<buffer>.json`` (``sidebyside.py gdumb --gdumb port``).
- ``render``: the markdown section from the committed raw results.

Deviation from mammoth's run: the port's ``end_task`` builds a new backbone (``get_backbone``); here it gets
the experiment's network, still at its initial weights (``observe`` never trains it), so both sides start
the retraining from the same kind of untrained MLP (Synapse re-draws its weights with ``reset_parameters``).
"""

from __future__ import annotations

import argparse
import glob
import json
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
PATTERN = "sidebyside_gdumb_ref_*.json"
MODE = "gdumb-ref"  # not sidebyside.py's "gdumb": its page and the summary read sidebyside_gdumb_*.json by mode

# mammoth's GDumb parser defaults, and its seq-mnist batch size and optimizer defaults (utils/args.py).
PORT: Dict[str, Any] = {
    "maxlr": 0.05,
    "minlr": 5e-4,
    "fitting_epochs": 256,
    "cutmix_alpha": 1.0,
    "batch_size": 64,
    "optim_mom": 0.0,
    "optim_wd": 0.0,
    "optim_nesterov": 0,
}
# Synapse's GDumb with the port's retraining optimizer and minibatch in place of the GDumb authors' (the
# ``--synapse port-optimizer`` diagnosis: what is left of the gap is the memory and the initialisation).
PORT_OPTIMIZER: Dict[str, Any] = {"retrain_momentum": 0.0, "retrain_weight_decay": 0.0, "retrain_batch_size": 64}
SYNAPSE = {"preset": {}, "port-optimizer": PORT_OPTIMIZER}


def experiment(seed: int, buffer: int) -> Any:
    """The CLI experiment at the GDumb preset, with no method attached (``sequential``): data, net, order."""
    import dataclasses

    from _runner import config_for
    from synapse.experiments import presets
    from synapse.experiments.run import Experiment

    cfg = config_for("fashion-mnist", "gdumb", buffer, seed, hp=presets.values("gdumb", "seq-mnist", buffer), threads=1)
    return Experiment(dataclasses.replace(cfg, training_type="sequential"))


def reference_run(cls: Any, seed: int, buffer: int, port: Dict[str, Any]) -> Dict[str, Any]:
    """mammoth's ``GDumb`` over the experiment's batches; its last ``end_task`` retrains; scored after it."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from sidebyside import TaskData, begin_task

    exp = experiment(seed, buffer)
    torch.manual_seed(seed)
    np.random.seed(seed)
    args = Namespace(buffer_size=buffer, n_epochs=1, debug_mode=0, label_perc=1, **port)
    model = cls(exp.model, F.cross_entropy, args, None, dataset=TaskData())
    model.to("cpu")
    # The port's end_task builds a fresh backbone; it gets the experiment's untrained network instead.
    module: Any = sys.modules[cls.__module__]
    module.get_backbone = lambda _args: exp.model
    for t, (_, x, y) in enumerate(exp.stages()):
        begin_task(model, t)
        order = exp._new_order(len(y))
        b = exp.cfg.batch_size
        for s in range(0, len(order), b):
            idx = order[s : s + b]
            model.observe(x[idx], y[idx], x[idx])
        model.end_task(model.dataset)
    if model.net is not exp.model:
        raise RuntimeError("mammoth's GDumb did not retrain the experiment's network")
    labels = model.buffer.labels[: min(model.buffer.num_seen_examples, buffer)].long()
    cil = exp.evaluate()[0]
    return {
        "final": 100.0 * sum(cil) / len(cil),
        "per_task": [100.0 * a for a in cil],
        "buffer_per_class": torch.bincount(labels, minlength=TaskData.N_CLASSES).tolist(),
    }


# -------------------------------------------------------------------------------------------------- render
COLUMNS = (
    ("preset", "Synapse, preset"),
    ("port-optimizer", "Synapse, port's optimizer"),
    ("mammoth", "mammoth `GDumb`"),
)
Table = Dict[int, Dict[str, Dict[str, float]]]  # buffer -> column -> seed -> final Class-IL %


def table(files: List[str], results_dir: str) -> Tuple[Table, Dict[int, Dict[str, List[int]]], List[str]]:
    """Finals by buffer, column and seed; mammoth's buffer per class by buffer and seed; the files read
    (Synapse's preset finals come from ``sidebyside.py gdumb --gdumb port``'s file where a run has none)."""
    finals: Table = {}
    spread: Dict[int, Dict[str, List[int]]] = {}
    used: List[str] = []
    for path, r in load_results(files):
        if r.get("mode") != MODE:
            continue
        used.append(path)
        by = finals.setdefault(r["buffer"], {})
        for seed, row in r["seeds"].items():
            if "reference" in row:
                by.setdefault("mammoth", {})[seed] = row["reference"]["final"]
                spread.setdefault(r["buffer"], {})[seed] = row["reference"]["buffer_per_class"]
            if "synapse" in row:
                by.setdefault(r["synapse_values"], {})[seed] = row["synapse"]["final"]
    for buffer, by in finals.items():
        path = os.path.join(results_dir, f"sidebyside_gdumb_port_b{buffer}.json")
        if "preset" not in by and os.path.exists(path):
            [(name, r)] = load_results([path])
            by["preset"] = {seed: run["synapse"]["final"] for seed, run in r["seeds"].items()}
            used.append(name)
    return finals, spread, used


def render(files: List[str], results_dir: str = RESULTS) -> str:
    """The markdown section from raw result files (accuracy mode's JSON); empty without any."""
    loaded = [(p, r) for p, r in load_results(files) if r.get("mode") == MODE]
    if not loaded:
        return ""
    finals, spread, used = table(files, results_dir)
    machine, versions = provenance_lines([r.get("provenance") for _, r in loaded])
    commits = sorted({r["reference"]["commit"] for _, r in loaded})
    lines = [
        "## GDumb on Seq-F-MNIST: Synapse against mammoth's `GDumb` (the DER authors' port)",
        "",
        "Generated by `benchmarks/sidebyside_gdumb.py render` from the raw results named below; do not edit by",
        "hand. mammoth's `models/gdumb.py` runs from a local checkout (never vendored) on the CLI experiment's",
        "data, MLP, initial weights and batch order; its reservoir buffer fills from the stream and its last",
        "`end_task` retrains with the port's own defaults (mammoth has no seq-mnist values for `gdumb`). Synapse,",
        "preset: the seq-mnist preset (class-balanced memory; the port's 256 epochs, schedule and CutMix; the",
        "GDumb authors' SGD, momentum 0.9, weight decay 1e-6, minibatch 16). Synapse, port's optimizer: the same",
        f"with {json.dumps(PORT_OPTIMIZER)}, the port's. See the script's docstring.",
        "",
        f"- Reference: aimagelab/mammoth `models/gdumb.py` at commit {', '.join(commits)}",
        f"- mammoth's values: {json.dumps(loaded[0][1]['port'])}",
        f"- {machine}; one thread per run",
        f"- {versions}",
        "",
        "Final Class-IL accuracy after the last task, %, per seed, then mean ± std over seeds. mammoth's buffer:",
        "its items per class at the retraining (fewest-most).",
        "",
        "| buffer | seed | " + " | ".join(name for _, name in COLUMNS) + " | mammoth's buffer per class |",
        "|---|---|---|---|---|---|",
    ]
    means = []
    for buffer in sorted(finals):
        by = finals[buffer]
        seeds = sorted({s for col in by.values() for s in col}, key=int)
        for seed in seeds:
            cells = [f"{by[k][seed]:.2f}" if seed in by.get(k, {}) else "-" for k, _ in COLUMNS]
            counts = spread.get(buffer, {}).get(seed)
            cells.append(f"{min(counts)}-{max(counts)}" if counts else "-")
            lines.append(f"| {buffer} | {seed} | " + " | ".join(cells) + " |")
        cells = [mean_std(list(by[k].values()), 2) if by.get(k) else "-" for k, _ in COLUMNS]
        means.append(f"| {buffer} | {' '.join(seeds)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| buffer | seeds | " + " | ".join(name for _, name in COLUMNS) + " |",
        "|---|---|---|---|---|",
        *means,
        "",
        "Raw results: " + ", ".join(f"`{p}`" for p in used) + ".",
    ]
    return "\n".join(lines)


def section(results_dir: str) -> str:
    """This script's section of REPRODUCIBILITY-sidebyside.md (``benchmarks/sidebyside.py render``)."""
    return render(sorted(glob.glob(os.path.join(results_dir, PATTERN))), results_dir)


def summary(results_dir: str) -> Tuple[Dict[int, Dict[str, List[float]]], List[str]]:
    """For ``crosscheck_summary``: per buffer, each column's finals over the seeds mammoth has; the files."""
    finals, _, used = table(sorted(glob.glob(os.path.join(results_dir, PATTERN))), results_dir)
    out = {}
    for buffer, by in finals.items():
        seeds = sorted(by.get("mammoth", {}), key=int)
        out[buffer] = {k: [col[s] for s in seeds if s in col] for k, col in by.items()}
    return out, used


# ---------------------------------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> None:
    import torch

    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("accuracy", "render"))
    p.add_argument("--reference", help="a local checkout of aimagelab/mammoth")
    p.add_argument("--reference-commit", help="the checkout's commit, where it is not a git work tree")
    p.add_argument("--results", nargs="+", help=f"render: raw result files (default: results/{PATTERN})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--buffer", type=int, default=500)
    p.add_argument("--which", choices=("both", "reference", "synapse"), default="reference")
    p.add_argument("--synapse", choices=tuple(SYNAPSE), default="preset", help="Synapse's retraining values")
    p.add_argument("--output", help="JSON file for the raw results (default: stdout)")
    a = p.parse_args(argv)
    if a.mode == "render":
        from sidebyside import write

        # The page's section comes from ``sidebyside.py render``; this prints it, or writes it to --output.
        return write(render(a.results or sorted(glob.glob(os.path.join(RESULTS, PATTERN)))), a.output)
    if not a.reference:
        p.error("accuracy needs --reference PATH (a local checkout of aimagelab/mammoth)")
    if a.buffer <= 0:
        p.error(f"--buffer must be positive, got {a.buffer}")
    from sidebyside import gdumb_run, load_reference

    output = os.path.abspath(a.output) if a.output else None  # mammoth's import changes the directory
    cls = load_reference(a.reference, "gdumb", "GDumb")
    commit = a.reference_commit or os.popen(f"git -C {a.reference} rev-parse HEAD 2>/dev/null").read().strip()
    result: Dict[str, Any] = {
        "mode": MODE,
        "reference": {"code": "aimagelab/mammoth models/gdumb.py GDumb", "commit": commit or "unknown"},
        "buffer": a.buffer,
        "port": PORT,
        "synapse_values": a.synapse,
        "synapse_extra": SYNAPSE[a.synapse],
        "provenance": provenance(),
        "seeds": {},
    }
    for seed in a.seeds:
        t0 = time.time()
        row: Dict[str, Any] = {}
        if a.which != "synapse":
            row["reference"] = reference_run(cls, seed, a.buffer, PORT)
        if a.which != "reference":
            row["synapse"] = gdumb_run(seed, a.buffer, "port", SYNAPSE[a.synapse])
        result["seeds"][str(seed)] = row
        save(result, output, final=False)  # what is done so far survives a stop
        summary = ", ".join(f"{side} {x['final']:.2f}" for side, x in row.items())
        print(f"seed {seed}: {summary} ({time.time() - t0:.0f}s)", file=sys.stderr)
    save(result, output, final=True)


if __name__ == "__main__":
    main()
