"""Why the prompt methods' later tasks are barely predicted (Class-IL) on the pretrained-signal check.

REPRODUCIBILITY-pretrained.md shows L2P, DualPrompt and CODA-Prompt keeping their first task (~88%) while each
later task scores near 0% Class-IL even right after it is trained, with Task-IL ~90%. This runs the page's
protocol (:func:`pretrained_signal.config`: same backbone, split, batch, lr, 1 epoch) through the experiment
program and, after each task, measures on every seen task's test images:

* ``confusion``: the share of task t's images predicted into each task's classes (and into classes of tasks
  not seen yet);
* ``selection``: how often the test-time prompt choice is the one task t trained with (DualPrompt: E-prompt
  t, per sample and batch-wise; L2P: the top-k prompts its training batches used most; CODA-Prompt: the share
  of the attention weights' absolute mass on each task's components);
* ``max_logit``: the mean, over task t's images, of the largest logit among each task's classes;
* ``oracle``: Class-IL with the prompts task t trained with forced at test (task identity);

and a few one-change counterfactual variants (:data:`VARIANTS`). Raw results go to
``benchmarks/results/prompt_diagnosis.json`` (finished runs are reused), the rendered section to
``benchmarks/results/prompt_diagnosis.md``.

    OMP_NUM_THREADS=1 python benchmarks/prompt_diagnosis.py run                # every variant, seed 0
    OMP_NUM_THREADS=1 python benchmarks/prompt_diagnosis.py run --variants dualprompt:default --seeds 1 2
    python benchmarks/prompt_diagnosis.py render                               # runs nothing
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pretrained_signal as signal  # noqa: E402
from _runner import ROOT, display_name, file_sha256, percent_over_seeds, provenance, provenance_lines  # noqa: E402

OUTPUT_JSON = os.path.join(ROOT, "benchmarks", "results", "prompt_diagnosis.json")
OUTPUT_MD = os.path.join(ROOT, "benchmarks", "results", "prompt_diagnosis.md")
METHODS = ("dualprompt", "coda-prompt", "l2p")
# The commands that made the committed results, in order (the page lists them).
RUNS_MADE_BY = (
    "OMP_NUM_THREADS=1 python benchmarks/prompt_diagnosis.py run",
    "OMP_NUM_THREADS=1 python benchmarks/prompt_diagnosis.py run --variants dualprompt:default dualprompt:unmasked "
    "--seeds 1 2",
    "OMP_NUM_THREADS=1 python benchmarks/prompt_diagnosis.py run --variants coda-prompt:default "
    "coda-prompt:user_loss l2p:default l2p:unmasked --seeds 1 2",
    "OMP_NUM_THREADS=1 python benchmarks/prompt_diagnosis.py run --variants l2p:token_head --seeds 0 1 2",
)
# One change each from the page's default row: (Config fields, method arguments, what it tests).
VARIANTS: Dict[str, Tuple[Dict[str, Any], Dict[str, Any], str]] = {
    "default": ({}, {}, "the page's default row"),
    "unmasked": ({}, {"train_mask": False}, "the loss over all classes seen and unseen (`train_mask=False`)"),
    # CODA-Prompt has no train_mask (always on); its 'user' loss is the program's plain cross-entropy over all
    # classes, the same change.
    "user_loss": ({}, {"current_loss": "user"}, "the program's cross-entropy over all classes (`current_loss=user`)"),
    "epochs3": ({"num_epochs": 3}, {}, "3 epochs per task"),
    # The page's third row: the optimizer, lr and clipping of the method's authors (pretrained_signal.py).
    "authors": ({}, {}, "the authors' optimizer (the page's third row)"),
    # L2P's first task trails the others' right after training (about 71% against 90%): is it the head reading
    # the prompt tokens' mean (its authors' head_type='prompt'), which this backbone was never trained to give?
    "token_head": (
        {}, {"head_type": "token"}, "the head reading [CLS], not the prompt tokens' mean (`head_type=token`)"
    ),
}
APPLIES = {
    "dualprompt": ("default", "unmasked", "epochs3", "authors"),
    "coda-prompt": ("default", "user_loss", "epochs3", "authors"),
    "l2p": ("default", "unmasked", "epochs3", "authors", "token_head"),
    "simplecil": ("default",),
    "sequential": ("default",),
}
# The controls: rows of the page run without the diagnosis (which needs prompts), to show what the backbone
# alone gives: SimpleCIL's prototypes on frozen features, and plain fine-tuning.
CONTROLS = ("simplecil", "sequential")
# The backbones a run can start from (pretrained_signal.py pretrain --classes ...): the page's, pretrained on
# the first task's classes, and the same recipe on every class (the test of the masked loss's reliance on it).
BACKBONES = tuple(signal.PRETRAIN_CLASSES)
# The commands that made the runs on the backbone pretrained on every class, in order.
BACKBONE_RUNS_MADE_BY = (
    "python benchmarks/pretrained_signal.py pretrain --classes all",
    "OMP_NUM_THREADS=1 python benchmarks/prompt_diagnosis.py run --backbone all --variants dualprompt:default "
    "dualprompt:unmasked --seeds 0 1 2",
    "OMP_NUM_THREADS=1 python benchmarks/prompt_diagnosis.py run --backbone all --variants l2p:default "
    "coda-prompt:default simplecil:default sequential:default",
    "OMP_NUM_THREADS=1 python benchmarks/prompt_diagnosis.py run --variants simplecil:default sequential:default",
    "OMP_NUM_THREADS=1 python benchmarks/prompt_diagnosis.py run --backbone all --variants l2p:default "
    "coda-prompt:default --seeds 1 2",
)


# ---------------------------------------------------------------------------------------------- pure parts
def class_to_task(task_classes: Sequence[Sequence[int]], num_classes: int) -> Tensor:
    """``(num_classes,)``: the task of each class; ``ValueError`` unless every class is in exactly one task."""
    owner = torch.full((num_classes,), -1, dtype=torch.long)
    for t, classes in enumerate(task_classes):
        for c in classes:
            if not 0 <= c < num_classes or owner[c] != -1:
                raise ValueError(f"class {c} is out of range or in more than one task")
            owner[c] = t
    if (owner < 0).any():
        raise ValueError(f"classes {(owner < 0).nonzero().flatten().tolist()} are in no task")
    return owner


def task_confusion(predicted: Tensor, true_task: Tensor, owner: Tensor, num_tasks: int) -> List[List[float]]:
    """Row t: the share of task t's samples whose predicted class belongs to each task (rows of tasks with no
    sample are all zero). ``predicted``, ``true_task``: ``(n,)``; ``owner``: :func:`class_to_task`."""
    if predicted.shape != true_task.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} and true_task {tuple(true_task.shape)} differ")
    counts = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
    counts.index_put_(
        (true_task.cpu(), owner[predicted.cpu()]), torch.ones(len(predicted), dtype=torch.float64), accumulate=True
    )
    return (counts / counts.sum(1, keepdim=True).clamp_min(1)).tolist()


def mass_per_task(weights: Tensor, per_task: int) -> List[float]:
    """CODA-Prompt: the share of the absolute attention weights ``(batch, components)`` on each task's slice
    of ``per_task`` components, averaged over the batch."""
    mass = weights.abs().reshape(weights.shape[0], -1, per_task).sum(2)
    return (mass / mass.sum(1, keepdim=True).clamp_min(1e-12)).mean(0).tolist()


# ---------------------------------------------------------------------------------------------- measuring
def _forced(method: Any, name: str, make: Callable[..., Any]) -> Callable[[], None]:
    """Shadow ``method.<name>`` on the instance (the class's code is left as it is); returns the undo."""
    setattr(method, name, make)
    return lambda: delattr(method, name)


def _oracle(method: Any, task: int, trained_with: Dict[int, List[int]]) -> Callable[[], None]:
    """Make ``method`` use at test the prompts task ``task`` trained with; returns the undo."""
    kind = type(method).__name__
    if kind == "DualPrompt":
        k = method.top_k
        own = torch.arange(task * k, (task + 1) * k)[None]
        return _forced(method, "select", lambda query, training=False: own.to(query.device).expand(len(query), -1))
    if kind == "L2P":
        own = torch.tensor(trained_with[task])[None]
        return _forced(method, "select", lambda query: own.to(query.device).expand(len(query), -1))
    if kind == "CODAPrompt":  # the components of tasks 0..task, those in use while it trained
        original = type(method).weights.__get__(method)
        keep = (task + 1) * method.per_task
        return _forced(method, "weights", lambda query: [_zero_after(w, keep) for w in original(query)])
    raise ValueError(f"no oracle for {kind}")


def _check_forced(method: Any, task: int, trained_with: Dict[int, List[int]]) -> None:
    """Raise unless the latest forward used the prompts :func:`_oracle` forced (the measurement's guard)."""
    kind = type(method).__name__
    if kind == "CODAPrompt":
        used = all(bool((w[:, (task + 1) * method.per_task :] == 0).all()) for w in method.last_weights)
    else:
        k = method.top_k
        own = list(range(task * k, (task + 1) * k)) if kind == "DualPrompt" else trained_with[task]
        used = method.last_selection.tolist() == [own] * len(method.last_selection)
    if not used:
        raise RuntimeError(f"{kind}: the forced prompts of task {task + 1} were not the ones used")


def _zero_after(weights: Tensor, keep: int) -> Tensor:
    """``weights`` ``(batch, components)`` with the columns from ``keep`` on set to zero."""
    return torch.cat([weights[:, :keep], torch.zeros_like(weights[:, keep:])], 1)


def _record_training_selection(method: Any) -> Dict[int, Counter]:
    """L2P: count the prompts each task's training forwards select (its own idea of 'the task's prompts')."""
    counts: Dict[int, Counter] = {}
    inject = type(method)._inject.__get__(method)

    def recording(query: Tensor, training: bool) -> Any:
        out = inject(query, training)
        if training:
            counts.setdefault(method.num_tasks_ended, Counter()).update(out[1].flatten().tolist())
        return out

    method._inject = recording
    return counts


@torch.no_grad()
def diagnose(exp: Any, trained_with: Dict[int, List[int]]) -> Dict[str, Any]:
    """Every measurement after the task just ended, on the test images of the tasks seen so far."""
    from synapse.experiments.streaming import batches
    from synapse.functional.prompts import key_similarity

    method, model = exp.synapse, exp.model
    seen = method.num_tasks_ended
    num_tasks = len(exp.task_classes)
    owner = class_to_task(exp.task_classes, exp.spec.num_classes).to(exp.device)
    predict = exp._predictor() or model
    model.eval()
    preds, oracle_preds, truth = [], [], []
    max_logit = torch.zeros(seen, num_tasks, dtype=torch.float64)
    selection: Dict[str, Any] = {}
    for t in range(seen):
        images, labels = exp.test_sets[t]
        chunks = (torch.arange(s, min(s + 512, len(labels))) for s in range(0, len(labels), 512))
        chosen: Counter = Counter()
        own_sample = own_batch = 0
        own_cos = best_cos = 0.0
        mass = torch.zeros(seen, dtype=torch.float64)
        for x, y in batches(images, labels, (c.to(labels.device) for c in chunks)):
            logits = model(x) if predict is model else predict(x)
            raw = model(x) if predict is not model else logits
            preds.append(logits.argmax(1))
            truth.append(torch.full_like(y, t))
            for u, classes in enumerate(exp.task_classes):
                max_logit[t, u] += raw[:, list(classes)].max(1).values.double().sum().cpu()
            name = type(method).__name__
            if name == "DualPrompt":
                query = method.prompts.last_query
                k = method.top_k
                similarity = key_similarity(query.float(), method.key)
                per_sample = similarity.topk(k, dim=1).indices
                own_cos += float(similarity[:, t * k : (t + 1) * k].mean(1).sum())
                best_cos += float(similarity.max(1).values.sum())
                own = set(range(t * k, (t + 1) * k))
                own_sample += sum(set(row) == own for row in per_sample.tolist())
                own_batch += len(y) * (set(method.last_selection[0].tolist()) == own)
                chosen.update(method.last_selection[0].tolist())
            elif name == "L2P":
                chosen.update(method.last_selection.flatten().tolist())
            else:
                for w in method.last_weights:
                    mass += torch.tensor(mass_per_task(w.float(), method.per_task), dtype=torch.float64) * len(y)
            undo = _oracle(method, t, trained_with)
            try:
                oracle_preds.append((model(x) if predict is model else predict(x)).argmax(1))
                _check_forced(method, t, trained_with)
            finally:
                undo()
        n = len(labels)
        max_logit[t] /= n
        entry: Dict[str, Any] = {"test_images": n, "prompts_chosen": dict(sorted(chosen.items()))}
        if type(method).__name__ == "DualPrompt":
            entry.update(
                own_per_sample=own_sample / n,
                own_batchwise=own_batch / n,
                own_key_cosine=own_cos / n,
                best_key_cosine=best_cos / n,
            )
        elif type(method).__name__ == "L2P":
            entry["trained_with"] = trained_with.get(t)
        else:
            entry["mass_per_task"] = (mass / (n * len(method.last_weights))).tolist()
        selection[f"task {t + 1}"] = entry
    pred, oracle_pred, true = torch.cat(preds), torch.cat(oracle_preds), torch.cat(truth)
    labels_all = torch.cat([exp.test_sets[t][1] for t in range(seen)])

    def accuracy(p: Tensor) -> List[float]:
        hit = (p == labels_all).double()
        return [float(hit[true == t].mean()) for t in range(seen)]

    head = method.head
    return {
        "after_task": seen,
        "class_il": accuracy(pred),
        "confusion": task_confusion(pred, true, owner, num_tasks)[:seen],
        "oracle_class_il": accuracy(oracle_pred),
        "oracle_confusion": task_confusion(oracle_pred, true, owner, num_tasks)[:seen],
        "max_logit": max_logit.tolist(),
        "head_row_norm": [float(head.weight[list(c)].norm(dim=1).mean()) for c in exp.task_classes],
        "head_bias": [float(head.bias[list(c)].mean()) for c in exp.task_classes],
        "selection": selection,
    }


def change(method: str, variant: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The Config fields and method arguments ``variant`` changes for ``method``."""
    fields, method_args, _ = VARIANTS[variant]
    return (dict(signal.AUTHORS_OPTIMIZER[method][0]) if variant == "authors" else fields), method_args


def weights(backbone: str) -> str:
    """The weights file of ``backbone`` (one of :data:`BACKBONES`)."""
    if backbone not in BACKBONES:
        raise SystemExit(f"prompt_diagnosis.py: unknown backbone {backbone!r}; choose from {list(BACKBONES)}")
    return signal.PRETRAIN_CLASSES[backbone][0]


def run_one(method: str, variant: str, seed: int, dataset_dir: str, backbone: str = "first") -> Dict[str, Any]:
    """One run of the page's protocol with ``variant``'s change from ``backbone``, diagnosed after every task
    (a control, :data:`CONTROLS`, is not)."""
    from synapse.experiments.run import Experiment

    fields, method_args = change(method, variant)
    path = weights(backbone)
    base = signal.config(method, None, seed, path, dataset_dir)
    cfg = dataclasses.replace(base, method_args={**base.method_args, **method_args}, **fields)

    class Diagnosed(Experiment):
        def evaluate(self) -> Any:
            result = super().evaluate()
            if method not in CONTROLS and self.synapse is not None and self.synapse.num_steps > 0:
                trained_with = {
                    t: [i for i, _ in c.most_common(getattr(self.synapse, "top_k", 0))] for t, c in recorded.items()
                }
                points.append(diagnose(self, trained_with))
            return result

    points: List[Dict[str, Any]] = []
    start = time.perf_counter()
    exp = Diagnosed(cfg)
    recorded = _record_training_selection(exp.synapse) if type(exp.synapse).__name__ == "L2P" else {}
    result = exp.run()
    return {
        "method": method,
        "variant": variant,
        "seed": seed,
        "backbone": backbone,
        "weights_sha256": file_sha256(path),
        "config_change": {**fields, **({"method_args": method_args} if method_args else {})},
        "command": command(method, variant, seed, backbone),
        "accuracy_matrix": result["accuracy_matrix"],
        "average_accuracy": result["average_accuracy"],
        "forgetting": result["forgetting"],
        "test_samples_per_task": result["test_samples_per_task"],
        "points": points,
        "wall_time_s": time.perf_counter() - start,
        "provenance": provenance(),
    }


def command(method: str, variant: str, seed: int, backbone: str = "first") -> str:
    """The ``python -m synapse.experiments`` line of one run (the diagnosis itself is this script's)."""
    authors = variant == "authors"
    fields, method_args = change(method, variant)
    extra = {} if authors else {**fields, **method_args}
    flags = "".join(f" --{k} {str(v).lower() if isinstance(v, bool) else v}" for k, v in extra.items())
    return signal.command(method, None, seed, weights(backbone), authors=authors) + flags


def load(path: str = OUTPUT_JSON) -> List[Dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["runs"]


def save(runs: List[Dict[str, Any]], path: str = OUTPUT_JSON) -> None:
    order = {m: i for i, m in enumerate(APPLIES)}
    runs = sorted(runs, key=lambda r: (BACKBONES.index(_backbone(r)), order[r["method"]],
                                       list(VARIANTS).index(r["variant"]), r["seed"]))  # fmt: skip
    with open(path, "w") as f:
        json.dump({"generated_by": "python benchmarks/prompt_diagnosis.py run", "runs": runs}, f, indent=1)


def parse_variants(names: Optional[Sequence[str]]) -> List[Tuple[str, str]]:
    """``method:variant`` names (``None``: every applicable pair), checked."""
    every = [(m, v) for m, variants in APPLIES.items() for v in variants]
    if not names:
        return every
    pairs = [tuple(n.split(":", 1)) if ":" in n else (n, "") for n in names]
    unknown = [f"{m}:{v}" for m, v in pairs if (m, v) not in every]
    if unknown:
        raise SystemExit(f"prompt_diagnosis.py: unknown {unknown}; choose from {[f'{m}:{v}' for m, v in every]}")
    return pairs  # type: ignore[return-value]


def fitting_head(state: Dict[str, Tensor], num_classes: int) -> List[str]:
    """The classifier tensors (timm's ``head.``) of a weights file's ``state`` that a ``num_classes``-way model
    would load (by name and shape, as ``--pretrained`` does)."""
    return [k for k, v in state.items() if k.startswith("head.") and v.shape[:1] == (num_classes,)]


def run(names: Optional[Sequence[str]], seeds: Sequence[int], dataset_dir: str, backbone: str = "first") -> None:
    if not os.path.exists(weights(backbone)):
        flag = "" if backbone == "first" else f" --classes {backbone}"
        raise SystemExit(f"no backbone at {weights(backbone)}: run `python benchmarks/pretrained_signal.py pretrain"
                         f"{flag}` first")  # fmt: skip
    head = fitting_head(torch.load(weights(backbone), map_location="cpu"), 10)
    if head:  # --pretrained would load a trained classifier into the continual model's head
        raise SystemExit(f"{weights(backbone)} holds a 10-way head ({head}): pretrain it again")
    torch.set_num_threads(1)
    runs = load()
    for method, variant in parse_variants(names):
        for seed in seeds:
            if find(runs, method, variant, seed, backbone):
                continue
            print(f"{method} {variant} seed {seed}, backbone {backbone} ...", flush=True)
            runs.append(run_one(method, variant, seed, dataset_dir, backbone))
            save(runs)
            last = runs[-1]
            print(
                f"  {last['wall_time_s']:.0f} s, Class-IL matrix "
                f"{[[round(100 * a, 1) for a in row] for row in last['accuracy_matrix']['class_il']]}",
                flush=True,
            )


# ---------------------------------------------------------------------------------------------- render
def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _backbone(run: Dict[str, Any]) -> str:
    return run.get("backbone", "first")  # the runs saved before the backbone axis: the page's backbone


def find(
    runs: List[Dict[str, Any]], method: str, variant: str, seed: Optional[int] = None, backbone: str = "first"
) -> List[Dict[str, Any]]:
    """The runs of ``method`` under ``variant`` (at ``seed``) from ``backbone``, in seed order."""
    found = [r for r in runs if r["method"] == method and r["variant"] == variant and _backbone(r) == backbone]
    return sorted((r for r in found if seed is None or r["seed"] == seed), key=lambda r: r["seed"])


def just_trained(run: Dict[str, Any]) -> List[float]:
    """Each task's Class-IL right after it was trained (the accuracy matrix's diagonal)."""
    m = run["accuracy_matrix"]["class_il"]
    return [m[t][t] for t in range(len(m))]


def key_numbers(runs: List[Dict[str, Any]]) -> Optional[Dict[str, float]]:
    """DualPrompt's seed-0 numbers the finding rests on (None without its default and unmasked runs)."""
    default, unmasked = find(runs, "dualprompt", "default", 0), find(runs, "dualprompt", "unmasked", 0)
    if not default or not unmasked:
        return None
    last = default[0]["points"][-1]
    t = len(last["class_il"]) - 1
    return {
        "last_task_just_trained": just_trained(default[0])[t],
        "last_into_first": last["confusion"][t][0],
        "first_rows_max_logit": last["max_logit"][t][0],
        "own_rows_max_logit": last["max_logit"][t][t],
        "oracle_last_task": default[0]["points"][t]["oracle_class_il"][t],
        "own_prompt_chosen": last["selection"][f"task {t + 1}"]["own_batchwise"],
        "unmasked_last_task_just_trained": just_trained(unmasked[0])[t],
        "unmasked_first_task_final": unmasked[0]["accuracy_matrix"]["class_il"][-1][0],
    }


def finding(runs: List[Dict[str, Any]]) -> str:
    """The established cause in two sentences, with its numbers read from the runs ('' without them)."""
    k = key_numbers(runs)
    if k is None:
        return ""
    return (
        f"The masked loss (`train_mask`, on by default as in the authors' code) never trains a new task's classes "
        f"against the old ones: at seed 0, DualPrompt predicts {_pct(k['last_into_first'])}% of the last task's "
        f"test images into the first task's classes (mean largest logit {k['first_rows_max_logit']:.2f} there, "
        f"{k['own_rows_max_logit']:.2f} among its own), and scores that task {_pct(k['last_task_just_trained'])}% "
        f"Class-IL right after training it. With `train_mask=false` and nothing else changed it scores "
        f"{_pct(k['unmasked_last_task_just_trained'])}% (while the first task falls to "
        f"{_pct(k['unmasked_first_task_final'])}%{_others(runs)}), whereas forcing each task's own E-prompt at "
        f"test leaves it at {_pct(k['oracle_last_task'])}%."
    )


# The one-change variant of each other method that lifts the masking (CODA-Prompt has no train_mask).
UNMASKED = {"coda-prompt": "user_loss", "l2p": "unmasked"}


def _others(runs: List[Dict[str, Any]]) -> str:
    """ " (unmasked likewise, the last task of CODA-Prompt: a% -> b%, ...)" for the other methods whose seed-0
    default and unmasked runs exist ('' for none)."""
    parts = []
    for method, variant in UNMASKED.items():
        base, changed = find(runs, method, "default", 0), find(runs, method, variant, 0)
        if base and changed:
            before, after = just_trained(base[0])[-1], just_trained(changed[0])[-1]
            parts.append(f"{display_name(method)}: {_pct(before)}% -> {_pct(after)}%")
    return f"; unmasked likewise, the last task of {', of '.join(parts)}" if parts else ""


def _diagonals(found: List[Dict[str, Any]]) -> str:
    """The later tasks' Class-IL right after training, as "a / b / c" (%, mean over the runs' seeds)."""
    n = len(found[0]["accuracy_matrix"]["class_il"])
    return " / ".join(percent_over_seeds([just_trained(r)[t] for r in found]) for t in range(1, n))


def evidence(runs: List[Dict[str, Any]]) -> List[str]:
    """DualPrompt's measurements, one bullet each (those whose runs exist), numbers read from the runs."""
    default = find(runs, "dualprompt", "default", 0)
    if not default:
        return []
    run, out = default[0], []
    last, n = default[0]["points"][-1], len(default[0]["points"])
    later = [f"task {t + 1}" for t in range(1, n)]
    into_first = " / ".join(_pct(last["confusion"][t][0]) for t in range(1, n))
    out.append(
        f"- **Where the later tasks' images go.** After the last task, {into_first}% of the test images of "
        f"{', '.join(later)} are predicted into the first task's classes (DualPrompt, seed 0)."
    )
    chosen: Counter = Counter()
    for s in last["selection"].values():
        chosen.update(s["prompts_chosen"])
    own = " / ".join(_pct(last["selection"][t]["own_per_sample"]) for t in later)
    cosine = " / ".join(f"{last['selection'][t]['own_key_cosine']:.2f}" for t in later)
    oracle = " / ".join(_pct(run["points"][t]["oracle_class_il"][t]) for t in range(1, n))
    out.append(
        f"- **Not the prompt choice.** At test the key match gives {', '.join(later)} their own E-prompt for {own}% "
        f"of their images; every test batch is scored with E-prompt {chosen.most_common(1)[0][0]} (tasks 1-{n} "
        f"train E-prompts 0-{n - 1}): at SGD lr 0.01 the keys barely move (mean cosine of a task's images to its "
        f"own key {cosine}). Forcing each task's own E-prompt at test gives {oracle}% right after training, "
        f"against {_diagonals(default)}% as scored."
    )
    first_norms = [p["head_row_norm"][0] for p in run["points"]]
    out.append(
        f"- **The logits.** On the last task's images the largest logit among the first task's classes averages "
        f"{last['max_logit'][n - 1][0]:.2f}, among the task's own {last['max_logit'][n - 1][n - 1]:.2f}, with "
        f"head rows of alike norms ({' / '.join(f'{v:.2f}' for v in last['head_row_norm'])} per task). A "
        "cross-entropy over one task's classes alone is unchanged by adding one constant to all their logits, so "
        "it never sets one task's level against another's: each task's mean head bias stays at its initial 0 "
        f"(largest |mean| {max(abs(v) for v in last['head_bias']):.0e}), and the first task's rows never change "
        f"after it (mean norm {' / '.join(f'{v:.3f}' for v in first_norms)} after each task), as the classes "
        "outside the current task get no gradient: nothing trains them down on the new images, which they score "
        "high, nor the new classes up against them."
    )
    unmasked = find(runs, "dualprompt", "unmasked")
    if unmasked:
        seeds = ", ".join(str(r["seed"]) for r in unmasked)
        everything = find(runs, "dualprompt", "default")
        into_last = " / ".join(_pct(unmasked[0]["points"][-1]["confusion"][t][n - 1]) for t in range(n - 1))
        out.append(
            f"- **The masked loss is the switch.** With `train_mask=false` alone, tasks 2-{n} score "
            f"{_diagonals(unmasked)}% right after training (seeds {seeds}), against {_diagonals(everything)}% "
            f"with it (seeds {', '.join(str(r['seed']) for r in everything)}); the old tasks are then forgotten "
            f"instead, the usual recency bias: after the last task {into_last}% of tasks 1-{n - 1}'s images go "
            f"to the last task's classes, and each task's mean head bias now moves "
            f"({' / '.join(f'{v:+.3f}' for v in unmasked[0]['points'][-1]['head_bias'])}; seed 0)."
        )
    more = [(v, find(runs, "dualprompt", v, 0)) for v in ("epochs3", "authors")]
    if all(found for _, found in more):
        (_, epochs), (_, authors) = more
        own_batch = " / ".join(_pct(authors[0]["points"][-1]["selection"][t]["own_batchwise"]) for t in later)
        out.append(
            f"- **Not too little training, nor the optimizer.** 3 epochs per task: {_diagonals(epochs)}% right "
            f"after training. The authors' Adam: {_diagonals(authors)}%, although its keys do move (own E-prompt "
            f"for {own_batch}% of the later tasks' images as scored)."
        )
    for method, change_ in UNMASKED.items():
        base, changed = find(runs, method, "default"), find(runs, method, change_)
        if base and changed:
            out.append(
                f"- **{display_name(method)}.** Tasks 2-{n} right after training: {_diagonals(base)}% by default "
                f"(seeds {', '.join(str(r['seed']) for r in base)}), {_diagonals(changed)}% with "
                f"{VARIANTS[change_][2]} (seeds {', '.join(str(r['seed']) for r in changed)})."
            )
    out += l2p_first_task(runs)
    return out


def _first_just_trained(found: List[Dict[str, Any]]) -> str:
    """The first task's Class-IL right after training it, over the runs' seeds, with the seeds named."""
    seeds = ", ".join(str(r["seed"]) for r in found)
    return f"{percent_over_seeds([just_trained(r)[0] for r in found])}% (seed{'s' if len(found) > 1 else ''} {seeds})"


def l2p_first_task(runs: List[Dict[str, Any]]) -> List[str]:
    """Why L2P's first task trails the other methods' right after training: its head (a bullet, or none
    without the runs)."""
    default, token = find(runs, "l2p", "default"), find(runs, "l2p", "token_head")
    dualprompt, authors = find(runs, "dualprompt", "default"), find(runs, "l2p", "authors")
    if not (default and token and dualprompt):
        return []
    adam = f"; under its authors' Adam it is {_first_just_trained(authors)}" if authors else ""
    return [
        f"- **L2P's first task.** Right after training, L2P scores its first task {_first_just_trained(default)} "
        f"against DualPrompt's {_first_just_trained(dualprompt)}. With {VARIANTS['token_head'][2]} it scores "
        f"{_first_just_trained(token)}{adam}: the authors' head, on the mean of the prompt tokens' outputs (which "
        "this backbone was never trained to give), learns more slowly at SGD lr 0.01 in one epoch; the later "
        f"tasks stay barely predicted with either head ({_diagonals(token)}% with [CLS])."
    ]


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _variants_table(runs: List[Dict[str, Any]]) -> List[str]:
    rows = []
    for method in METHODS:
        for variant in APPLIES[method]:
            found = find(runs, method, variant)
            if not found:
                continue
            n = len(found[0]["accuracy_matrix"]["class_il"])
            diag = [percent_over_seeds([just_trained(r)[t] for r in found]) for t in range(n)]
            final = [percent_over_seeds([r["accuracy_matrix"]["class_il"][-1][t] for r in found]) for t in range(n)]
            oracle = [percent_over_seeds([r["points"][t]["oracle_class_il"][t] for r in found]) for t in range(n)]
            rows.append(
                [
                    display_name(method),
                    VARIANTS[variant][2],
                    ", ".join(str(r["seed"]) for r in found),
                    " / ".join(diag),
                    " / ".join(oracle),
                    " / ".join(final),
                    percent_over_seeds([r["average_accuracy"]["class_il"] for r in found]),
                    percent_over_seeds([r["average_accuracy"]["task_il"] for r in found]),
                ]
            )
    header = [
        "method",
        "variant",
        "seeds",
        "Class-IL right after training, tasks 1-4 (%)",
        "same, the task's own prompts forced at test (%)",
        "Class-IL after the last task (%)",
        "final average Class-IL (%)",
        "final average Task-IL (%)",
    ]
    return _table(header, rows)


def _method_section(run: Dict[str, Any]) -> List[str]:
    """One method's seed-0 default run after its last task: confusion, logits, head, prompt choice."""
    last = run["points"][-1]
    n = len(last["class_il"])
    tasks = [f"task {u + 1}" for u in range(n)]
    out = [
        f"### {display_name(run['method'])}",
        "",
        "Share of each task's test images predicted into each task's "
        "classes (%; rows: the images' task), then the same with each task's own prompts forced at test:",
        "",
    ]
    out += _table(
        ["images of", *(f"into {t}" for t in tasks)], [[tasks[t], *map(_pct, last["confusion"][t])] for t in range(n)]
    )
    out += [""] + _table(
        ["images of (own prompts)", *(f"into {t}" for t in tasks)],
        [[tasks[t], *map(_pct, last["oracle_confusion"][t])] for t in range(n)],
    )
    out += [
        "",
        "Mean over each task's test images of the largest logit among each task's classes (the model's raw "
        "logits), and the head's mean row norm and bias per task's classes:",
        "",
    ]
    out += _table(
        ["images of", *(f"{t}'s classes" for t in tasks)],
        [[tasks[t], *(f"{v:.2f}" for v in last["max_logit"][t])] for t in range(n)],
    )
    out += [
        f"| head row norm | {' | '.join(f'{v:.3f}' for v in last['head_row_norm'])} |",
        f"| head bias, mean over the task's classes | {' | '.join(f'{v:.0e}' for v in last['head_bias'])} |",
        "",
    ]
    sel = last["selection"]
    if run["method"] == "dualprompt":
        out += _table(
            [
                "images of",
                "own E-prompt, per sample (%)",
                "own E-prompt, batch-wise as scored (%)",
                "mean cosine to own key",
                "mean best cosine",
                "E-prompts chosen (batches)",
            ],
            [
                [
                    t,
                    _pct(s["own_per_sample"]),
                    _pct(s["own_batchwise"]),
                    f"{s['own_key_cosine']:.3f}",
                    f"{s['best_key_cosine']:.3f}",
                    json.dumps(s["prompts_chosen"]),
                ]
                for t, s in sel.items()
            ],
        )
    elif run["method"] == "l2p":
        out += _table(
            ["images of", "prompts its training batches used most", "prompts chosen at test (count)"],
            [[t, str(s["trained_with"]), json.dumps(s["prompts_chosen"])] for t, s in sel.items()],
        )
    else:
        out += _table(
            ["images of", *(f"attention mass on {t}'s components (%)" for t in tasks)],
            [[t, *map(_pct, s["mass_per_task"])] for t, s in sel.items()],
        )
    return out + [""]


def steps(record: Dict[str, Any]) -> int:
    """The optimizer steps of a pretraining (its ``.json`` record): batches per epoch (the last one partial)
    times epochs."""
    p = record["settings"]
    return -(-record["train_images"] // p["batch_size"]) * p["epochs"]


def gap_closed(masked_first: float, masked_all: float, unmasked_all: float) -> float:
    """The share of the gap between the masked loss on the page's backbone and the unmasked loss on the
    every-class backbone that the masked loss closes on the every-class backbone (1: all of it, 0: none).
    ``ValueError`` where there is no gap to close."""
    if unmasked_all <= masked_first:
        raise ValueError(f"no gap: unmasked {unmasked_all} is not above masked {masked_first}")
    return (masked_all - masked_first) / (unmasked_all - masked_first)


# The verdict's rule, fixed before the runs: the share of the gap closed (gap_closed) at or above HOLDS: the
# hypothesis holds; at or below FAILS: it does not; between: in part.
HOLDS, FAILS = 2 / 3, 1 / 3


def verdict(closed: float) -> str:
    """The hypothesis's fate in words, from :func:`gap_closed` (:data:`HOLDS`, :data:`FAILS`)."""
    if closed >= HOLDS:
        return "holds"
    if closed > FAILS:
        return "holds in part"
    return "does not hold"


def _later(found: List[Dict[str, Any]]) -> float:
    """The later tasks' Class-IL right after training, averaged over those tasks and the runs."""
    return sum(sum(just_trained(r)[1:]) / (len(just_trained(r)) - 1) for r in found) / len(found)


def _into_first(found: List[Dict[str, Any]]) -> str:
    """The seed-0 run's share of the last task's images predicted into the first task's classes ('n/a' for a
    control, which is not diagnosed)."""
    seed0 = [r for r in found if r["seed"] == 0 and r["points"]]
    return _pct(seed0[0]["points"][-1]["confusion"][-1][0]) if seed0 else "n/a"


def backbone_finding(runs: List[Dict[str, Any]]) -> str:
    """The every-class backbone's result in one sentence, numbers read from the runs ('' without DualPrompt's
    default and unmasked runs on both backbones)."""
    found = {(v, b): find(runs, "dualprompt", v, backbone=b) for v in ("default", "unmasked") for b in BACKBONES}
    if not all(found.values()):
        return ""
    masked_first, masked_all = found[("default", "first")], found[("default", "all")]
    unmasked_first, unmasked_all = found[("unmasked", "first")], found[("unmasked", "all")]
    closed = gap_closed(_later(masked_first), _later(masked_all), _later(unmasked_all))

    def final(runs_: List[Dict[str, Any]]) -> str:
        return percent_over_seeds([r["average_accuracy"]["class_il"] for r in runs_])

    return (
        f"On a backbone pretrained the same way on all 10 classes (standing in for ImageNet-21k's coverage of "
        f"the papers' classes), DualPrompt's masked loss scores tasks 2-4 {_diagonals(masked_all)}% right after "
        f"training instead of {_diagonals(masked_first)}% (unmasked there: {_diagonals(unmasked_all)}%; "
        f"{_pct(closed)}% of the gap closed, so the hypothesis that it needs such a backbone {verdict(closed)}), "
        f"sends {_into_first(masked_all)}% of the last task's images into the first task's classes instead of "
        f"{_into_first(masked_first)}% (seed 0), and ends at {final(masked_all)}% final average Class-IL against "
        f"{final(unmasked_all)}% unmasked ({final(masked_first)}% and {final(unmasked_first)}% on the page's "
        f"backbone)."
    )


def _made_by(commands: Sequence[str], runs: List[Dict[str, Any]]) -> List[str]:
    """The commands' block, then the machine and versions lines of ``runs``' provenance."""
    machine, versions = provenance_lines(r["provenance"] for r in runs)
    return ["```bash", *commands, "```", "", f"{machine}.", f"{versions}.", ""]


def where_errors_go(runs: List[Dict[str, Any]]) -> str:
    """The later tasks' share of images predicted into the first task's classes right after training, DualPrompt
    masked, seed 0, on both backbones ('' without those runs)."""
    found = [find(runs, "dualprompt", "default", 0, b) for b in BACKBONES]
    if not all(found) or not all(f[0]["points"] for f in found):
        return ""
    first, every = (
        " / ".join(_pct(p["confusion"][t][0]) for t, p in enumerate(f[0]["points"]) if t > 0) for f in found
    )
    return (
        f"Right after training, tasks 2-4 send {every}% of their images into the first task's classes "
        f"(DualPrompt masked, seed 0; {first}% on the page's backbone)."
    )


def controls_note(runs: List[Dict[str, Any]]) -> str:
    """The controls' final average Class-IL on both backbones against DualPrompt's masked loss, seed 0 ('' without
    the runs): how much of the gain the backbone gives alone."""
    parts = []
    for method in ("dualprompt", *CONTROLS):
        found = [find(runs, method, "default", 0, b) for b in BACKBONES]
        if not all(found):
            return ""
        first, every = (_pct(f[0]["average_accuracy"]["class_il"]) for f in found)
        parts.append(f"{display_name(method)}{' (masked)' if method == 'dualprompt' else ''} {first}% -> {every}%")
    return (
        "The controls, seed 0, final average Class-IL from the page's backbone to this one: "
        f"{', '.join(parts)}; SimpleCIL trains nothing, so that much of the change is the backbone's alone."
    )


def backbone_section(runs: List[Dict[str, Any]]) -> List[str]:
    """The every-class backbone's test: what was done, the result, and its table ([] before its runs)."""
    text = backbone_finding(runs)
    if not text:
        return []
    records = {}
    for b in BACKBONES:
        with open(os.path.splitext(weights(b))[0] + ".json") as f:
            records[b] = json.load(f)
    every, page = records["all"], records["first"]
    used = [r for r in runs if _backbone(r) == "all" or r["method"] in CONTROLS]
    shas = sorted({r["weights_sha256"] for r in used if _backbone(r) == "all"})
    rows = []
    for method, variants in APPLIES.items():
        for variant in variants:
            if not find(runs, method, variant, backbone="all"):
                continue
            for b in BACKBONES:
                found = find(runs, method, variant, backbone=b)
                if not found:
                    continue
                n = len(found[0]["accuracy_matrix"]["class_il"])
                rows.append(
                    [
                        display_name(method),
                        VARIANTS[variant][2],
                        {"first": "the page's (classes 0-3)", "all": "every class (0-9)"}[b],
                        ", ".join(str(r["seed"]) for r in found),
                        " / ".join(percent_over_seeds([just_trained(r)[t] for r in found]) for t in range(n)),
                        " / ".join(
                            percent_over_seeds([r["accuracy_matrix"]["class_il"][-1][t] for r in found])
                            for t in range(n)
                        ),
                        percent_over_seeds([r["average_accuracy"]["class_il"] for r in found]),
                        percent_over_seeds([r["average_accuracy"]["task_il"] for r in found]),
                        _into_first(found),
                    ]
                )
    header = [
        "method",
        "variant",
        "backbone",
        "seeds",
        "Class-IL right after training, tasks 1-4 (%)",
        "Class-IL after the last task (%)",
        "final average Class-IL (%)",
        "final average Task-IL (%)",
        "last task's images into the first task's classes, seed 0 (%)",
    ]
    val = ", ".join(f"{100 * e['validation_accuracy']:.1f}" for e in every["epochs"])
    return [
        "## The masked loss on a backbone that has seen every class",
        "",
        "**The question.** The papers' backbone (ViT-B pretrained on ImageNet-21k) has seen classes covering "
        "essentially every CIFAR-100 and ImageNet-R class, where the masked loss works; the page's backbone has "
        "seen the first task's 4 classes only. Does the masked loss rely on a backbone whose features already "
        "separate every class, so that with this one the later tasks' images look like the first task's to its "
        "head rows (which the masked loss never trains down)? The measure, and its rule fixed before the runs: "
        "DualPrompt's Class-IL right after training, mean over tasks 2-4 and the seeds; of the gap between the "
        "masked loss on the page's backbone and the unmasked loss on the new one, the share that the masked loss "
        f"closes on the new one ({100 * FAILS:.0f}% or less: the hypothesis does not hold; {100 * HOLDS:.0f}% or "
        "more: it holds; between: in part).",
        "",
        f"**One change.** A second backbone, pretrained by the page's recipe (same architecture, AdamW, seed, "
        f"augmentation, batch) on all 10 classes' training images ({every['train_images']} after holding out "
        f"{100 * every['settings']['validation_ratio']:.0f}%) for {every['settings']['epochs']} epochs: "
        f"{steps(every)} steps, about the page's backbone's {steps(page)} ({page['settings']['epochs']} epochs of "
        f"{page['train_images']}), its head discarded. Validation accuracy per epoch (%): {val}; test accuracy "
        f"on the 10 classes {100 * every['test_accuracy']:.2f}% "
        f"(`{os.path.relpath(os.path.splitext(weights('all'))[0], ROOT)}.json`). Every run on it used the "
        f"weights of sha256 {', '.join(f'`{s[:16]}…`' for s in shas)} (recorded per run in the JSON). The "
        "continual runs are otherwise the page's. Made by:",
        "",
        *_made_by(BACKBONE_RUNS_MADE_BY, used),
        f"**Result.** {text} {where_errors_go(runs)} {controls_note(runs)}".rstrip(),
        "",
        *_table(header, rows),
    ]


def render() -> str:
    """The markdown section from the raw results."""
    runs = load()
    page = [r for r in runs if _backbone(r) == "first" and r["method"] in METHODS]  # the rest: their section's
    lines = [
        "# Why the prompt methods' later tasks are barely predicted (Class-IL)",
        "",
        "<!-- Generated by `python benchmarks/prompt_diagnosis.py render` from "
        "benchmarks/results/prompt_diagnosis.json; do not edit by hand. -->",
        "",
        "The protocol of REPRODUCIBILITY-pretrained.md (its backbone, 4 tasks of Fashion-MNIST, batch 32, 1 epoch, "
        "SGD at lr 0.01, 6000 training images per task, every test image), each run diagnosed after every task. "
        "A variant changes one setting of the default row; each run's experiment-program command is in the JSON. "
        "\"Own prompts forced\": DualPrompt's E-prompt t for task t's images, L2P's top-k prompts most used by "
        "task t's training batches, CODA-Prompt's components of tasks 1..t only (those in use while task t "
        "trained). Made by:",
        "",
        *_made_by(RUNS_MADE_BY, page),
        "**Finding.** " + finding(runs) if finding(runs) else "",
        "",
        *evidence(runs),
        "",
        "## Per task, per variant",
        "",
        *_variants_table(runs),
        "",
        "## After the last task (seed 0, default row)",
        "",
    ]
    for method in METHODS:
        for run in find(runs, method, "default", 0):
            lines += _method_section(run)
    lines += backbone_section(runs)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("run", "render"))
    parser.add_argument("--variants", nargs="*", default=None, help="method:variant pairs (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--dataset_dir", default="datasets")
    parser.add_argument("--backbone", choices=BACKBONES, default="first",
                        help="the page's backbone, or the one pretrained on every class")  # fmt: skip
    args = parser.parse_args(argv)
    if args.action == "run":
        run(args.variants, args.seeds, args.dataset_dir, args.backbone)
    text = render()  # from the raw results only, so a render alone reproduces the page
    with open(OUTPUT_MD, "w") as f:
        f.write(text)
    print(f"written {os.path.relpath(OUTPUT_MD, ROOT)}")


if __name__ == "__main__":
    main()
