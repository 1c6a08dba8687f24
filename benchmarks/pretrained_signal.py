"""The pretrained family's accuracy signal on Fashion-MNIST, in the "large first task" setting (issue 24).

No pretrained weights, CIFAR-100 or ImageNet-R can be fetched where Synapse is developed, so this checks that
the methods on pretrained backbones *function* (learn new classes from a backbone that has never seen them,
and keep the old ones) on data that is here; it does not reproduce the papers' numbers.

1. ``pretrain``: a small random-init ViT (timm ``vit_tiny_patch16_224`` at 28x28, patches of 7, 4 blocks of
   width 64) is trained jointly on Fashion-MNIST's first 4 classes (the first task's), with a 4-way head.
2. ``run``: from that backbone, with a new 10-way head, the experiment program learns all 10 classes as 4
   tasks (4 + 3 x 2 classes): every method of the catalog's ``pretrained`` family (their defaults), plain
   fine-tuning and ER (buffer 200), and joint training as the bound, over 3 seeds, one thread per run.
3. ``render``: REPRODUCIBILITY-pretrained.md from the raw runs, with the published numbers (not run here).

    python benchmarks/pretrained_signal.py pretrain      # -> benchmarks/results/pretrained_signal_vit.pt (+ .json)
    python benchmarks/pretrained_signal.py pretrain --classes all   # -> ..._vit_all.pt: prompt_diagnosis.py's
    python benchmarks/pretrained_signal.py run           # -> benchmarks/results/pretrained_signal_runs.jsonl, render
    python benchmarks/pretrained_signal.py run --methods simplecil --seeds 0   # a part; finished runs are reused
    python benchmarks/pretrained_signal.py render        # runs nothing

Each run is the experiment program's (``Experiment(Config(...))``); :func:`command` prints the equivalent
``python -m synapse.experiments`` line. A method that joins the family (a new file in ``synapse/pretrained/``)
gets its row with no edit here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _runner import (  # noqa: E402
    ROOT,
    Cache,
    display_name,
    file_sha256,
    percent_over_seeds,
    provenance,
    provenance_lines,
    resolved_config,
    run_jobs,
    same_config,
)
from synapse import catalog  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
WEIGHTS = os.path.join(RESULTS, "pretrained_signal_vit.pt")
RUNS = os.path.join(RESULTS, "pretrained_signal_runs.jsonl")
OUTPUT = os.path.join(ROOT, "REPRODUCIBILITY-pretrained.md")

# The setting, in one place: the pretraining and every run read it.
MODEL = "timm:vit_tiny_patch16_224"
MODEL_ARGS: Dict[str, Any] = {"patch_size": 7, "depth": 4, "embed_dim": 64, "num_heads": 4}
DATASET = "fashion-mnist"
FIRST_TASK_CLASSES, CLASSES_PER_TASK = 4, 2
MAX_TRAIN_PER_TASK = 6000  # CPU-sized: the first 6000 training images of each task (test sets whole)
ER_BUFFER = 200
SEEDS = (0, 1, 2)
# The methods whose defaults do not fit this backbone or machine, the values used instead and why (on the page).
ADAPTED: Dict[str, Tuple[Dict[str, Any], str]] = {
    # DualPrompt's E-prompt sits in blocks 2-4 of ViT-B's 12 (Wang et al. 2022): block 4 is not here.
    "dualprompt": ({"e_prompt_layers": "2,3"}, "its default's block 4 is not in this 4-block backbone"),
    # M = 10000 (McDonnell et al. 2023) makes each task end a 10000 x 10000 eigendecomposition in double
    # precision: minutes of one CPU thread, four times a run; 2000 is still 31 times the 64 features.
    # CODA-Prompt prefixes blocks 0-4 of ViT-B's 12 (Smith et al. 2023): here the 4 blocks there are, as
    # DualPrompt's G- and E-prompts above together cover all 4.
    "coda-prompt": ({"prompt_layers": 4}, "its default's blocks 0-4 are more than this backbone's 4"),
    "ranpac": ({"projection_dim": 2000}, "the paper's 10000 makes each task end minutes of one CPU thread"),
}
# The second rows: each trained row's SGD lr chosen on a validation split (never the test set), from the
# program's default for a pretrained model and about 3, 10 and 30 times it, at seed 0 with a tenth of each
# task's training images held out and scored instead of the test set. A row whose choice is the default keeps
# its one row.
DEFAULT_LR = 0.01
LR_GRID = (DEFAULT_LR, 0.03, 0.1, 0.3)
TUNE_SEED, VALIDATION_RATIO = 0, 0.1
# The third rows: the prompt methods under their authors' optimizer, lr, schedule and gradient clipping, read
# from the authors' code (all three re-create it at each task, as the program's optimizer state restarts), at
# this page's batch 32 and 1 epoch per task. The values and their sources are on the page.
AUTHORS_OPTIMIZER: Dict[str, Tuple[Dict[str, Any], str]] = {
    "l2p": (
        {"optimizer": "adam", "lr": 0.00375, "clip_grad_norm": 1.0},
        "`JH-LEE-KR/l2p-pytorch`, `configs/cifar100_l2p.py`: `--opt adam` (timm's `create_optimizer`), betas "
        "(0.9, 0.999), `--lr 0.03`, `--weight-decay 0`, `--sched constant`, `--reinit_optimizer True`; `main.py` "
        "scales the lr by batch/256 (`unscale_lr`: 0.03 x 16/256 at their batch 16), so at batch 32: "
        "0.03 x 32/256 = 0.00375. `--clip-grad 1.0`: `engine.py` clips the total gradient norm of "
        "`model.parameters()` (the trained ones: the frozen have no gradient) to 1.0 between `loss.backward()` and "
        "`optimizer.step()`, as `--clip_grad_norm 1.0` does over the optimizer's parameters",
    ),
    "dualprompt": (
        {"optimizer": "adam", "lr": 0.00375, "clip_grad_norm": 1.0},
        "`JH-LEE-KR/dualprompt-pytorch`, `configs/cifar100_dualprompt.py`: the same optimizer settings as L2P's "
        "(Adam, betas (0.9, 0.999), `--lr 0.03`, weight decay 0, constant, re-created per task), the same "
        "batch/256 scaling in `main.py` (0.03 x 24/256 at their batch 24), so at batch 32: 0.00375, and the same "
        "clipping (`--clip-grad 1.0`, in `engine.py` as L2P's)",
    ),
    "coda-prompt": (
        {"optimizer": "adam", "lr": 0.001, "lr_schedule": "cosine"},
        "`GT-RIPL/CODA-Prompt`, `configs/cifar-100_prompt.yaml`: `optimizer: Adam`, `lr: 0.001`, betas "
        "(`momentum` 0.9, 0.999) in `learners/prompt.py`, `weight_decay: 0`, `schedule_type: cosine` (their "
        "`utils/schedulers.py` `CosineSchedule`, stepped per epoch and rebuilt with the optimizer at every task: "
        "`learners/default.py`, `reset_optimizer`), batch 128. Their code scales no lr by the batch, so 0.001 as "
        "given. The cosine runs per step over each task's steps: per epoch it would be constant over one epoch. "
        "No clipping: `learners/prompt.py` steps right after `total_loss.backward()`",
    ),
}
# Pretraining: AdamW, as ViTs are commonly trained from scratch (e.g. DeiT, Touvron et al. 2021); fixed
# epochs, with the accuracy on a held-out tenth of the first task's training images recorded per epoch.
PRETRAIN = {"epochs": 10, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.05, "augment": True, "seed": 0,
            "validation_ratio": 0.1}  # fmt: skip
# A second backbone for prompt_diagnosis.py's test of the masked loss: the same recipe on every class's
# training images (standing in for ImageNet-21k's coverage of the papers' classes), its head discarded too.
# 4 epochs of its 54000 images are about the 10 epochs of 21600 above: the same images seen, 3376 steps to
# 3380. Its head is not saved: being 10-way, --pretrained would load it into the continual model's head (the
# first backbone's 4-way head is left out by its shape).
WEIGHTS_ALL = os.path.join(RESULTS, "pretrained_signal_vit_all.pt")
PRETRAIN_CLASSES = {
    "first": (WEIGHTS, {**PRETRAIN}),
    "all": (WEIGHTS_ALL, {**PRETRAIN, "epochs": 4, "save_head": False}),
}


def _pretraining_data(dataset_dir: str, classes: str) -> Tuple[Any, ...]:
    """``(spec, train_x, train_y, test_x, test_y)``: the first task's images, or (``classes="all"``) every
    task's, concatenated."""
    import torch

    from synapse.experiments.datasets import load_tasks

    spec, tensors, _ = load_tasks(
        DATASET, dataset_dir, classes_per_task=CLASSES_PER_TASK, first_task_classes=FIRST_TASK_CLASSES
    )
    parts = tensors[:1] if classes == "first" else tensors
    return (spec, *(torch.cat(column) for column in zip(*parts)))


def without_head(state: Dict[str, Any], keep: bool = False) -> Dict[str, Any]:
    """``state`` less its classifier's tensors (timm's ``head.``), unless ``keep``."""
    return dict(state) if keep else {k: v for k, v in state.items() if not k.startswith("head.")}


# ---------------------------------------------------------------------------------------------- pretrain
def pretrain(dataset_dir: str, classes: str = "first") -> Dict[str, Any]:
    """Train the ViT jointly on the first task's classes (or ``classes="all"``: every class, see
    :data:`PRETRAIN_CLASSES`); save its weights and what was done (settings, per-epoch validation accuracy, test
    accuracy on those classes, provenance) beside them."""
    import torch
    import torch.nn.functional as F

    from synapse.augment import random_crop_flip
    from synapse.experiments.models import Normalize, create_model, weights_statistics

    if classes not in PRETRAIN_CLASSES:
        raise SystemExit(f"pretrained_signal.py: --classes {classes!r}; choose from {sorted(PRETRAIN_CLASSES)}")
    path, p = PRETRAIN_CLASSES[classes]
    torch.set_num_threads(1)
    spec, train_x, train_y, test_x, test_y = _pretraining_data(dataset_dir, classes)
    n_classes = int(train_y.max()) + 1
    torch.manual_seed(p["seed"])
    gen = torch.Generator().manual_seed(p["seed"])
    perm = torch.randperm(len(train_y), generator=gen)
    n_val = int(round(p["validation_ratio"] * len(train_y)))
    val_x, val_y, train_x, train_y = (
        train_x[perm[:n_val]],
        train_y[perm[:n_val]],
        train_x[perm[n_val:]],
        train_y[perm[n_val:]],
    )
    model = create_model(MODEL, spec.in_channels, spec.image_size, n_classes, (0.0,), (1.0,),
                         model_args=MODEL_ARGS)  # fmt: skip
    # The statistics --pretrained will normalise with (the weights' own: a timm model's pretrained_cfg).
    mean, std = weights_statistics(model.backbone)
    model.normalize = Normalize(mean, std)
    optimizer = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])

    @torch.no_grad()
    def accuracy(x: torch.Tensor, y: torch.Tensor) -> float:
        model.eval()
        correct = sum(int((model(x[i : i + 512]).argmax(1) == y[i : i + 512]).sum()) for i in range(0, len(y), 512))
        model.train()
        return correct / len(y)

    log: List[Dict[str, float]] = []
    start = time.perf_counter()
    for epoch in range(p["epochs"]):
        order = torch.randperm(len(train_y), generator=gen)
        for i in range(0, len(order), p["batch_size"]):
            idx = order[i : i + p["batch_size"]]
            x = random_crop_flip(train_x[idx], gen) if p["augment"] else train_x[idx]
            loss = F.cross_entropy(model(x), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        log.append({"epoch": epoch + 1, "validation_accuracy": accuracy(val_x, val_y)})
        print(
            f"pretrain epoch {epoch + 1}: validation accuracy {100 * log[-1]['validation_accuracy']:.2f}%", flush=True
        )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(without_head(model.backbone.state_dict(), p.get("save_head", True)), path)
    record = {
        "model": MODEL,
        "model_args": MODEL_ARGS,
        "classes": list(range(n_classes)),
        "train_images": len(train_y),
        "settings": p,
        "normalization": {"mean": list(mean), "std": list(std)},
        "epochs": log,
        ("test_accuracy_first_task" if classes == "first" else "test_accuracy"): accuracy(test_x, test_y),
        "seconds": time.perf_counter() - start,
        "sha256": file_sha256(path),
        "provenance": provenance(),
    }
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(record, f, indent=2)
    print(f"written {path}: test accuracy on classes 0-{n_classes - 1} {100 * accuracy(test_x, test_y):.2f}%")
    return record


# --------------------------------------------------------------------------------------------------- runs
Row = Tuple[str, Optional[int]]  # (method or baseline, buffer)


def rows(methods: Optional[Sequence[str]] = None) -> List[Row]:
    """Fine-tuning, ER, every method of the catalog's pretrained family (table order), then joint."""
    family = sorted((s for s in catalog.specs() if s.family == "pretrained"), key=lambda s: s.order)
    found: List[Row] = [("sequential", None), ("er", ER_BUFFER), *((s.name, None) for s in family), ("joint", None)]
    if methods:
        unknown = sorted(set(methods) - {m for m, _ in found})
        if unknown:
            raise SystemExit(f"pretrained_signal.py: unknown method(s) {unknown}; choose from {[m for m, _ in found]}")
        found = [r for r in found if r[0] in methods]
    return found


def tunable(methods: Optional[Sequence[str]] = None) -> List[Row]:
    """The rows whose lr matters: fine-tuning, ER and every method that trains parameters (not joint, the
    reference, nor the methods on frozen features, which train nothing)."""
    from synapse.pretrained._frozen import FrozenFeatureMethod

    def trains(method: str) -> bool:
        return method in ("sequential", "er") or not issubclass(catalog.get(method).cls, FrozenFeatureMethod)

    return [r for r in rows(methods) if r[0] != "joint" and trains(r[0])]


def config(
    method: str,
    buffer: Optional[int],
    seed: int,
    weights: str,
    dataset_dir: str = "datasets",
    lr: Optional[float] = None,
    validation: bool = False,
    authors: bool = False,
) -> Any:
    """The experiment program's configuration of one row: the protocol's defaults for a pretrained model
    (lr 0.01, batch 32, 1 epoch per task), the method's catalog defaults; ``lr`` in place of the default,
    ``validation``: score the held-out part of the training images, not the test set (for choosing ``lr``),
    and ``authors``: the method's :data:`AUTHORS_OPTIMIZER` settings (optimizer, lr, schedule, clipping)."""
    from synapse.experiments.run import Config

    baseline = method in ("sequential", "joint")
    held_out = {"validation_ratio": VALIDATION_RATIO, "evaluate_on": "validation"} if validation else {}
    optimizer = {"lr": lr, **(AUTHORS_OPTIMIZER[method][0] if authors else {})}
    return Config(
        dataset=DATASET,
        dataset_dir=dataset_dir,
        model=MODEL,
        model_args=dict(MODEL_ARGS),
        pretrained=weights,
        first_task_classes=FIRST_TASK_CLASSES,
        classes_per_task=CLASSES_PER_TASK,
        max_train_per_task=MAX_TRAIN_PER_TASK,
        training_type=method if baseline else "continual",
        synapse_type="er" if baseline else method,
        method_args=dict(ADAPTED[method][0]) if method in ADAPTED else {},
        buffer_size=buffer or 1,
        seed=seed,
        device="cpu",
        threads=1,
        quiet=True,
        **held_out,
        **optimizer,
    )


def command(
    method: str, buffer: Optional[int], seed: int, weights: str, lr: Optional[float] = None, authors: bool = False
) -> str:
    """The ``python -m synapse.experiments`` line of one row (``authors``: a third row's settings as flags)."""
    baseline = method in ("sequential", "joint")
    args = [
        f"--dataset {DATASET} --first_task_classes {FIRST_TASK_CLASSES} --classes_per_task {CLASSES_PER_TASK}",
        f"--max_train_per_task {MAX_TRAIN_PER_TASK} --model {MODEL}",
        "--model_args " + " ".join(f"{k}={v}" for k, v in MODEL_ARGS.items()),
        f"--pretrained {os.path.relpath(weights, ROOT)}",
        f"--training_type {method}" if baseline else f"--synapse_type {method}",
        f"--buffer_size {buffer}" if buffer else "",
        " ".join(f"--{k} {v}" for k, v in ADAPTED[method][0].items()) if method in ADAPTED else "",
        f"--lr {lr}" if lr is not None else "",
        " ".join(f"--{k} {v}" for k, v in AUTHORS_OPTIMIZER[method][0].items()) if authors else "",
        f"--seed {seed} --device cpu --threads 1",
    ]
    return "python -m synapse.experiments " + " ".join(a for a in args if a)


def _key(
    method: str,
    buffer: Optional[int],
    seed: int,
    weights_sha: str,
    lr: Optional[float] = None,
    validation: bool = False,
    authors: bool = False,
) -> Dict[str, Any]:
    """What makes a run the same run: the row, the seed, the setting, the backbone's bytes, and an lr other than
    the default, a validation score or the authors' optimizer settings where the run has them (``None`` where
    not, as in the runs made before);
    and the whole configuration the experiment resolves it to (``_runner.resolved_config``), so that a changed
    default of the method or the protocol runs it again."""
    setting = {"model_args": MODEL_ARGS, "first": FIRST_TASK_CLASSES, "per_task": CLASSES_PER_TASK,
               "max_train": MAX_TRAIN_PER_TASK}  # fmt: skip
    if method in ADAPTED:
        setting["method_args"] = ADAPTED[method][0]
    return {"method": method, "buffer": buffer, "seed": seed, "weights_sha256": weights_sha, "setting": setting,
            "lr": lr, "validation_ratio": VALIDATION_RATIO if validation else None,
            "authors_optimizer": AUTHORS_OPTIMIZER[method][0] if authors else None,
            "config": resolved_config(config(method, buffer, seed, WEIGHTS, lr=lr, validation=validation,
                                             authors=authors))}  # fmt: skip


def _matches(entry: Dict[str, Any], key: Dict[str, Any]) -> bool:
    return all(same_config(entry.get(k), v) if k == "config" else entry.get(k) == v for k, v in key.items())


Job = Tuple[str, Optional[int], int, str, str, str, Dict[str, str], Optional[float], bool, bool]


def _worker(job: Job) -> Dict[str, Any]:
    import torch

    from synapse.experiments.run import Experiment

    torch.set_num_threads(1)
    method, buffer, seed, weights, sha, dataset_dir, made_by, lr, validation, authors = job
    start = time.perf_counter()
    r = Experiment(config(method, buffer, seed, weights, dataset_dir, lr, validation, authors)).run()
    keep = (
        "average_accuracy",
        "forgetting",
        "accuracy_matrix",
        "test_samples_per_task",
        "predictor",
        "head_average_accuracy",
    )
    return {
        **_key(method, buffer, seed, sha, lr, validation, authors),
        "result": {k: r.get(k) for k in keep},
        "wall_time_s": time.perf_counter() - start,
        "provenance": made_by,  # the code the workers imported when the pool started, not the tree's now
    }


def chosen_lrs(entries: List[Dict[str, Any]], sha: str) -> Dict[Row, Dict[float, float]]:
    """Each tunable row's validation scores (final Class-IL average on the held-out images) by lr, for the rows
    whose whole grid has run."""
    scores: Dict[Row, Dict[float, float]] = {}
    for method, buffer in tunable():
        found = {}
        for lr in LR_GRID:
            runs = [e for e in entries if _matches(e, _key(method, buffer, TUNE_SEED, sha, lr, validation=True))]
            if runs:
                found[lr] = runs[-1]["result"]["average_accuracy"]["class_il"]
        if len(found) == len(LR_GRID):
            scores[(method, buffer)] = found
    return scores


def best_lr(scores: Dict[float, float]) -> float:
    """The lr of the highest validation score; a tie goes to the earlier grid point (the default first)."""
    return max(LR_GRID, key=lambda lr: (scores[lr], -LR_GRID.index(lr)))


def _missing(entries: List[Dict[str, Any]], keys: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [k for k in keys if not any(_matches(e, k) for e in entries)]


def run(methods: Optional[Sequence[str]], seeds: Sequence[int], workers: int, dataset_dir: str) -> None:
    """The rows at ``seeds``; then each tunable row's lr grid on the validation split; then, at ``seeds``, the
    second rows of those whose best lr is not the default, and the third rows (:data:`AUTHORS_OPTIMIZER`).
    Finished runs (in the raw file) are not run again."""
    if not os.path.exists(WEIGHTS):
        raise SystemExit(f"no backbone at {WEIGHTS}: run `python benchmarks/pretrained_signal.py pretrain` first")
    sha = file_sha256(WEIGHTS)
    made_by = provenance(threads=1)  # each run sets one thread (its config), not this process's
    cache = Cache(RUNS)

    def run_keys(keys: List[Dict[str, Any]]) -> None:
        todo = _missing(cache.entries(), keys)
        print(f"{len(todo)} run(s) to do", flush=True)
        jobs = [(k["method"], k["buffer"], k["seed"], WEIGHTS, sha, dataset_dir, made_by, k["lr"],
                 k["validation_ratio"] is not None, k["authors_optimizer"] is not None) for k in todo]  # fmt: skip
        for entry in run_jobs(_worker, jobs, workers):
            cache.append(entry)
            acc = entry["result"]["average_accuracy"]
            what = (f", lr {entry['lr']}" if entry["lr"] is not None else "") + (
                ", validation" if entry["validation_ratio"] else "") + (
                f", {entry['authors_optimizer']}" if entry["authors_optimizer"] else "")  # fmt: skip
            print(f"  {entry['method']:<12} seed {entry['seed']}{what}: Class-IL {100 * acc['class_il']:.2f}%  "
                  f"({entry['wall_time_s']:.0f} s)", flush=True)  # fmt: skip

    run_keys([_key(m, b, seed, sha) for m, b in rows(methods) for seed in seeds])
    grid = [_key(m, b, TUNE_SEED, sha, lr, validation=True) for m, b in tunable(methods) for lr in LR_GRID]
    run_keys(grid)
    second = []
    for (m, b), scores in chosen_lrs(cache.entries(), sha).items():
        lr = best_lr(scores)
        if lr != DEFAULT_LR and (methods is None or m in methods):
            second += [_key(m, b, seed, sha, lr) for seed in seeds]
    run_keys(second)
    third = [m for m, _ in rows(methods) if m in AUTHORS_OPTIMIZER]
    run_keys([_key(m, None, seed, sha, authors=True) for m in third for seed in seeds])


# ------------------------------------------------------------------------------------------------- render
def test_counts(dataset_dir: str = "datasets") -> List[int]:
    """Each task's test images, counted from the split (for runs saved before their results kept it)."""
    from synapse.experiments.datasets import load_tasks

    _, tensors, _ = load_tasks(
        DATASET, dataset_dir, classes_per_task=CLASSES_PER_TASK, first_task_classes=FIRST_TASK_CLASSES
    )
    return [len(test_y) for *_, test_y in tensors]


def overall_accuracy(result: Dict[str, Any], counts: Optional[List[int]] = None) -> float:
    """Class-IL accuracy over every test image of the 10 classes after the last task (each task weighted by
    its test images; the program's average weighs the 4-class first task like a 2-class one). ``counts``:
    the test images per task where the result lacks them."""
    last = result["accuracy_matrix"]["class_il"][-1]
    counts = result.get("test_samples_per_task") or counts
    if counts is None:
        raise ValueError("the result records no test images per task: pass counts")
    return sum(a * n for a, n in zip(last, counts)) / sum(counts)


def _authors_label(method: str) -> str:
    """A third row's settings in words: "Adam, lr 0.001, cosine", "Adam, lr 0.00375, clip 1.0"."""
    values = AUTHORS_OPTIMIZER[method][0]
    optimizer = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}[values["optimizer"]]
    schedule = values.get("lr_schedule", "constant")
    clip = values.get("clip_grad_norm")
    return (
        f"{optimizer}, lr {values['lr']}"
        + (f", {schedule}" if schedule != "constant" else "")
        + (f", clip {clip}" if clip is not None else "")
    )


def table(
    entries: List[Dict[str, Any]], sha: str, counts: Optional[List[int]] = None
) -> Tuple[List[str], List[Dict[str, Any]]]:
    """The results table over seeds, rows in :func:`rows` order (runs of another backbone or setting are left
    out), and the entries it used."""
    used: List[Dict[str, Any]] = []
    lines = [
        "| method | Class-IL, final average over tasks (%) | Class-IL, all test images (%) | Task-IL (%) | "
        "forgetting, Class-IL (%) | seeds | s/run |",
        "|---|---|---|---|---|---|---|",
    ]
    lrs = {row: best_lr(scores) for row, scores in chosen_lrs(entries, sha).items()}
    for method, buffer in rows():
        name = display_name(method) + (f", buffer {buffer}" if buffer else "")
        variants: List[Tuple[str, Optional[float], bool]] = [(name, None, False)]
        if lrs.get((method, buffer), DEFAULT_LR) != DEFAULT_LR:
            lr = lrs[(method, buffer)]
            variants.append((f"{name}, lr {lr} (chosen on a validation split)", lr, False))
        if method in AUTHORS_OPTIMIZER:
            variants.append((f"{name}, {_authors_label(method)} (its authors')", None, True))
        for label, lr, authors in variants:
            runs = [e for e in entries if _matches(e, _key(method, buffer, e["seed"], sha, lr, authors=authors))]
            runs = list({e["seed"]: e for e in runs}.values())  # a seed run twice: its latest
            if not runs:
                continue
            used += runs
            res = [e["result"] for e in runs]
            forgetting = [r["forgetting"]["class_il"] for r in res]
            lines.append(
                f"| {label} | {percent_over_seeds([r['average_accuracy']['class_il'] for r in res], 2)} | "
                f"{percent_over_seeds([overall_accuracy(r, counts) for r in res], 2)} | "
                f"{percent_over_seeds([r['average_accuracy']['task_il'] for r in res], 2)} | "
                f"{percent_over_seeds(forgetting, 2) if None not in forgetting else 'n/a'} | {len(runs)} | "
                f"{statistics.mean(e['wall_time_s'] for e in runs):.0f} |"
            )
    return lines, used


def validation_table(entries: List[Dict[str, Any]], sha: str) -> List[str]:
    """The lr grid's validation scores of each tunable row (seed 0), and the lr chosen."""
    scores = chosen_lrs(entries, sha)
    if not scores:
        return []
    lines = [
        "| row | " + " | ".join(f"lr {lr}" for lr in LR_GRID) + " | chosen |",
        "|---|" + "---|" * (len(LR_GRID) + 1),
    ]
    for (method, buffer), by_lr in scores.items():
        name = display_name(method) + (f", buffer {buffer}" if buffer else "")
        cells = " | ".join(f"{100 * by_lr[lr]:.2f}" for lr in LR_GRID)
        lines.append(f"| {name} | {cells} | {best_lr(by_lr)} |")
    return lines


# The papers' numbers (issue 24's table), each with its source and ImageNet-R split; none of them was run here.
PUBLISHED = [
    ("L2P", "Wang et al., CVPR 2022", "83.83", "61.57", "ViT-B/16 IN-21k (`vit_base_patch16_224.augreg_in21k`)",
     "`JH-LEE-KR/l2p-pytorch`; L2P's paper has no ImageNet-R result: 61.57 is L2P as run in DualPrompt's paper, "
     "on DualPrompt's split (below)"),
    ("DualPrompt", "Wang et al., ECCV 2022", "86.51", "68.13", "same", "`JH-LEE-KR/dualprompt-pytorch`; ImageNet-R: "
     "a random 80/20 train/test split of all its images (`torch.utils.data.random_split`), 10 tasks of 20 classes"),
    ("CODA-Prompt", "Smith et al., CVPR 2023", "86.33", "–", "`vit_base_patch16_224.augreg_in21k_ft_in1k`",
     "`GT-RIPL/CODA-Prompt`; the paper's ImageNet-R results use its own split and are not in issue 24's table"),
    ("RanPAC", "McDonnell et al., NeurIPS 2023", "92.2", "77.9", "IN-21k (CIFAR), IN-21k→1k (ImageNet-R)",
     "`RanPAC/RanPAC` (`paper_tables/`, `args/*_publish.csv`); with its first-session adaptation (Phase 1), "
     "which Synapse's RanPAC does not do: its ablation without Phase 1 gives 89.0 and 71.8; ImageNet-R: Zhou "
     "et al.'s prepared train/test split (RevisitingCIL), 10 tasks of 20 classes"),
    ("SLCA", "Zhang et al., ICCV 2023", "91.53", "77.00", "IN-21k",
     "`GengDavid/SLCA` (`exps/slca/slca_imgnetr.json`); ImageNet-R: `train/` and `val/` folders prepared beforehand "
     "(the repository ships no split), 10 tasks of 20 classes"),
    ("SimpleCIL", "Zhou et al., IJCV 2024", "about 81.3", "about 54.6", "IN-21k",
     "`zhoudw-zdw/RevisitingCIL` (`exps/simplecil/`: 20 tasks of 5 on CIFAR, 40 of 5 on ImageNet-R; prototypes do "
     "not depend on the split, so neither does the final accuracy); ImageNet-R: its prepared train/test split"),
]  # fmt: skip


PROTOCOL_COMMANDS = """\
Where the data and a weights file exist (nothing is downloaded), the papers' protocols run through the same
program; the input is resized on the device to the ViT's 224 (`--input_size 224`), the data and the memory
stay uint8 at their own size:

```bash
# CIFAR-100, 10 tasks of 10 classes (the dataset's default split), ViT-B/16 with your IN-21k weights
python -m synapse.experiments --dataset cifar100 --model timm:vit_base_patch16_224 \\
    --pretrained vit_base_patch16_224.augreg_in21k.safetensors --input_size 224 \\
    --synapse_type ranpac --num_epochs 1 --device cuda
# ImageNet-R (a folder of 200 class folders), 10 tasks of 20 classes (or 20 of 10: --classes_per_task 10),
# the train/test split of CODA-Prompt's lists (imagenet-r_train.yaml, imagenet-r_test.yaml, which you bring),
# images read at 224
python -m synapse.experiments --dataset folder:/data/imagenet-r --image_size 224 --split_dir /data/splits \\
    --classes_per_task 20 --model timm:vit_base_patch16_224 \\
    --pretrained vit_base_patch16_224.augreg_in21k.safetensors --synapse_type simplecil --device cuda
```

The papers' ImageNet-R splits differ: CODA-Prompt ships fixed lists (`--split_dir`, or the lists beside the
tree, reads them; docs/vision.md), while L2P's and DualPrompt's code splits the tree 80/20 at random under
their seed. Without lists, `--test_fraction` (default 0.2) holds out a seeded share of every class, which is
no paper's own split: compare with them as an approximation. The epochs, learning
rate and batch size of each paper's recipe are the method's (see its section in docs/methods/pretrained.md
and its preset); the closed-form methods (SimpleCIL, RanPAC) train nothing and need one pass per task."""


def diagnosis_note() -> str:
    """A paragraph naming the established cause of the prompt methods' low Class-IL, with its numbers from
    benchmarks/prompt_diagnosis.py's raw results, and linking its page ('' where it has not been run)."""
    import textwrap

    from prompt_diagnosis import backbone_finding, finding, load

    runs = load()
    text = finding(runs)
    if not text:
        return ""
    backbone = backbone_finding(runs)
    paragraph = (
        f"**Why the prompt methods' later tasks score near 0% Class-IL.** {text}{' ' + backbone if backbone else ''}"
        " Their diagnosis (task-level confusion, prompt choice, logits, variants): "
        "`benchmarks/results/prompt_diagnosis.md`."
    )
    return textwrap.fill(paragraph, width=115, break_long_words=False, break_on_hyphens=False) + "\n\n"


def render(path: str = OUTPUT, dataset_dir: str = "datasets") -> str:
    entries = Cache(RUNS).entries()
    with open(os.path.splitext(WEIGHTS)[0] + ".json") as f:
        backbone = json.load(f)
    sha = backbone["sha256"]
    lacking = any("test_samples_per_task" not in e["result"] for e in entries)
    lines, used = table(entries, sha, test_counts(dataset_dir) if lacking else None)
    validation = validation_table(entries, sha)
    grid = ", ".join(map(str, LR_GRID))
    tuning = (
        f"""**Second rows: the lr chosen on a validation split.** Every row that trains by SGD (fine-tuning, ER and
the methods with trainable parameters) ran once more at seed {TUNE_SEED} for each lr in {{{grid}}}, with
{100 * VALIDATION_RATIO:.0f}% of each task's training images held out and scored in place of the test set (the
test images are not read). A row whose best lr is not the default {DEFAULT_LR} gets a second row at that lr,
over the same seeds. Final Class-IL average on the held-out images (%):

{chr(10).join(validation)}
"""
        if validation
        else ""
    )
    third = [m for m, _ in rows() if m in AUTHORS_OPTIMIZER]
    authors = f"""**Third rows: the authors' optimizer.** {", ".join(display_name(m) for m in third)} once more under
the optimizer, lr, schedule and gradient clipping of their authors' code, over the same seeds, batch 32 and 1 epoch
per task as the other rows (the authors train 5 epochs at batch 16 or 24 (L2P, DualPrompt) and 20 at batch 128
(CODA-Prompt) on CIFAR-100). The program re-creates the optimizer's state at each task, as all three authors' code
does. Each value and where it comes from:

| row | settings | source |
|---|---|---|
""" + "\n".join(f"| {display_name(m)} | {_authors_label(m)} | {AUTHORS_OPTIMIZER[m][1]} |" for m in third)
    machine, versions = provenance_lines([e.get("provenance") for e in used])
    p = backbone["settings"]
    val = ", ".join(f"{100 * e['validation_accuracy']:.1f}" for e in backbone["epochs"])
    args = " ".join(f"{k}={v}" for k, v in MODEL_ARGS.items())
    adapted = "".join(
        f"; {display_name(m)} with {', '.join(f'`{k}={v}`' for k, v in values.items())} ({why})"
        for m, (values, why) in ADAPTED.items()
        if m in catalog.names()
    )
    text = (
        f"""# Reproducibility: methods on pretrained backbones

<!-- Generated by `python benchmarks/pretrained_signal.py render` from benchmarks/results/pretrained_signal_runs.jsonl
and benchmarks/results/pretrained_signal_vit.json; do not edit by hand. -->

## An accuracy signal on Fashion-MNIST ("large first task")

**This checks that the methods function, not the published numbers.** Neither pretrained ViT weights nor
CIFAR-100 or ImageNet-R can be fetched where Synapse is developed. So a small ViT is pretrained here on part of
Fashion-MNIST, and the methods then learn the classes it has never seen, as in the class-incremental
literature's "large first task" setting; the numbers below say nothing about ViT-B/16 on CIFAR-100.

**Backbone.** timm `vit_tiny_patch16_224` built with `{args}` (28x28 grey images repeated to 3 channels,
16 patches, random init), trained jointly on classes 0-{FIRST_TASK_CLASSES - 1} (the first task's: T-shirt,
trouser, pullover, dress) with a {FIRST_TASK_CLASSES}-way head: AdamW, lr {p["lr"]}, weight decay
{p["weight_decay"]}, batch {p["batch_size"]}, {p["epochs"]} epochs, random crop and flip, on
{backbone["train_images"]} images ({100 * p["validation_ratio"]:.0f}% of the task's training images held out).
Validation accuracy per epoch (%): {val}; test accuracy on those {FIRST_TASK_CLASSES} classes
{100 * backbone["test_accuracy_first_task"]:.2f}%. Weights: `benchmarks/results/pretrained_signal_vit.pt`
(sha256 `{sha[:16]}…`), made by `python benchmarks/pretrained_signal.py pretrain`
({backbone["seconds"] / 60:.0f} min on one thread of a shared, busy machine).

**Continual runs.** From that backbone with a new 10-way head, the experiment program learns Fashion-MNIST as
{1 + (10 - FIRST_TASK_CLASSES) // CLASSES_PER_TASK} tasks (classes 0-{FIRST_TASK_CLASSES - 1}, then
{(10 - FIRST_TASK_CLASSES) // CLASSES_PER_TASK} tasks of {CLASSES_PER_TASK}), the first {MAX_TRAIN_PER_TASK}
training images of each task, 1 epoch per task, batch 32, every test image; plain SGD at lr {DEFAULT_LR} (the
program's default for a pretrained model; second rows below at an lr chosen on a validation split, third rows
under the prompt methods' authors' optimizer); each method
with its catalog defaults{adapted}.
Class-IL is the single-head accuracy over all classes seen; each method scores with its own predictor where it
has one. Mean ± standard deviation over seeds {", ".join(map(str, SEEDS))}, one thread per run. The
program's final average weighs each task alike (the 4-class first task like a 2-class one); the next column
scores every test image once. Joint trains on every task's data at once, one epoch at the same lr from the
same backbone: a reference, not a tight bound. A frozen backbone with prototypes (SimpleCIL) has nothing
random left to vary with the seed. s/run: wall time of one run on a shared 2-core machine busy with other jobs.

{chr(10).join(lines)}

{diagnosis_note()}{tuning}
{authors}

{machine}.
{versions}.

Runs, for example (a row, and CODA-Prompt's third row):

```bash
{command("simplecil", None, 0, WEIGHTS)}
{command("coda-prompt", None, 0, WEIGHTS, authors=True)}
```

`python benchmarks/pretrained_signal.py run` runs every row (finished runs are reused from the raw file) and
renders this page; a method added to the `pretrained` family gets its row with no edit to the script.

## Published results (not run here)

CIFAR-100 in 10 tasks and ImageNet-R, ViT-B/16, final average accuracy (%), as the papers and the authors'
repositories report them (collected in issue 24). None of these was produced by Synapse.

| method | source | CIFAR-100 10T | ImageNet-R | backbone weights in the source | code, and the ImageNet-R split |
|---|---|---|---|---|---|
"""
        + "\n".join(f"| {' | '.join(row)} |" for row in PUBLISHED)
        + f"""

{PROTOCOL_COMMANDS}
"""
    )
    if path != "-":
        with open(path, "w") as f:
            f.write(text)
        print(f"written {path}")
    return text


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("pretrain", "run", "render"))
    parser.add_argument("--methods", nargs="*", default=None, help="rows to run (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--dataset_dir", default="datasets")
    parser.add_argument("--output", default=OUTPUT, help="the rendered page ('-': print only)")
    parser.add_argument("--classes", choices=sorted(PRETRAIN_CLASSES), default="first",
                        help="pretrain: on the first task's classes (the page's backbone) or on all")  # fmt: skip
    args = parser.parse_args(argv)
    if args.action == "pretrain":
        pretrain(args.dataset_dir, args.classes)
        return
    if args.action == "run":
        run(args.methods, args.seeds, args.workers, args.dataset_dir)
    text = render(args.output, args.dataset_dir)
    if args.output == "-":
        print(text)


if __name__ == "__main__":
    main()
