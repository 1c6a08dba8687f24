"""Synapse beside the authors' own code: X-DER against mammoth's ``models/xder_ce.py``.

``benchmarks/crosscheck.py`` compares Synapse with plain loops written here from the authors' description.
This script runs the authors' code itself, from a local checkout that the user fetched (never vendored:
``git clone https://github.com/aimagelab/mammoth``), on the data, model, initial weights and batch order of
the CLI's experiment. It needs mammoth's dependencies, so run it with a Python that has them, with Synapse's
sources on the path::

    PYTHONPATH=src /path/to/ref-venv/bin/python benchmarks/sidebyside.py steps --reference ../mammoth
    PYTHONPATH=src /path/to/ref-venv/bin/python benchmarks/sidebyside.py accuracy --reference ../mammoth \\
        --seeds 0 1 2 --buffer 500 --revision 2024 --output benchmarks/results/sidebyside_xder_b500.json
    PYTHONPATH=src python benchmarks/sidebyside.py render   # the page, from benchmarks/results/sidebyside_*.json

Modes:

- ``steps``: lockstep. Each step, mammoth's ``observe`` runs on a copy of the model and memory that Synapse
  had before the step, with the replay indices Synapse drew forced on mammoth's buffer; the two gradients
  are compared. At each task end mammoth's ``end_task`` runs on Synapse's memory and model, and the stored
  labels and logits are compared. The first step or task end that differs names the cause.
- ``heads``: Synapse's X-DER over the first four tasks, per revision; then, on the last task's first 2000
  items (not yet trained on), how far its classes' logits lie below the others': the state the last task
  starts from.
- ``gdumb``: Synapse's GDumb at the reproduction's preset, with the GDumb authors' MNIST retraining
  (``--gdumb paper``: 128 epochs, no CutMix, their optimizer) or the DER authors' port's (``--gdumb port``:
  256 epochs, CutMix with alpha 1; the preset's). Synapse only; the port itself runs in
  ``benchmarks/sidebyside_gdumb.py``.
- ``render``: ``REPRODUCIBILITY-sidebyside.md`` from the committed raw results (``--results``; no run).
- ``accuracy``: whole runs, per seed: Synapse's CLI experiment, and mammoth's ``XDerCe`` driven by a loop
  over the same batches (mammoth's ``end_task`` sees the task's items in the order Synapse's ``end_task``
  does). Raw per-seed results go to ``--output`` (JSON).

The values are mammoth's seq-cifar100 ``xder_ce`` configuration (lr 0.03, alpha 0.1, beta 0.5, margin 0.1,
eta 5e-3, replay minibatch 10); mammoth has none for seq-mnist.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from argparse import Namespace
from typing import Any, Dict, List, Optional, Tuple

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCHMARKS)

from _runner import ROOT, config_for, load_results, mean_std, provenance, provenance_lines  # noqa: E402  (benchmarks/ is not a package)

# mammoth's models/config/xder_ce.yaml (seq-cifar100, buffer 500), with its parser's gamma.
VALUES: Dict[str, Any] = {"lr": 0.03, "mb": 10, "alpha": 0.1, "beta": 0.5, "gamma": 0.85, "eta": 5e-3, "m": 0.1}


def values_for(name: str, buffer: int) -> Dict[str, Any]:
    """``'mammoth'``: :data:`VALUES`; ``'preset'``: the reproduction's seq-mnist row for ``buffer`` (its lr and
    minibatch, the catalog's defaults for the rest)."""
    if name == "mammoth":
        return dict(VALUES)
    from synapse import catalog
    from synapse.experiments import presets

    defaults = {k: v for k, v in catalog.get("xder").defaults().items() if k in VALUES}
    return {**defaults, **presets.values("xder", "seq-mnist", buffer)}


PER_TASK = 2  # Seq-F-MNIST: five tasks of two classes


def load_reference(path: str, module: str = "xder_ce", name: str = "XDerCe") -> Any:
    """mammoth's model class ``name`` (``models/<module>.py``) from the checkout at ``path``, built without
    its optimizer (the loop passes the experiment's)."""
    import importlib
    import types

    # mammoth's ``datasets`` package imports every dataset module on import, and some fetch CLIP weights
    # from the network; the model is given its dataset, so an empty stand-in package serves.
    stand_in = types.ModuleType("datasets")
    stand_in.get_dataset = lambda args: None  # type: ignore[attr-defined]
    stand_in.get_dataset_names = stand_in.get_dataset_config_names = lambda *a, **k: []  # type: ignore[attr-defined]
    sys.modules["datasets"] = stand_in
    here = os.getcwd()
    sys.path.insert(0, os.path.abspath(path))
    try:
        from models.utils.continual_model import ContinualModel

        cls = getattr(importlib.import_module(f"models.{module}"), name)
    finally:
        os.chdir(here)  # mammoth's models package changes the working directory to its checkout

    ContinualModel.get_optimizer = lambda self: None  # the experiment's optimizer is set after construction
    return cls


class TaskData:
    """The little of mammoth's ``ContinualDataset`` that ``xder_ce`` reads."""

    N_CLASSES, N_TASKS, N_CLASSES_PER_TASK, SETTING = 10, 5, PER_TASK, "class-il"

    def __init__(self) -> None:
        self.train_loader: List[Tuple[Any, Any, Any]] = []

    def get_offsets(self, task: int) -> Tuple[int, int]:
        return task * PER_TASK, (task + 1) * PER_TASK


def reference_model(cls: Any, exp: Any, buffer: int, values: Dict[str, Any]) -> Any:
    """mammoth's model on the experiment's network and optimizer."""
    import torch.nn.functional as F

    args = Namespace(
        buffer_size=buffer,
        minibatch_size=values["mb"],
        batch_size=exp.cfg.batch_size,
        alpha=values["alpha"],
        beta=values["beta"],
        gamma=values["gamma"],
        constr_eta=values["eta"],
        constr_margin=values["m"],
        align_bn=1,  # the config's; an MLP has no BatchNorm
        label_perc=1,
    )
    model = cls(exp.model, F.cross_entropy, args, None, dataset=TaskData())
    model.opt = exp.optimizer
    model.to("cpu")
    return model


def begin_task(model: Any, task: int) -> None:
    """What mammoth's ``meta_begin_task`` sets for ``xder_ce``: the task and its class offsets."""
    model._current_task = task
    model._n_past_classes, model._n_seen_classes = task * PER_TASK, (task + 1) * PER_TASK


def task_batches(exp: Any, x: Any, y: Any) -> List[Tuple[Any, Any, Any]]:
    """The task's items in the order Synapse's ``end_task`` sees them, as mammoth's loader yields them."""
    b = exp.cfg.batch_size
    return [(x[i : i + b], y[i : i + b], x[i : i + b]) for i in range(0, len(y), b)]


def experiment(seed: int, buffer: int, revision: str, continual: bool, values: Dict[str, Any]) -> Any:
    import dataclasses

    from synapse.experiments.run import Experiment

    hp = {**values, "revision": revision}
    cfg = config_for("fashion-mnist", "xder", buffer, seed, hp=hp, threads=1)
    if not continual:
        cfg = dataclasses.replace(cfg, training_type="sequential")
    return Experiment(cfg)


# ----------------------------------------------------------------------------------------------- accuracy
def synapse_run(seed: int, buffer: int, revision: str, values: Dict[str, Any]) -> Dict[str, Any]:
    return outcome(experiment(seed, buffer, revision, True, values).run()["accuracy_matrix"]["class_il"])


def reference_run(cls: Any, seed: int, buffer: int, values: Dict[str, Any]) -> Dict[str, Any]:
    """mammoth's ``XDerCe`` over the experiment's batches (the order its ``run`` draws), evaluated by it."""
    import numpy as np
    import torch

    exp = experiment(seed, buffer, "2022", False, values)  # no method attached: the revision plays no part
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = reference_model(cls, exp, buffer, values)
    matrix: List[List[float]] = []
    for t, (_, x, y) in enumerate(exp.stages()):
        begin_task(model, t)
        model.net.train()
        order = exp._new_order(len(y))
        b = exp.cfg.batch_size
        for s in range(0, len(order), b):
            idx = order[s : s + b]
            model.observe(x[idx], y[idx], x[idx])
        model.dataset.train_loader = task_batches(exp, x, y)
        model.end_task(model.dataset)
        matrix.append(exp.evaluate()[0])
    return outcome(matrix)


def outcome(matrix: List[List[float]]) -> Dict[str, Any]:
    return {
        "final": 100.0 * sum(matrix[-1]) / len(matrix[-1]),
        "diagonal": [100.0 * r[i] for i, r in enumerate(matrix)],
    }


# -------------------------------------------------------------------------------------------------- steps
def load_memory(model: Any, method: Any) -> None:
    """mammoth's buffer set to Synapse's memory, slot for slot."""
    import torch

    model.buffer.empty()
    n = len(method.buffer)
    if n == 0 or not method._has_past:  # mammoth's xder_ce keeps no memory during the first task
        return
    held = method.buffer.gather(torch.arange(n))
    labels = held["targets"].long()
    model.buffer.add_data(
        examples=held["input:inputs"].clone(),
        labels=labels,
        logits=held["logits"].float().clone(),
        task_labels=labels // PER_TASK,
    )


def force_indices(model: Any, queue: List[Any]) -> None:
    """mammoth's replay draws take the next indices from ``queue`` (Synapse's), while it has any."""
    draw = type(model.buffer).get_data.__get__(model.buffer)

    def forced(size: int, **kwargs: Any) -> Any:
        if queue:
            kwargs["force_indexes"] = queue.pop(0).numpy()
        return draw(size, **kwargs)

    model.buffer.get_data = forced


def steps(cls: Any, seed: int, buffer: int, revision: str, per_task: int, values: Dict[str, Any]) -> Dict[str, Any]:
    """Lockstep over the first ``per_task`` steps of each task (all of them at task ends' comparisons)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from synapse import named_batches

    exp = experiment(seed, buffer, revision, True, values)
    method, model, opt = exp.synapse, exp.model, exp.optimizer
    ref_exp = experiment(seed, buffer, revision, False, values)
    ref = reference_model(cls, ref_exp, buffer, values)
    ref.opt = torch.optim.SGD(ref.net.parameters(), lr=0.0)  # the gradient stays; the weights are copied in
    torch.manual_seed(seed)
    np.random.seed(seed)
    drawn: List[Any] = []
    sample = method.buffer.sample_indices

    def recorded(k: int, num_minibatches: int = 1) -> Any:
        idx = sample(k, num_minibatches)
        drawn.extend(idx.cpu())
        return idx

    method.buffer.sample_indices = recorded
    queue: List[Any] = []
    force_indices(ref, queue)
    rows: List[Dict[str, Any]] = []
    ends: List[Dict[str, Any]] = []
    first: Optional[Dict[str, Any]] = None
    for t, (_, x, y) in enumerate(exp.stages()):
        begin_task(ref, t)
        order = exp._new_order(len(y))
        b = exp.cfg.batch_size
        for step, s in enumerate(range(0, len(order), b)):
            idx = order[s : s + b]
            xb, yb = x[idx], y[idx]
            check = step < per_task
            if check:
                ref.net.load_state_dict(model.state_dict())
                load_memory(ref, method)
                ref.update_counter = method._update_count.clone().cpu()
                counts = method._update_count.clone()
                drawn.clear()
            opt.zero_grad()
            out = model(xb)
            method.backward(F.cross_entropy(out, yb), yb, inputs=xb)
            if check:
                queue[:] = list(drawn)
                replayed = bool(drawn)
                ref.observe(xb, yb, xb)
                ours = [p.grad for p in model.parameters()]
                theirs = [p.grad for p in ref.net.parameters()]
                scale = max(float(q.abs().max()) for q in theirs) or 1.0
                diff = max(float((p - q).abs().max()) for p, q in zip(ours, theirs)) / scale
                # Past items drawn for the first time this task are rewritten with probability 1 in both codes.
                fresh = ((counts == 0) & (method._update_count > 0)).nonzero().flatten()
                ours_z = method.buffer.gather(fresh)["logits"].float() if len(fresh) else None
                update = None if ours_z is None else float((ours_z - ref.buffer.logits[fresh].float()).abs().max())
                row = {"task": t, "step": step, "replay": replayed, "relative_grad_diff": diff, "update_diff": update}
                rows.append(row)
                if first is None and diff > 1e-4:
                    first = row
            opt.step()
        # The task end: mammoth's on Synapse's memory and model, then Synapse's; compare what is stored.
        ref.net.load_state_dict(model.state_dict())
        load_memory(ref, method)
        ref.dataset.train_loader = task_batches(exp, x, y)
        queue.clear()
        ref.end_task(ref.dataset)
        method.end_task(named_batches(exp._task_batches(x, y), "inputs"))
        n = len(method.buffer)
        held = method.buffer.gather(torch.arange(n))
        theirs_n = min(ref.buffer.num_seen_examples, ref.buffer.buffer_size)
        same_labels = n == theirs_n and bool((held["targets"].long() == ref.buffer.labels[:n].long()).all())
        logit_diff = (
            float((held["logits"].float() - ref.buffer.logits[:n].float()).abs().max()) if same_labels else None
        )
        ends.append({"task": t, "items": [n, theirs_n], "same_labels": same_labels, "max_logit_diff": logit_diff})
    return {"first_difference": first, "steps": rows, "task_ends": ends}


# -------------------------------------------------------------------------------------------------- heads
def future_heads(seed: int, buffer: int, revision: str, values: Dict[str, Any]) -> Dict[str, float]:
    """After the first four tasks: the last task's classes' logits against the others' on its items."""
    import torch
    import torch.nn.functional as F

    from synapse import named_batches

    exp = experiment(seed, buffer, revision, True, values)
    model, opt, method = exp.model, exp.optimizer, exp.synapse
    stages = exp.stages()
    b = exp.cfg.batch_size
    for _, x, y in stages[:-1]:  # as Experiment.run steps them
        order = exp._new_order(len(y))
        for s in range(0, len(order), b):
            idx = order[s : s + b]
            opt.zero_grad()
            method.backward(F.cross_entropy(model(x[idx]), y[idx]), y[idx], inputs=x[idx])
            opt.step()
        method.end_task(named_batches(exp._task_batches(x, y), "inputs"))
    with torch.no_grad():
        out = model(stages[-1][1][:2000])
    last = PER_TASK * (TaskData.N_TASKS - 1)
    return {
        "max_gap": float((out[:, last:].max(1).values - out[:, :last].max(1).values).mean()),
        "mean_last": float(out[:, last:].mean()),
        "mean_others": float(out[:, :last].mean()),
    }


# -------------------------------------------------------------------------------------------------- GDumb
# ``paper``: the GDumb authors' MNIST retraining, their optimizer included (drimpossible/GDumb ``src/opts.py``,
# GDumb's class defaults), whatever the preset says; ``port``: over the preset, which is the port's retraining.
GDUMB = {
    "paper": {
        "retrain_epochs": 128,
        "retrain_cutmix": 0.0,
        "retrain_momentum": 0.9,
        "retrain_weight_decay": 1e-6,
        "retrain_batch_size": 16,
        "retrain_clip_norm": 10.0,
    },
    "port": {"retrain_epochs": 256, "retrain_cutmix": 1.0},
}


def gdumb_run(seed: int, buffer: int, setting: str, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Synapse's GDumb at the preset with ``setting``'s retraining (and ``extra`` method values over it)."""
    from synapse.experiments import presets
    from synapse.experiments.run import Experiment

    hp = {**presets.values("gdumb", "seq-mnist", buffer), **GDUMB[setting], **(extra or {})}
    cfg = config_for("fashion-mnist", "gdumb", buffer, seed, hp=hp, threads=1)
    return outcome(Experiment(cfg).run()["accuracy_matrix"]["class_il"])


# -------------------------------------------------------------------------------------------------- render
RESULTS = os.path.join(BENCHMARKS, "results")


def render(files: List[str]) -> str:
    """The page from raw result files (steps and accuracy modes' JSON), in the order given; other scripts'
    files (``sidebyside_gdumb_ref_*``: their own sections) are left out."""
    loaded = [(p, r) for p, r in load_results(files) if r["mode"] in ("steps", "accuracy", "heads", "gdumb")]
    machine, versions = provenance_lines([r.get("provenance") for _, r in loaded])
    commits = sorted({r["reference_commit"] for _, r in loaded if "reference_commit" in r})
    lines = [
        "# Side by side: Synapse against the authors' own code",
        "",
        "Generated by `benchmarks/sidebyside.py render` from the raw results named below; do not edit by hand.",
        "The authors' code runs from a local checkout (never vendored) on the CLI experiment's data, model,",
        "initial weights and batch order; see that script's docstring.",
        "",
        f"- Reference: aimagelab/mammoth `models/xder_ce.py` at commit {', '.join(commits)}",
        f"- Values (`--values mammoth`): {json.dumps(VALUES)}, mammoth's seq-cifar100 `xder_ce` configuration;",
        "  `--values preset`: the reproduction's seq-mnist row (its lr and minibatch, the catalog's defaults).",
        f"- {machine}; one thread per run",
        f"- {versions}",
        "",
        "## X-DER (xder_ce) on Seq-F-MNIST, step by step",
        "",
        "Lockstep: each step, mammoth's `observe` on Synapse's model and memory before the step, with the replay",
        "indices Synapse drew; each task end, mammoth's `end_task` on Synapse's memory. The gradient difference",
        "is relative to the largest entry of mammoth's gradient. In-step rewrites: the stored logits of past items",
        "drawn for the first time in the task (rewritten with probability 1 in both codes) after the step.",
        "",
        "| Synapse revision | seed | steps compared | first step differing (> 1e-4) | worst gradient difference "
        "| in-step rewrites: largest stored-logit difference | task ends: largest stored-logit difference "
        "| raw results |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path, r in loaded:
        if r["mode"] != "steps":
            continue
        for seed, run in r["seeds"].items():
            first = run["first_difference"]
            where = "none" if first is None else f"task {first['task'] + 1}, step {first['step'] + 1}"
            worst = max(row["relative_grad_diff"] for row in run["steps"])
            ends = " ".join(
                "-" if e["max_logit_diff"] is None else f"{e['max_logit_diff']:.1e}" for e in run["task_ends"]
            )
            rewrites = [row["update_diff"] for row in run["steps"] if row.get("update_diff") is not None]
            rewrite = f"{max(rewrites):.1e} ({len(rewrites)} steps)" if rewrites else "-"
            cells = [r["synapse_revision"], seed, len(run["steps"]), where, f"{worst:.1e}", rewrite, ends, f"`{path}`"]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += [
        "",
        "## X-DER (xder_ce) on Seq-F-MNIST, accuracy",
        "",
        "Final Class-IL average and the last task's Class-IL accuracy right after it was trained, in %, mean ± std",
        "over seeds.",
        "",
        "| values | buffer | Synapse revision | seeds | Synapse final | mammoth final | Synapse last task "
        "| mammoth last task | raw results |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path, r in loaded:
        if r["mode"] != "accuracy":
            continue
        runs = list(r["seeds"].values())
        cells = []
        for key in ("final", "last"):
            for side in ("synapse", "reference"):
                got = [x[side]["final"] if key == "final" else x[side]["diagonal"][-1] for x in runs if side in x]
                cells.append(mean_std(got) if got else "-")
        row = [
            r.get("values_name", "mammoth"),
            str(r["buffer"]),
            r["synapse_revision"],
            " ".join(r["seeds"]),
            *cells,
            f"`{path}`",
        ]
        lines.append("| " + " | ".join(row) + " |")
    for path, r in loaded:
        if r["mode"] != "heads":
            continue
        lines += [
            "",
            "Where the last task starts: after the first four tasks, on the last task's first 2000 training items",
            "(not yet trained on), the mean over items of (largest logit of its classes - largest of the others),",
            "and the mean logits of its classes and of the others (seeds: " + " ".join(r["seeds"]) + f"; `{path}`):",
            "",
            "| Synapse revision | largest-logit gap | mean logit, last task's classes | mean logit, the others |",
            "|---|---|---|---|",
        ]
        for revision in ("2022", "2024"):
            runs = [x[revision] for x in r["seeds"].values()]
            cells = [mean_std([x[k] for x in runs]) for k in ("max_gap", "mean_last", "mean_others")]
            lines.append(f"| {revision} | " + " | ".join(cells) + " |")
    gdumb = [(path, r) for path, r in loaded if r["mode"] == "gdumb"]
    if gdumb:
        lines += [
            "",
            "## GDumb on Seq-F-MNIST: the DER authors' retraining (Synapse only)",
            "",
            "`paper`: the GDumb authors' MNIST retraining (128 epochs, no CutMix, SGD with momentum 0.9, weight",
            "decay 1e-6, minibatch 16, gradient norm clipped at 10); `port`: the DER authors' port's (256 epochs,",
            "CutMix with alpha 1 on half the batches, SGD with momentum 0, minibatch 64, no clipping: the preset).",
            "Class-IL, %, mean ± std over seeds; each file records the commit it ran at.",
            "",
            "| retraining | buffer | seeds | final | last task right after it | raw results |",
            "|---|---|---|---|---|---|",
        ]
        for path, r in gdumb:
            runs = [x["synapse"] for x in r["seeds"].values()]
            final, last = mean_std([x["final"] for x in runs]), mean_std([x["diagonal"][-1] for x in runs])
            lines.append(f"| {r['setting']} | {r['buffer']} | {' '.join(r['seeds'])} | {final} | {last} | `{path}` |")
    lines += [
        "",
        "Revision 2022 follows mammoth's `xder_ce` before commit b558503 (December 2024), 2024 the code from it;",
        "the differences are listed in docs/methods/rehearsal.md (X-DER in detail). A `-` is a side not run in "
        "that file.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- main
def write(text: str, path: Optional[str]) -> None:
    """The raw results to ``path``, or to stdout."""
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


def sibling_sections(results_dir: str) -> List[str]:
    """The sections of the sibling scripts (``benchmarks/sidebyside_<method>.py``, one per reference), each
    from its own ``section(results_dir)``, in name order: one page for every side-by-side run."""
    import glob
    import importlib

    sections = []
    for path in sorted(glob.glob(os.path.join(BENCHMARKS, "sidebyside_*.py"))):
        module = importlib.import_module(os.path.splitext(os.path.basename(path))[0])
        text = module.section(results_dir).strip()
        if text:
            sections.append(text + "\n")
    return sections


def main(argv: Optional[List[str]] = None) -> None:
    import torch

    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("steps", "accuracy", "heads", "gdumb", "render"))
    p.add_argument("--gdumb", choices=tuple(GDUMB), default="port", help="gdumb mode: the retraining")
    p.add_argument("--reference", help="a local checkout of aimagelab/mammoth (steps and accuracy)")
    p.add_argument("--results", nargs="+", help="render: raw result files (default: results/sidebyside_*.json)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--buffer", type=int, default=500)
    p.add_argument("--revision", choices=("2022", "2024"), default="2024", help="Synapse's X-DER revision")
    p.add_argument("--steps-per-task", type=int, default=100, help="steps mode: lockstep steps per task")
    p.add_argument(
        "--values",
        choices=("mammoth", "preset"),
        default="mammoth",
        help="mammoth's cifar-100 config, or the reproduction's seq-mnist preset",
    )
    p.add_argument("--which", choices=("both", "synapse", "reference"), default="both")
    p.add_argument("--output", help="JSON file for the raw results (default: stdout)")
    a = p.parse_args(argv)
    if a.mode == "render":
        import glob

        files = a.results or sorted(
            f for prefix in ("xder", "gdumb") for f in glob.glob(os.path.join(RESULTS, f"sidebyside_{prefix}_*.json"))
        )
        text = render(files) + "".join("\n" + section for section in sibling_sections(RESULTS))
        out = a.output or os.path.join(ROOT, "REPRODUCIBILITY-sidebyside.md")
        with open(out, "w") as f:
            f.write(text + "\n")
        print(f"written to {out}")
        return
    if a.mode == "heads":
        values = values_for(a.values, a.buffer)
        heads = {s: {rev: future_heads(s, a.buffer, rev, values) for rev in ("2022", "2024")} for s in a.seeds}
        text = json.dumps(
            {"mode": "heads", "buffer": a.buffer, "values": values, "provenance": provenance(), "seeds": heads},
            indent=1,
        )
        return write(text, a.output)
    if a.mode == "gdumb":
        runs = {seed: {"synapse": gdumb_run(seed, a.buffer, a.gdumb)} for seed in a.seeds}
        gdumb = {"mode": "gdumb", "setting": a.gdumb, "hp": GDUMB[a.gdumb], "buffer": a.buffer}
        text = json.dumps({**gdumb, "provenance": provenance(), "seeds": runs}, indent=1)
        return write(text, a.output)
    if not a.reference:
        p.error(f"{a.mode} needs --reference PATH (a local checkout of aimagelab/mammoth)")
    output = os.path.abspath(a.output) if a.output else None  # mammoth's import changes the directory
    cls = load_reference(a.reference)
    commit = os.popen(f"git -C {a.reference} rev-parse HEAD 2>/dev/null").read().strip() or "unknown"
    values = values_for(a.values, a.buffer)
    result: Dict[str, Any] = {
        "mode": a.mode,
        "reference": "aimagelab/mammoth models/xder_ce.py",
        "reference_commit": commit,
        "synapse_revision": a.revision,
        "buffer": a.buffer,
        "values_name": a.values,
        "values": values,
        "provenance": provenance(),
        "seeds": {},
    }
    for seed in a.seeds:
        t0 = time.time()
        if a.mode == "steps":
            result["seeds"][seed] = steps(cls, seed, a.buffer, a.revision, a.steps_per_task, values)
        else:
            row: Dict[str, Any] = {}
            if a.which in ("both", "synapse"):
                row["synapse"] = synapse_run(seed, a.buffer, a.revision, values)
            if a.which in ("both", "reference"):
                row["reference"] = reference_run(cls, seed, a.buffer, values)
            result["seeds"][seed] = row
        print(f"seed {seed}: {time.time() - t0:.0f}s", file=sys.stderr)
    if a.mode == "accuracy":
        for side in ("synapse", "reference"):
            finals = [r[side]["final"] for r in result["seeds"].values() if side in r]
            if finals:
                result[f"{side}_final"] = mean_std(finals)
    write(json.dumps(result, indent=1), output)


if __name__ == "__main__":
    main()
