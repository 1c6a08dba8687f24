"""Synapse beside the authors' own code: GDumb on Seq-F-MNIST against mammoth's ``models/gdumb.py``.

The seq-mnist preset runs Synapse's GDumb with the DER authors' port's retraining (256 epochs, CutMix with
alpha 1, SGD with momentum 0, weight decay 0, minibatch 64, no clipping). This script runs the port itself,
mammoth's ``GDumb``, from a local checkout that the user fetched (never vendored: ``git clone
https://github.com/aimagelab/mammoth``), loaded as ``benchmarks/sidebyside.py`` loads ``xder_ce``. Run it
with a Python that has mammoth's dependencies (``R=--reference ../mammoth``)::

    PYTHONPATH=src /path/to/ref-venv/bin/python benchmarks/sidebyside_gdumb.py accuracy $R \\
        --seeds 0 1 2 3 4 5 6 7 8 9 --buffer 500 --which both \\
        --output benchmarks/results/sidebyside_gdumb_ref_b500.json
    PYTHONPATH=src /path/to/ref-venv/bin/python benchmarks/sidebyside_gdumb.py accuracy $R \\
        --seeds 0 1 2 3 4 5 6 7 8 9 --buffer 500 --which synapse --synapse gdumb-optimizer \\
        --output benchmarks/results/sidebyside_gdumb_ref_gdumbopt_b500.json
    PYTHONPATH=src /path/to/ref-venv/bin/python benchmarks/sidebyside_gdumb.py lockstep $R \\
        --seeds 0 1 2 3 4 --buffer 500 --output benchmarks/results/sidebyside_gdumb_lockstep_b500.json
    PYTHONPATH=src /path/to/ref-venv/bin/python benchmarks/sidebyside_gdumb.py memory $R \\
        --seeds 0 1 2 3 4 5 6 7 8 9 --buffer 500 \\
        --output benchmarks/results/sidebyside_gdumb_lockstep_memory_b500.json
    PYTHONPATH=src python benchmarks/sidebyside_gdumb.py render   # the section, to stdout

Modes:

- ``accuracy``: per seed, mammoth's ``GDumb`` on a build of the CLI experiment (``fashion-mnist``, ``gdumb``,
  the seq-mnist preset) with no method attached: the same data, network and initial weights. It is fed the
  five tasks' batches in the order the experiment's own run draws them, as ``observe(inputs, labels,
  inputs)`` (its reservoir buffer; no augmentation), with torch's and numpy's global RNGs seeded with the
  seed (as mammoth's ``main.py`` does). After the last task its ``end_task`` retrains with the port's own
  defaults (:data:`PORT`; mammoth has no seq-mnist configuration for ``gdumb``). Scored by the experiment's
  evaluation: Class-IL after the last task. ``--which both`` also runs Synapse's side
  (``sidebyside.gdumb_run`` at the preset); ``--synapse gdumb-optimizer`` gives Synapse the GDumb authors'
  retraining optimizer, minibatch and clipping (:func:`gdumb_optimizer`) instead of the port's.
- ``lockstep``: per seed, the stream fills both memories (Synapse's class-balanced one, the port's
  reservoir); then Synapse's ``retrain`` and the port's ``end_task`` (its ``fit_buffer``) each train the
  network from its initial weights on *Synapse's* memory (same items, labels and order), with Synapse's
  epoch orders and CutMix draws (coin, Beta, box centre, partner permutation) replayed into the port through
  stand-ins for the module attributes it draws from (``np.random``, ``torch.randperm`` in mammoth's
  ``utils.buffer`` and ``utils.augmentations``; its files are not edited). Per optimizer step (global
  optimizer hooks): the learning rate, the loss terms, the gradient's and the weights' norm and projection
  on a fixed random direction. Recorded: the first step at which any differs (relative tolerance 0, 1e-6,
  1e-3), the worst difference, the final weights' largest difference and both accuracies.
- ``memory``: per seed, the port's retraining (its own randomness, seeded alike before each fit) from the
  network's initial weights on Synapse's memory and on the port's own buffer, filled from the same stream:
  what the memory policy is worth with the retraining held fixed.
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
from math import inf
from typing import Any, Callable, Dict, List, Optional, Tuple

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
# The GDumb authors' retraining optimizer, minibatch and clipping, which the seq-mnist preset used before it
# took the port's: the ``--synapse gdumb-optimizer`` diagnosis (what the optimizer is worth beside the port's).
GDUMB_OPTIMIZER_NAMES = ("retrain_momentum", "retrain_weight_decay", "retrain_batch_size", "retrain_clip_norm")


def gdumb_optimizer() -> Dict[str, Any]:
    """The GDumb authors' values of :data:`GDUMB_OPTIMIZER_NAMES` (``sidebyside.GDUMB["paper"]``'s)."""
    from sidebyside import GDUMB

    return {k: GDUMB["paper"][k] for k in GDUMB_OPTIMIZER_NAMES}


SYNAPSE = ("preset", "gdumb-optimizer")


def synapse_values(name: str) -> Dict[str, Any]:
    """Synapse's method values over the preset for ``--synapse name``."""
    return gdumb_optimizer() if name == "gdumb-optimizer" else {}


def used_values(buffer: int, name: str) -> Dict[str, Any]:
    """Every method value Synapse's side runs with (the preset's, ``--synapse name``'s over them): recorded
    in the raw results, since the preset may change after them."""
    from sidebyside import GDUMB
    from synapse.experiments import presets

    return {**presets.values("gdumb", "seq-mnist", buffer), **GDUMB["port"], **synapse_values(name)}


def experiment(seed: int, buffer: int) -> Any:
    """The CLI experiment at the GDumb preset, with no method attached (``sequential``): data, net, order."""
    import dataclasses

    from _runner import config_for
    from synapse.experiments import presets
    from synapse.experiments.run import Experiment

    cfg = config_for("fashion-mnist", "gdumb", buffer, seed, hp=presets.values("gdumb", "seq-mnist", buffer), threads=1)
    return Experiment(dataclasses.replace(cfg, training_type="sequential"))


def port_model(cls: Any, exp: Any, seed: int, buffer: int, port: Dict[str, Any]) -> Any:
    """mammoth's ``GDumb`` on the experiment's network, torch's and numpy's global RNGs seeded with ``seed``
    first (as mammoth's ``main.py`` does; its reservoir draws from numpy's)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from sidebyside import TaskData

    torch.manual_seed(seed)
    np.random.seed(seed)
    args = Namespace(buffer_size=buffer, n_epochs=1, debug_mode=0, label_perc=1, **port)
    model = cls(exp.model, F.cross_entropy, args, None, dataset=TaskData())
    model.to("cpu")
    return model


def feed(exp: Any, model: Any, retrain: bool, store: Optional[Callable[[Any, Any], None]] = None) -> None:
    """The experiment's five tasks, batch by batch in the order its own run draws them, into mammoth's
    ``model`` as ``observe(inputs, labels, inputs)``, and into ``store(inputs, labels)`` beside it;
    ``retrain``: the port's ``end_task`` after each task (it retrains after the last)."""
    from sidebyside import begin_task

    for t, (_, x, y) in enumerate(exp.stages()):
        begin_task(model, t)
        order = exp._new_order(len(y))
        b = exp.cfg.batch_size
        for s in range(0, len(order), b):
            idx = order[s : s + b]
            model.observe(x[idx], y[idx], x[idx])
            if store is not None:
                store(x[idx], y[idx])
        if retrain:
            model.end_task(model.dataset)


def reference_run(cls: Any, seed: int, buffer: int, port: Dict[str, Any]) -> Dict[str, Any]:
    """mammoth's ``GDumb`` over the experiment's batches; its last ``end_task`` retrains; scored after it."""
    import torch

    from sidebyside import TaskData

    exp = experiment(seed, buffer)
    model = port_model(cls, exp, seed, buffer, port)
    # The port's end_task builds a fresh backbone; it gets the experiment's untrained network instead.
    module: Any = sys.modules[cls.__module__]
    module.get_backbone = lambda _args: exp.model
    feed(exp, model, retrain=True)
    if model.net is not exp.model:
        raise RuntimeError("mammoth's GDumb did not retrain the experiment's network")
    labels = model.buffer.labels[: min(model.buffer.num_seen_examples, buffer)].long()
    cil = exp.evaluate()[0]
    return {
        "final": 100.0 * sum(cil) / len(cil),
        "per_task": [100.0 * a for a in cil],
        "buffer_per_class": torch.bincount(labels, minlength=TaskData.N_CLASSES).tolist(),
    }


# ------------------------------------------------------------------------------------------------ lockstep
class Shim:
    """A module seen through ``overrides``: every other attribute is the module's own (so a reference's
    ``np.random.choice`` can be forced while its ``np.clip`` stays numpy's)."""

    def __init__(self, base: Any, **overrides: Any) -> None:
        self._base = base
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


class Draws:
    """The retraining's random draws, recorded from Synapse's run and replayed into the port's: each epoch's
    order, and per batch CutMix's coin, its Beta draw, the box centre (height, then width) and its partner
    permutation. Both codes draw the same kinds in the same roles (``cutmix`` and mammoth's ``cutmix_data``)."""

    KINDS = ("epoch", "coin", "beta", "centre", "perm")

    def __init__(self) -> None:
        self.queues: Dict[str, List[Any]] = {k: [] for k in self.KINDS}

    def put(self, kind: str, value: Any) -> Any:
        self.queues[kind].append(value)
        return value

    def take(self, kind: str) -> Any:
        if not self.queues[kind]:
            raise RuntimeError(f"the port drew more {kind} values than Synapse's retraining did")
        return self.queues[kind].pop(0)

    def left(self) -> Dict[str, int]:
        return {k: len(q) for k, q in self.queues.items() if q}


class _RecordingRng:
    """numpy's Generator, recording the draws Synapse's ``cutmix`` makes."""

    def __init__(self, rng: Any, draws: Draws) -> None:
        self.rng, self.draws = rng, draws

    def random(self) -> float:
        return self.draws.put("coin", self.rng.random())

    def beta(self, a: float, b: float) -> float:
        return self.draws.put("beta", self.rng.beta(a, b))

    def integers(self, high: int) -> int:
        return self.draws.put("centre", self.rng.integers(high))


class StepLog:
    """Per optimizer step (global step hooks, so neither code is touched): the learning rate, the gradient
    the step applies (norm, and its dot with a fixed random probe: a fingerprint), the weights after the
    step (likewise) and the cross-entropy terms of the step's loss."""

    def __init__(self, params: List[Any], seed: int = 0) -> None:
        import torch

        gen = torch.Generator().manual_seed(seed)
        self.probe = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        self.steps: List[Dict[str, Any]] = []
        self.terms: List[float] = []

    def loss(self, fn: Any) -> Any:
        """``fn`` (a cross-entropy) recording each value it returns into the next step's terms."""

        def recorded(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            self.terms.append(float(out.detach()))
            return out

        return recorded

    def _stats(self, tensors: List[Any]) -> Tuple[float, float]:
        norm = sum(float(t.double().pow(2).sum()) for t in tensors) ** 0.5
        return norm, sum(float((t.double() * q).sum()) for t, q in zip(tensors, self.probe))

    def pre(self, optimizer: Any, *_: Any) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norm, dot = self._stats([p.grad for p in params])
        self.steps.append({"lr": optimizer.param_groups[0]["lr"], "grad_norm": norm, "grad_probe": dot})
        self.steps[-1]["loss_terms"], self.terms = self.terms, []

    def post(self, optimizer: Any, *_: Any) -> None:
        norm, dot = self._stats([p for g in optimizer.param_groups for p in g["params"]])
        self.steps[-1].update(weight_norm=norm, weight_probe=dot)

    def __enter__(self) -> StepLog:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._handles = [register_optimizer_step_pre_hook(self.pre), register_optimizer_step_post_hook(self.post)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()


def stream(seed: int, buffer: int, extra: Dict[str, Any], cls: Any) -> Tuple[Any, Any, Dict[str, Any]]:
    """Per seed, the CLI experiment with Synapse's GDumb at the preset (``extra`` over it) and mammoth's
    ``GDumb`` beside it, both fed the experiment's stream batch by batch, learning nothing from it (the
    experiment's own loop is not run: no task-end retraining). Returns the experiment (its ``synapse`` holds
    Synapse's memory), mammoth's model (its reservoir buffer) and the network's initial weights."""
    import copy

    import torch.nn.functional as F

    from _runner import config_for
    from synapse.experiments import presets
    from synapse.experiments.run import Experiment

    hp = {**presets.values("gdumb", "seq-mnist", buffer), **extra}
    exp = Experiment(config_for("fashion-mnist", "gdumb", buffer, seed, hp=hp, threads=1))
    initial = copy.deepcopy(exp.model.state_dict())
    port = port_model(cls, exp, seed, buffer, PORT)

    def store(x: Any, y: Any) -> None:  # GDumb's stream step stores the batch and adds no gradient
        exp.synapse.backward(F.cross_entropy(exp.model(x), y), y, inputs=x)

    feed(exp, port, retrain=False, store=store)
    exp.synapse.buffer.flush()
    return exp, port, initial


def port_fit(cls: Any, port: Any, exp: Any, initial: Dict[str, Any], memory: Tuple[Any, Any]) -> None:
    """The port's ``end_task`` (its ``fit_buffer``) on ``memory`` (``(items, labels)``, in that order, in a
    fresh buffer of its size), training the experiment's network from ``initial``."""
    module: Any = sys.modules[cls.__module__]
    port.buffer = type(port.buffer)(len(memory[1]))
    port.buffer.add_data(examples=memory[0], labels=memory[1])
    exp.model.load_state_dict(initial)
    module.get_backbone = lambda _args: exp.model
    module.progress_bar = lambda *args, **kwargs: None  # its per-epoch console line only
    port.end_task(port.dataset)
    if port.net is not exp.model:
        raise RuntimeError("mammoth's GDumb did not retrain the experiment's network")


def synapse_memory(exp: Any) -> Tuple[Any, Any]:
    """Synapse's memory, items and labels in storage order."""
    items = exp.synapse.buffer.stored()
    return items["input:inputs"], items["targets"].long()


def accuracy(exp: Any) -> float:
    cil = exp.evaluate()[0]
    return 100.0 * sum(cil) / len(cil)


def synapse_fit_recorded(exp: Any, initial: Dict[str, Any], log: StepLog, draws: Draws) -> None:
    """Synapse's retraining from ``initial``, its own randomness recorded into ``draws``."""
    import numpy as np
    import torch

    gdumb = exp.synapse
    module: Any = sys.modules[type(gdumb).__module__]
    saved = module.np, module.torch, module.F
    original_order = gdumb._epoch_order

    def randperm(n: int, generator: Any = None) -> Any:
        return draws.put("perm", torch.randperm(n, generator=generator))

    def epoch_order(n: int, length: int) -> Any:
        held = len(draws.queues["perm"])
        order = original_order(n, length)
        del draws.queues["perm"][held:]  # the epoch's own permutation, not a CutMix partner
        return draws.put("epoch", order)

    module.np = Shim(np, random=Shim(np.random, default_rng=lambda s: _RecordingRng(np.random.default_rng(s), draws)))
    module.torch = Shim(torch, randperm=randperm)
    module.F = Shim(saved[2], cross_entropy=log.loss(saved[2].cross_entropy))
    gdumb._epoch_order = epoch_order
    try:
        with log:
            gdumb.retrain(reinitialize=lambda m: m.load_state_dict(initial))
    finally:
        module.np, module.torch, module.F = saved
        del gdumb._epoch_order


def port_fit_replayed(cls: Any, port: Any, exp: Any, initial: Dict[str, Any], log: StepLog, draws: Draws) -> None:
    """The port's retraining on Synapse's memory from ``initial``, its numpy and torch draws replaced by
    ``draws`` (module attributes of mammoth's ``utils.buffer`` and ``utils.augmentations``, restored after)."""
    import numpy as np
    import torch

    buffer_mod, augment_mod = sys.modules["utils.buffer"], sys.modules["utils.augmentations"]
    saved = buffer_mod.np, augment_mod.np, augment_mod.torch, port.loss

    def choice(n: int, size: int, replace: bool = True) -> Any:
        order = draws.take("epoch").numpy()
        if replace or len(order) != size or n != size:
            raise RuntimeError(f"the port asked for choice({n}, {size}, replace={replace}): not an epoch order")
        return order

    buffer_mod.np = Shim(np, random=Shim(np.random, choice=choice))
    augment_mod.np = Shim(
        np,
        random=Shim(
            np.random,
            rand=lambda: draws.take("coin"),
            beta=lambda a, b: draws.take("beta"),
            randint=lambda high: draws.take("centre"),
        ),
    )
    augment_mod.torch = Shim(torch, randperm=lambda n: draws.take("perm"))
    port.loss = log.loss(port.loss)
    try:
        with log:
            port_fit(cls, port, exp, initial, synapse_memory(exp))
    finally:
        buffer_mod.np, augment_mod.np, augment_mod.torch, port.loss = saved


FIRST_STEPS = 4  # per-step records kept in the raw results
STEP_FIELDS = ("lr", "loss_terms", "grad_norm", "grad_probe", "weight_norm", "weight_probe")


def relative_difference(x: Any, y: Any) -> float:
    """``|x - y| / max(|x|, |y|)`` (0 for two zeros); for lists, the largest over the entries (inf when
    their lengths differ)."""
    if isinstance(x, list):
        return max((relative_difference(u, v) for u, v in zip(x, y)), default=0.0) if len(x) == len(y) else inf
    return abs(x - y) / max(abs(x), abs(y)) if x != y else 0.0


def first_difference(a: List[Dict[str, Any]], b: List[Dict[str, Any]], rtol: float) -> Optional[int]:
    """The first step at which a recorded field differs by more than ``rtol`` (relative), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if any(relative_difference(x[k], y[k]) > rtol for k in STEP_FIELDS):
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def lockstep_run(cls: Any, seed: int, buffer: int, extra: Dict[str, Any]) -> Dict[str, Any]:
    """Synapse's retraining (preset, ``extra`` over it) and the port's ``fit_buffer`` on one memory
    (Synapse's), from the same initial weights, with the same epoch orders and CutMix draws (Synapse's,
    replayed into the port); per-step records, the first step that differs, the final weights and
    accuracies."""
    import torch

    exp, port, initial = stream(seed, buffer, extra, cls)
    sides: Dict[str, Dict[str, Any]] = {}
    draws = Draws()
    log = StepLog(list(exp.model.parameters()))
    synapse_fit_recorded(exp, initial, log, draws)
    weights = {"synapse": [p.detach().clone() for p in exp.model.parameters()]}
    sides["synapse"] = {"final": accuracy(exp), "steps": log.steps}
    log = StepLog(list(exp.model.parameters()))
    port_fit_replayed(cls, port, exp, initial, log, draws)
    weights["mammoth"] = [p.detach().clone() for p in exp.model.parameters()]
    sides["mammoth"] = {"final": accuracy(exp), "steps": log.steps}
    a, b = sides["synapse"].pop("steps"), sides["mammoth"].pop("steps")
    first = {str(rtol): first_difference(a, b, rtol) for rtol in (0.0, 1e-6, 1e-3)}
    at = first["0.0"]
    return {
        "steps": [len(a), len(b)],
        "first_differing_step": first,
        "worst_relative_difference": {
            k: max(relative_difference(x[k], y[k]) for x, y in zip(a, b)) for k in STEP_FIELDS
        },
        # the records themselves (all steps would be megabytes): the first ones, and where they first differ
        "first_steps": {"synapse": a[:FIRST_STEPS], "mammoth": b[:FIRST_STEPS]},
        "at_first_difference": None if at is None else {"synapse": a[at : at + 1], "mammoth": b[at : at + 1]},
        "final_weights_max_abs_diff": max(float((x - y).abs().max()) for x, y in zip(*weights.values())),
        "unused_draws": draws.left(),
        "synapse": sides["synapse"],
        "mammoth": sides["mammoth"],
        "max_grad_norm": max(x["grad_norm"] for x in b),
        "buffer_per_class": torch.bincount(synapse_memory(exp)[1], minlength=10).tolist(),
    }


def memory_run(cls: Any, seed: int, buffer: int) -> Dict[str, Any]:
    """The port's retraining (its own randomness, numpy and torch seeded with ``seed`` before each fit, so
    both fits draw alike) on Synapse's class-balanced memory and on the port's reservoir buffer, from the
    network's initial weights, over the same stream."""
    import numpy as np
    import torch

    exp, port, initial = stream(seed, buffer, {}, cls)
    own = (port.buffer.examples.clone(), port.buffer.labels.clone())
    out: Dict[str, Any] = {}
    for name, memory in (("synapse_memory", synapse_memory(exp)), ("port_memory", own)):
        torch.manual_seed(seed)
        np.random.seed(seed)
        port_fit(cls, port, exp, initial, memory)
        out[name] = {
            "final": accuracy(exp),
            "buffer_per_class": torch.bincount(memory[1].long(), minlength=10).tolist(),
        }
    return out


# -------------------------------------------------------------------------------------------------- render
COLUMNS = (
    ("preset", "Synapse, preset"),
    ("gdumb-optimizer", "Synapse, GDumb authors' optimizer"),
    ("mammoth", "mammoth `GDumb`"),
)
Table = Dict[int, Dict[str, Dict[str, float]]]  # buffer -> column -> seed -> final Class-IL %


def table(files: List[str]) -> Tuple[Table, Dict[int, Dict[str, List[int]]], List[str]]:
    """Finals by buffer, column and seed; mammoth's buffer per class by buffer and seed; the files read."""
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
    return finals, spread, used


def render(files: List[str]) -> str:
    """The markdown section from raw result files (accuracy mode's JSON); empty without any."""
    loaded = [(p, r) for p, r in load_results(files) if r.get("mode") == MODE]
    if not loaded:
        return ""
    finals, spread, used = table(files)
    machine, versions = provenance_lines([r.get("provenance") for _, r in loaded])
    commits = sorted({r["reference"]["commit"] for _, r in loaded})
    lines = [
        "## GDumb on Seq-F-MNIST: Synapse against mammoth's `GDumb` (the DER authors' port)",
        "",
        "Generated by `benchmarks/sidebyside_gdumb.py render` from the raw results named below; do not edit by",
        "hand. mammoth's `models/gdumb.py` runs from a local checkout (never vendored) on the CLI experiment's",
        "data, MLP, initial weights and batch order; its reservoir buffer fills from the stream and its last",
        "`end_task` retrains with the port's own defaults (mammoth has no seq-mnist values for `gdumb`). Synapse,",
        "preset: the seq-mnist preset (class-balanced memory; the port's retraining: 256 epochs, its schedule,",
        "CutMix, SGD with momentum 0, weight decay 0, minibatch 64, no clipping; from the experiment's Xavier",
        "initialisation, as the port's rebuilt MLP); the raw files record every value run (`synapse_hp`) and the",
        "commit. Synapse, GDumb authors' optimizer: the same with",
        f"{json.dumps(gdumb_optimizer())}, the GDumb authors' (the preset before it took the port's).",
        "See the script's docstring.",
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


LOCKSTEP = "sidebyside_gdumb_lockstep*.json"  # lockstep and memory modes' raw results


def lockstep_rows(files: List[str]) -> Tuple[List[str], List[str]]:
    """The lockstep table's rows (one per buffer and seed) and the files read."""
    rows, used = [], []
    for path, r in load_results(files):
        if r.get("mode") != "gdumb-lockstep":
            continue
        used.append(path)
        for seed, row in sorted(r["seeds"].items(), key=lambda kv: int(kv[0])):
            first = row["first_differing_step"]["0.0"]
            worst = max(row["worst_relative_difference"].values())
            cells = [
                str(r["buffer"]),
                seed,
                r["synapse_values"],
                " / ".join(map(str, row["steps"])),
                "none" if first is None else str(first),
                f"{worst:.1e}",
                f"{row['final_weights_max_abs_diff']:.1e}",
                f"{row['synapse']['final']:.2f}",
                f"{row['mammoth']['final']:.2f}",
            ]
            rows.append("| " + " | ".join(cells) + " |")
    return rows, used


def memory_finals(files: List[str]) -> Tuple[Dict[int, Dict[str, List[float]]], List[str]]:
    """Memory mode's finals by buffer: ``synapse_memory`` and ``port_memory`` over the same seeds, in seed
    order; the files read."""
    out: Dict[int, Dict[str, List[float]]] = {}
    used = []
    for path, r in load_results(files):
        if r.get("mode") != "gdumb-memory":
            continue
        used.append(path)
        by = out.setdefault(r["buffer"], {"seeds": [], "synapse_memory": [], "port_memory": []})
        for seed, row in sorted(r["seeds"].items(), key=lambda kv: int(kv[0])):
            by["seeds"].append(int(seed))
            for name in ("synapse_memory", "port_memory"):
                by[name].append(row[name]["final"])
    return out, used


def render_lockstep(files: List[str]) -> str:
    """The markdown of the lockstep and memory runs (``lockstep`` and ``memory`` modes' JSON); empty without
    any."""
    steps, used = lockstep_rows(files)
    memory, used_memory = memory_finals(files)
    if not steps and not memory:
        return ""
    lines = [
        "### GDumb: the retraining in lockstep, and the two memories",
        "",
        "Generated by `benchmarks/sidebyside_gdumb.py render` (modes `lockstep` and `memory`; see the script's",
        "docstring). Lockstep: one memory (Synapse's, its items and order), the same initial weights, Synapse's",
        "`retrain` and the port's `fit_buffer` with Synapse's epoch orders and CutMix draws replayed into the",
        "port; per optimizer step the learning rate, the loss terms, the gradient and the weights (norm and a",
        "fixed random projection) compared. First differing step: the first at which any of them differs at all",
        "(relative tolerance 0); worst: the largest relative difference over all steps and fields.",
        "",
    ]
    if steps:
        lines += [
            "| buffer | seed | Synapse's values | steps (Synapse / port) | first differing step | worst | "
            "final weights, max abs diff | Synapse % | port % |",
            "|---|---|---|---|---|---|---|---|---|",
            *steps,
            "",
        ]
    if memory:
        lines += [
            "Memory swap: the port's retraining (its own randomness, torch and numpy seeded with the seed before",
            "each fit, so both fits draw alike) from the network's initial weights, on Synapse's class-balanced",
            "memory and on the port's reservoir buffer, both filled from the same stream. Final Class-IL, %.",
            "",
            "| buffer | seeds | Synapse's memory | port's memory | port's - Synapse's (paired) |",
            "|---|---|---|---|---|",
        ]
        for buffer, by in sorted(memory.items()):
            diff = [b - a for a, b in zip(by["synapse_memory"], by["port_memory"])]
            cells = [mean_std(by["synapse_memory"], 2), mean_std(by["port_memory"], 2), mean_std(diff, 2)]
            lines.append(f"| {buffer} | {' '.join(map(str, by['seeds']))} | " + " | ".join(cells) + " |")
        lines += ["", "Per seed (Synapse's memory / port's memory):", ""]
        for buffer, by in sorted(memory.items()):
            pairs = zip(by["seeds"], by["synapse_memory"], by["port_memory"])
            lines.append(f"- buffer {buffer}: " + "; ".join(f"seed {s} {a:.2f} / {b:.2f}" for s, a, b in pairs))
        lines.append("")
    lines.append("Raw results: " + ", ".join(f"`{p}`" for p in [*used, *used_memory]) + ".")
    return "\n".join(lines)


def section(results_dir: str) -> str:
    """This script's section of REPRODUCIBILITY-sidebyside.md (``benchmarks/sidebyside.py render``)."""
    parts = [
        render(sorted(glob.glob(os.path.join(results_dir, PATTERN)))),
        render_lockstep(sorted(glob.glob(os.path.join(results_dir, LOCKSTEP)))),
    ]
    return "\n\n".join(part for part in parts if part)


def lockstep_summary(results_dir: str) -> Tuple[str, List[str]]:
    """For ``crosscheck_summary``: the lockstep's first differing steps and the memory swap's paired
    difference, per buffer, in words; the files read."""
    files = sorted(glob.glob(os.path.join(results_dir, LOCKSTEP)))
    parts, used = [], []
    for path, r in load_results(files):
        if r.get("mode") != "gdumb-lockstep":
            continue
        used.append(path)
        runs = r["seeds"].values()
        firsts = {run["first_differing_step"]["0.0"] for run in runs}
        steps = sorted({n for run in runs for n in run["steps"]})
        weights = max(run["final_weights_max_abs_diff"] for run in runs)
        verdict = "no step differs" if firsts == {None} else f"first differing steps {sorted(firsts, key=str)}"
        parts.append(
            f"lockstep from one memory, buffer {r['buffer']} (Synapse {r['synapse_values']}, seeds "
            f"{' '.join(sorted(r['seeds'], key=int))}): {verdict} over {'/'.join(map(str, steps))} steps, final "
            f"weights max abs diff {weights:.1e}"
        )
    memory, used_memory = memory_finals(files)
    for buffer, by in sorted(memory.items()):
        diff = [b - a for a, b in zip(by["synapse_memory"], by["port_memory"])]
        parts.append(
            f"the port's retraining on its reservoir buffer against Synapse's class-balanced memory, buffer "
            f"{buffer}: {mean_std(diff, 2)} ({len(diff)} seeds, paired)"
        )
    return "; ".join(parts), [*used, *used_memory]


def summary(results_dir: str) -> Tuple[Dict[int, Dict[str, List[float]]], List[str]]:
    """For ``crosscheck_summary``: per buffer, each column's finals over the seeds mammoth has; the files."""
    finals, _, used = table(sorted(glob.glob(os.path.join(results_dir, PATTERN))))
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
    p.add_argument("mode", choices=("accuracy", "lockstep", "memory", "render"))
    p.add_argument("--reference", help="a local checkout of aimagelab/mammoth")
    p.add_argument("--reference-commit", help="the checkout's commit, where it is not a git work tree")
    p.add_argument("--results", nargs="+", help=f"render: raw result files (default: results/{PATTERN})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--buffer", type=int, default=500)
    p.add_argument("--which", choices=("both", "reference", "synapse"), default="reference")
    p.add_argument("--synapse", choices=SYNAPSE, default="preset", help="Synapse's retraining values")
    p.add_argument("--output", help="JSON file for the raw results (default: stdout)")
    a = p.parse_args(argv)
    if a.mode == "render":
        from sidebyside import write

        # The page's section comes from ``sidebyside.py render``; this prints it, or writes it to --output.
        text = render(a.results) + "\n\n" + render_lockstep(a.results) if a.results else section(RESULTS)
        return write(text, a.output)
    if not a.reference:
        p.error(f"{a.mode} needs --reference PATH (a local checkout of aimagelab/mammoth)")
    if a.buffer <= 0:
        p.error(f"--buffer must be positive, got {a.buffer}")
    from sidebyside import gdumb_run, load_reference

    output = os.path.abspath(a.output) if a.output else None  # mammoth's import changes the directory
    cls = load_reference(a.reference, "gdumb", "GDumb")
    commit = a.reference_commit or os.popen(f"git -C {a.reference} rev-parse HEAD 2>/dev/null").read().strip()
    if a.mode != "accuracy":
        return side_modes(a, cls, commit, output)
    result: Dict[str, Any] = {
        "mode": MODE,
        "reference": {"code": "aimagelab/mammoth models/gdumb.py GDumb", "commit": commit or "unknown"},
        "buffer": a.buffer,
        "port": PORT,
        "synapse_values": a.synapse,
        "synapse_extra": synapse_values(a.synapse),
        "synapse_hp": used_values(a.buffer, a.synapse),
        "provenance": provenance(),
        "seeds": {},
    }
    for seed in a.seeds:
        t0 = time.time()
        row: Dict[str, Any] = {}
        if a.which != "synapse":
            row["reference"] = reference_run(cls, seed, a.buffer, PORT)
        if a.which != "reference":
            row["synapse"] = gdumb_run(seed, a.buffer, "port", synapse_values(a.synapse))
        result["seeds"][str(seed)] = row
        save(result, output, final=False)  # what is done so far survives a stop
        summary = ", ".join(f"{side} {x['final']:.2f}" for side, x in row.items())
        print(f"seed {seed}: {summary} ({time.time() - t0:.0f}s)", file=sys.stderr)
    save(result, output, final=True)


def side_modes(a: argparse.Namespace, cls: Any, commit: str, output: Optional[str]) -> None:
    """``lockstep`` and ``memory`` modes: per seed, into one JSON file."""
    result: Dict[str, Any] = {
        "mode": f"gdumb-{a.mode}",
        "reference": {"code": "aimagelab/mammoth models/gdumb.py GDumb", "commit": commit or "unknown"},
        "buffer": a.buffer,
        "port": PORT,
        "synapse_values": a.synapse if a.mode == "lockstep" else None,
        "synapse_extra": synapse_values(a.synapse) if a.mode == "lockstep" else None,
        "synapse_hp": used_values(a.buffer, a.synapse) if a.mode == "lockstep" else None,
        "provenance": provenance(),
        "seeds": {},
    }
    for seed in a.seeds:
        t0 = time.time()
        if a.mode == "lockstep":
            row = lockstep_run(cls, seed, a.buffer, synapse_values(a.synapse))
            note = f"first differing step {row['first_differing_step']}, finals "
            note += f"{row['synapse']['final']:.2f} / {row['mammoth']['final']:.2f}"
        else:
            row = memory_run(cls, seed, a.buffer)
            note = ", ".join(f"{k} {v['final']:.2f}" for k, v in row.items())
        result["seeds"][str(seed)] = row
        save(result, output, final=False)
        print(f"seed {seed}: {note} ({time.time() - t0:.0f}s)", file=sys.stderr)
    save(result, output, final=True)


if __name__ == "__main__":
    main()
