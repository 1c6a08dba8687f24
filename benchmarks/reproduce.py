"""Reproduce the DER paper's Seq-MNIST protocol (and its Seq-CIFAR-10 one) with Synapse.

Protocol (Buzzega et al. 2020, "Dark Experience for General Continual Learning: a Strong, Simple
Baseline", sec. 4): 5 tasks x 2 classes, a single head (Class-IL and Task-IL both evaluated), plain
SGD; MNIST-like data: MLP 784-100-100, 1 epoch per task, batch 10, no augmentation; CIFAR-10:
resnet18-reduced, 50 epochs, batch 32, random crop and flip.

    python benchmarks/reproduce.py                           # Split Fashion-MNIST, 3 seeds -> REPRODUCIBILITY.md
    python benchmarks/reproduce.py --dataset mnist           # needs MNIST on disk or internet
    python benchmarks/reproduce.py --dataset cifar10         # hours on a CPU; use a GPU
    python benchmarks/reproduce.py --seeds 0 --output -      # one seed, print only
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

# Best hyperparameters per method and buffer size. Seq-MNIST and Seq-CIFAR-10: the DER paper's appendix
# (hyperparameters selected by grid search), as its authors' released configuration lists them
# (mammoth, utils/best_args.py); that file also has the seq-mnist values for EWC (ewc_on), LwF and GEM.
# "lr" is SGD's, "mb" the buffer minibatch size; everything else is the method's own hyperparameters
# under their catalog names (ER's joint_mean: the paper's one mean over batch and replay minibatch).
# Methods with no published seq-mnist values (MAS, ER-ACE) use values chosen by benchmarks/tune.py on a
# validation split carved from the training data (never the test set); their grids are in TUNED_GRIDS.
_AGEM = {"lr": 0.1, "mb": 128, "memory": "episodic"}
BEST: Dict[str, Dict[Tuple[str, Optional[int]], Dict[str, Any]]] = {
    "seq-mnist": {
        ("sequential", None): {"lr": 0.03},
        ("joint", None): {"lr": 0.03},
        ("si", None): {"lr": 0.1, "alpha": 1.0, "xi": 0.9, "checkpoint_per_steps": 10**9},
        ("ewc", None): {"lr": 0.03, "ewc_lambda": 90.0, "gamma": 1.0},
        ("mas", None): {"lr": 0.03, "mas_lambda": 0.1},
        ("lwf", None): {"lr": 0.03, "alpha": 1.0, "temperature": 2.0, "weight_decay": 5e-4},
        ("agem", 200): _AGEM,
        ("agem", 500): _AGEM,
        ("gem", 200): {"lr": 0.01, "gamma": 1.0, "mb": 200},  # mb = the buffer: each past task's whole memory
        ("gem", 500): {"lr": 0.03, "gamma": 0.5, "mb": 500},
        ("er", 200): {"lr": 0.01, "mb": 10, "joint_mean": True},
        ("er", 500): {"lr": 0.1, "mb": 10, "joint_mean": True},
        ("er-ace", 200): {"lr": 0.1, "mb": 128},
        ("er-ace", 500): {"lr": 0.1, "mb": 128},
        ("der", 200): {"lr": 0.03, "mb": 10, "alpha": 0.2},
        ("der", 500): {"lr": 0.03, "mb": 128, "alpha": 1.0},
        ("der++", 200): {"lr": 0.03, "mb": 128, "alpha": 0.2, "beta": 1.0},
        ("der++", 500): {"lr": 0.03, "mb": 10, "alpha": 1.0, "beta": 0.5},
        ("xder", 200): {"lr": 0.1, "mb": 10},
        ("xder", 500): {"lr": 0.1, "mb": 10},
        # The authors' seq-mnist values: iCaRL lr 0.1, minibatch 10 (best_args.py); MIR lr 0.1 with the
        # virtual step at the same lr, 10 replayed of 50 candidates (the MIR authors' Split MNIST); GDumb
        # its authors' MNIST recipe (the class defaults); BiC has none (tuned).
        ("icarl", 200): {"lr": 0.1, "mb": 10},
        ("icarl", 500): {"lr": 0.1, "mb": 10},
        ("mir", 200): {"lr": 0.1, "mb": 10, "virtual_lr": 0.1, "buffer_candidates": 50},
        ("mir", 500): {"lr": 0.1, "mb": 10, "virtual_lr": 0.1, "buffer_candidates": 50},
        ("gdumb", 200): {"lr": 0.05},
        ("gdumb", 500): {"lr": 0.05},
        ("bic", 200): {"lr": 0.1, "mb": 10},
        ("bic", 500): {"lr": 0.1, "mb": 10},
    },
    "seq-cifar10": {
        ("sequential", None): {"lr": 0.1},
        ("joint", None): {"lr": 0.03},
        ("si", None): {"lr": 0.03, "alpha": 0.5, "xi": 1.0, "checkpoint_per_steps": 10**9},
        ("agem", 200): {"lr": 0.03, "mb": 32, "memory": "episodic"},
        ("agem", 500): {"lr": 0.03, "mb": 32, "memory": "episodic"},
        ("er", 200): {"lr": 0.1, "mb": 32, "joint_mean": True},
        ("er", 500): {"lr": 0.1, "mb": 32, "joint_mean": True},
        ("der", 200): {"lr": 0.03, "mb": 32, "alpha": 0.3},
        ("der", 500): {"lr": 0.03, "mb": 32, "alpha": 0.3},
        ("der++", 200): {"lr": 0.03, "mb": 32, "alpha": 0.1, "beta": 0.5},
        ("der++", 500): {"lr": 0.03, "mb": 32, "alpha": 0.2, "beta": 0.5},
    },
}
# The grids benchmarks/tune.py searched for methods without published seq-mnist values (seeds 0 and 1, a
# random 10% of each task's training data held out, scored by the mean final Class-IL accuracy on it).
TUNED_GRIDS: Dict[str, Dict[str, List[Any]]] = {
    "mas": {"lr": [0.03, 0.1], "mas_lambda": [0.01, 0.03, 0.1, 0.3, 1.0, 10.0]},
    "er-ace": {"lr": [0.03, 0.1], "mb": [10, 128]},
    "xder": {"lr": [0.03, 0.1], "mb": [10, 128]},
    "bic": {"lr": [0.03, 0.1]},
}
# Run settings of a BEST entry ("batch_size": the stream's batch, set by the scenario protocols); the rest
# is the method's own hyperparameters.
RUN_KEYS = ("lr", "mb", "weight_decay", "batch_size")
PROTOCOL = {"fashion-mnist": "seq-mnist", "mnist": "seq-mnist", "cifar10": "seq-cifar10"}
PROTOCOL_TEXT = {
    "seq-mnist": "5 tasks x 2 classes, MLP 784-100-100 with Xavier init, pixels in [0, 1] (no normalisation), "
    "1 epoch per task, batch 10, no augmentation",
    "seq-cifar10": "5 tasks x 2 classes, resnet18-reduced, 50 epochs per task, batch 32, random crop and flip",
}
MEMORYLESS = ("sequential", "joint", "si", "ewc", "mas", "lwf")


def config_for(
    dataset: str,
    method: str,
    buffer: Optional[int],
    seed: int,
    fused: bool = True,
    hp: Optional[Dict[str, Any]] = None,
    **overrides: Any,
):
    """The experiment's configuration for one row (``hp`` replaces the row's BEST entry, e.g. when tuning)."""
    from synapse.experiments.run import Config

    hp = dict(BEST[PROTOCOL[dataset]][(method, buffer)] if hp is None else hp)
    training_type = method if method in ("sequential", "joint") else "continual"
    method_args = {k: v for k, v in hp.items() if k not in RUN_KEYS}
    return Config(
        dataset=dataset,
        training_type=training_type,
        synapse_type=method if training_type == "continual" else "der++",
        lr=hp["lr"],
        weight_decay=hp.get("weight_decay", 0.0),
        method_args=method_args if training_type == "continual" else {},
        buffer_size=buffer or 1,
        buffer_sample_size=hp.get("mb"),
        batch_size=hp.get("batch_size"),  # None: the protocol's
        seed=seed,
        unfused=not fused,
        quiet=True,
        device="cpu" if PROTOCOL[dataset] == "seq-mnist" else "auto",  # a small MLP is fastest on the CPU
        **overrides,
    )


def run_one(
    method: str,
    buffer: Optional[int],
    seed: int,
    dataset: str = "fashion-mnist",
    fused: bool = True,
    hp: Optional[Dict[str, Any]] = None,
    **overrides: Any,
) -> Dict[str, Any]:
    """One configuration end to end through the CLI's experiment loop; returns its results dict."""
    from synapse.experiments.run import Experiment

    cfg = config_for(dataset, method, buffer, seed, fused, hp, **overrides)
    start = time.perf_counter()
    results = Experiment(cfg).run()
    results["wall_time_s"] = time.perf_counter() - start  # including data loading
    return results


def _worker(
    job: Tuple[str, Optional[int], int, str, Dict[str, Any]],
) -> Tuple[Tuple[str, Optional[int], int], Dict[str, Any]]:
    import torch

    torch.set_num_threads(1)  # one core per worker: two runs side by side use the machine fully
    method, buffer, seed, dataset, overrides = job
    r = run_one(method, buffer, seed, dataset, **overrides)
    keep = ("average_accuracy", "forgetting", "wall_time_s", "accuracy_matrix", "predictor", "head_average_accuracy")
    return (method, buffer, seed), {k: r.get(k) for k in keep}


def rows_for(
    dataset: str, methods: Optional[List[str]] = None, buffers: Optional[List[int]] = None
) -> List[Tuple[str, Optional[int]]]:
    """The BEST rows to run: all of them, or those of ``methods``; methods with a memory only at ``buffers``
    (methods without one ignore the filter and always run)."""
    rows = list(BEST[PROTOCOL[dataset]])
    known = sorted({m for m, _ in rows})
    unknown = sorted(set(methods or []) - set(known))
    if unknown:
        raise SystemExit(f"reproduce.py: unknown method(s) {unknown} for {PROTOCOL[dataset]}; choose from {known}")
    return [(m, b) for m, b in rows if (not methods or m in methods) and (b is None or not buffers or b in buffers)]


def run_all(
    dataset: str,
    seeds: List[int],
    workers: int,
    rows: Optional[List[Tuple[str, Optional[int]]]] = None,
    **overrides: Any,
) -> Dict[Tuple[str, Optional[int]], List[Dict[str, Any]]]:
    rows = rows if rows is not None else list(BEST[PROTOCOL[dataset]])
    jobs = [(m, b, s, dataset, overrides) for (m, b) in rows for s in seeds]
    results: Dict[Tuple[str, Optional[int]], List[Dict[str, Any]]] = {}
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        for (method, buffer, seed), r in pool.imap_unordered(_worker, jobs):
            results.setdefault((method, buffer), []).append(r)
            print(
                f"  {method:<10} buffer {buffer or '-':<4} seed {seed}: Class-IL "
                f"{100 * r['average_accuracy']['class_il']:.2f}%  Task-IL {100 * r['average_accuracy']['task_il']:.2f}%"
                f"  ({r['wall_time_s']:.1f} s)",
                flush=True,
            )
    return {k: results[k] for k in rows}


def summarize(
    results: Dict[Tuple[str, Optional[int]], List[Dict[str, Any]]],
) -> Dict[Tuple[str, Optional[int]], Dict[str, Tuple[float, float]]]:
    """Mean and (sample) standard deviation, in %, of each metric over seeds."""

    def stat(values: List[float]) -> Tuple[float, float]:
        values = [100 * v for v in values]
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    table = {}
    for key, runs in results.items():
        table[key] = {
            "class_il": stat([r["average_accuracy"]["class_il"] for r in runs]),
            "task_il": stat([r["average_accuracy"]["task_il"] for r in runs]),
            "forgetting": stat([r["forgetting"]["class_il"] or 0.0 for r in runs])
            if key[0] != "joint"
            else (float("nan"), 0.0),
            "wall_time_s": (statistics.mean(r["wall_time_s"] for r in runs), 0.0),
        }
        if all(r.get("head_average_accuracy") for r in runs):  # a method with its own predictor (iCaRL)
            table[key]["class_il_head"] = stat([r["head_average_accuracy"]["class_il"] for r in runs])
            table[key]["task_il_head"] = stat([r["head_average_accuracy"]["task_il"] for r in runs])
    return table


# The paper's qualitative findings on Seq-MNIST (DER paper, Table 2), and the expectations issue 12 states
# for the methods it adds, as checks in accuracy points. Each check runs when its rows were run (a filtered
# run checks what it has). The margins sit below what the 3-seed Fashion-MNIST run (REPRODUCIBILITY.md)
# measured, so that one seed passes them too.
MARGIN_REPLAY_OVER_SGD = 40.0  # ER and DER++ above fine-tuning, Class-IL
MARGIN_REGULARISER_NEAR_SGD = 5.0  # |SI/EWC/MAS/LwF - SGD|, Class-IL
MARGIN_REGULARISER_TASK_IL = 2.0  # ...while above SGD in Task-IL
MARGIN_AGEM_BELOW_ER = 15.0  # A-GEM stays far below replay...
MARGIN_AGEM_OVER_SGD = 10.0  # ...and clearly above fine-tuning (between the two, as in the paper's table)
MARGIN_GEM_OVER_AGEM = 10.0  # a constraint per past task beats one averaged constraint
MARGIN_TASK_IL_OVER_CLASS_IL = 10.0
MARGIN_GDUMB_BELOW_ER = 5.0  # "a strong baseline": GDumb at buffer 500 within this of ER
SEED_NOISE = 1.0  # allowance for "at least level"
REGULARISERS = ("si", "ewc", "mas", "lwf")


def check_orderings(table, single_seed: bool = False) -> List[str]:
    """The findings as checks; returns the failures (empty when all hold). ``single_seed`` skips the one
    comparison that one seed cannot settle: a regulariser's Task-IL against SGD's, whose seed-to-seed
    spread (about 6 points) exceeds the margin."""
    failures = []

    def cil(method: str, buffer: Optional[int] = None) -> Optional[float]:
        row = table.get((method, buffer))
        return None if row is None else row["class_il"][0]

    def til(method: str, buffer: Optional[int] = None) -> Optional[float]:
        row = table.get((method, buffer))
        return None if row is None else row["task_il"][0]

    sgd, sgd_til = cil("sequential"), til("sequential")
    for b in (200, 500):
        er, derpp, agem, erace, gem = (cil(m, b) for m in ("er", "der++", "agem", "er-ace", "gem"))
        if er is not None and derpp is not None and derpp < er - SEED_NOISE:
            failures.append(f"buffer {b}: DER++ {derpp:.2f} < ER {er:.2f}")
        for name, value in (("ER", er), ("DER++", derpp)):
            if value is not None and sgd is not None and value < sgd + MARGIN_REPLAY_OVER_SGD:
                failures.append(f"buffer {b}: {name} {value:.2f} not {MARGIN_REPLAY_OVER_SGD} above SGD {sgd:.2f}")
        if agem is not None and er is not None and agem > er - MARGIN_AGEM_BELOW_ER:
            failures.append(f"buffer {b}: A-GEM {agem:.2f} is not far below ER {er:.2f}")
        if agem is not None and sgd is not None and agem < sgd + MARGIN_AGEM_OVER_SGD:
            failures.append(f"buffer {b}: A-GEM {agem:.2f} is not {MARGIN_AGEM_OVER_SGD} above SGD {sgd:.2f}")
        if erace is not None and er is not None and erace < er - SEED_NOISE:
            failures.append(f"buffer {b}: ER-ACE {erace:.2f} below ER {er:.2f}")
        if gem is not None and agem is not None and gem < agem + MARGIN_GEM_OVER_AGEM:
            failures.append(f"buffer {b}: GEM {gem:.2f} not {MARGIN_GEM_OVER_AGEM} above A-GEM {agem:.2f}")
        xder, mir = cil("xder", b), cil("mir", b)
        if xder is not None and derpp is not None and xder < derpp - SEED_NOISE:
            failures.append(f"buffer {b}: X-DER {xder:.2f} below DER++ {derpp:.2f}")
        if mir is not None and er is not None and mir < er - SEED_NOISE:
            failures.append(f"buffer {b}: MIR {mir:.2f} below ER {er:.2f}")
        icarl = table.get(("icarl", b))
        if (
            icarl is not None
            and icarl.get("class_il_head") is not None
            and icarl["class_il"][0] <= icarl["class_il_head"][0]
        ):
            failures.append(
                f"buffer {b}: iCaRL's nearest mean {icarl['class_il'][0]:.2f} does not beat its own head "
                f"{icarl['class_il_head'][0]:.2f}"
            )
    gdumb, er500 = cil("gdumb", 500), cil("er", 500)
    if gdumb is not None and er500 is not None and gdumb < er500 - MARGIN_GDUMB_BELOW_ER:
        failures.append(f"buffer 500: GDumb {gdumb:.2f} is not a strong baseline (ER {er500:.2f})")
    for method in REGULARISERS:
        value, value_til = cil(method), til(method)
        if value is not None and sgd is not None and abs(value - sgd) > MARGIN_REGULARISER_NEAR_SGD:
            failures.append(f"{method}: Class-IL {value:.2f} not within {MARGIN_REGULARISER_NEAR_SGD} of SGD {sgd:.2f}")
        if (
            not single_seed
            and value_til is not None
            and sgd_til is not None
            and value_til < sgd_til + MARGIN_REGULARISER_TASK_IL
        ):
            failures.append(
                f"{method}: Task-IL {value_til:.2f} not {MARGIN_REGULARISER_TASK_IL} above SGD's {sgd_til:.2f}"
            )
    for key, row in table.items():
        if key[0] != "joint" and row["task_il"][0] < row["class_il"][0] + MARGIN_TASK_IL_OVER_CLASS_IL:
            failures.append(f"{key}: Task-IL {row['task_il'][0]:.2f} not far above Class-IL {row['class_il'][0]:.2f}")
    return failures


# Findings that do not hold on this data with this implementation, each with what was checked. The CI
# test tolerates exactly these (a filtered message contains the key); any other failure fails it, and a
# gap that closes shows as an unused entry in the table's notes.
KNOWN_GAPS: Dict[str, str] = {
    "X-DER": "X-DER (the authors' xder_ce variant, their cifar-100 constraint weights; lr and minibatch chosen on a "
    "validation split) scores 15 to 20 points below DER++ here. Not Synapse: a plain re-implementation of the"
    " authors' xder_ce update on the same data, model and initialisation scores the same: 62.6 ± 0.8 over the"
    " 9 of 10 seeds that did not diverge, against Synapse's 62.1 ± 0.7 over 10 (REPRODUCIBILITY-"
    "crosscheck.md). The cause, seen in both: from the fourth task on, the task just trained scores about 0% "
    "in Class-IL right after it. xder_ce leaves the past heads out of the incoming batch's softmax and "
    "replays labels on the past heads only, so only the past-logits constraint (weight eta, 5e-3 in the "
    "authors' cifar-100 configuration) lifts the new classes above the old; with one epoch per task it does "
    "not, and the last task's classes are never predicted, which alone costs about 20 points of the 5-task "
    "average. The maths is also tested term by term against hand computations.",
    "MIR": "MIR (the MIR authors' Split-MNIST values: lr 0.1, 10 of 50 candidates, virtual step at the same lr) "
    "stays 1 to 3 points below the ER rows, which use the DER authors' ER values (lr 0.01 at buffer 200). "
    "Against ER run at MIR's own lr and minibatch, so that only the retrieval differs "
    "(REPRODUCIBILITY-crosscheck.md, 5 seeds), MIR is level at buffer 200 (72.2 vs 71.9) and 2.4 points below "
    "at 500 (74.4 vs 76.7): on this protocol the retrieval adds nothing. Its retrieval is tested against a "
    "direct implementation (deepcopy, real SGD step, top-k). Named deviations that may cost it here: candidates "
    "include the current task's items (the authors exclude them) and their score against the lowest loss seen "
    "so far (compare_to_old_logits) is not implemented.",
    "mas:": "MAS, with the strength chosen on a validation split, diverges (NaN loss, chance accuracy) in some "
    "seeds: its importance, from the squared norm of the raw logits, grows with every task, and once "
    "2 * lr * lambda * Omega exceeds 2 the penalty's SGD step is unstable. Smaller strengths are stable "
    "but score lower on the validation split.",
}


def open_failures(failures: List[str]) -> List[str]:
    """The failures that no KNOWN_GAPS entry explains."""
    return [f for f in failures if not any(key in f for key in KNOWN_GAPS)]


NOTES_FASHION_MNIST = """\
- Fashion-MNIST is a harder dataset than MNIST, so these numbers are not comparable with the paper's
  Seq-MNIST table; the hyperparameters, tuned by the paper on MNIST, are used unchanged."""

# Every difference found between this reproduction and the DER authors' code (aimagelab/mammoth:
# datasets/seq_mnist.py, backbone/MNISTMLP.py, models/{er,der,derpp,agem,si}.py, utils/buffer.py,
# utils/training.py, utils/best_args.py), and what was done about it: a markdown table kept beside this script.
DIFFERENCES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seq_mnist_differences.md")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


# Each method's name in the tables; benchmarks/protocols.py uses it too, and orders its rows by it.
NAMES = {
    "sequential": "SGD (fine-tuning)",
    "joint": "Joint",
    "si": "SI",
    "ewc": "EWC (online)",
    "mas": "MAS",
    "lwf": "LwF",
    "agem": "A-GEM",
    "gem": "GEM",
    "er": "ER",
    "er-ace": "ER-ACE",
    "der": "DER",
    "der++": "DER++",
    "xder": "X-DER",
    "icarl": "iCaRL",
    "mir": "MIR",
    "gdumb": "GDumb",
    "bic": "BiC",
}


def render(
    dataset: str, seeds: List[int], table, total_s: float, command: str, failures: List[str], workers: int
) -> str:
    import torch

    import synapse

    lines = [
        f"# Reproduction: the DER paper's {PROTOCOL[dataset]} protocol on Split {dataset}",
        "",
        "Generated by `benchmarks/reproduce.py`; do not edit by hand.",
        "",
        f"- Command: `{command}`",
        f"- Seeds: {', '.join(map(str, seeds))} (mean ± sample std over seeds)",
        f"- Synapse {synapse.__version__}, torch {torch.__version__}",
        f"- Machine: {machine()}",
        f"- Total wall time: {total_s / 60:.1f} min ({total_s:.0f} s), {workers} run(s) in parallel, one thread each"
        if total_s == total_s
        else "- Total wall time: not recorded with these raw results (see the per-run times)",
        f"- Protocol: {PROTOCOL_TEXT[PROTOCOL[dataset]]}; plain SGD, single head; hyperparameters: the paper's "
        f"best for {PROTOCOL[dataset]} (`BEST` in the script).",
        "",
        "| Method | Buffer | Class-IL (%) | Task-IL (%) | Forgetting, Class-IL (%) | Wall time / run (s) |",
        "|---|---|---|---|---|---|",
    ]
    for (method, buffer), row in table.items():
        forgetting = "n/a" if method == "joint" else f"{row['forgetting'][0]:.2f} ± {row['forgetting'][1]:.2f}"
        lines.append(
            f"| {NAMES[method]} | {buffer or '-'} | {row['class_il'][0]:.2f} ± {row['class_il'][1]:.2f} | "
            f"{row['task_il'][0]:.2f} ± {row['task_il'][1]:.2f} | {forgetting} | {row['wall_time_s'][0]:.1f} |"
        )
    heads = [(key, row) for key, row in table.items() if "class_il_head" in row]
    if heads:
        lines += ["", "Methods with their own predictor are scored by it above; their model's own head scores:", ""]
        for (method, buffer), row in heads:
            lines.append(
                f"- {NAMES[method]}, buffer {buffer}: head Class-IL {row['class_il_head'][0]:.2f} ± "
                f"{row['class_il_head'][1]:.2f}, Task-IL {row['task_il_head'][0]:.2f} ± {row['task_il_head'][1]:.2f}"
            )
    lines += ["", "## Checks against the paper's findings", ""]
    lines.append(
        "All hold (for the rows run): DER++ ≥ ER > SGD by a wide margin at both buffer sizes; ER-ACE, MIR at "
        "least level with ER; X-DER at least level with DER++; GEM well above A-GEM; A-GEM between SGD and ER "
        "in Class-IL; SI, EWC, MAS and LwF near SGD in Class-IL and above it in Task-IL; iCaRL's nearest mean "
        "above its own head; GDumb at buffer 500 near ER; Task-IL far above Class-IL for every method."
        if not failures
        else "Failed checks:\n\n" + "\n".join(f"- {f}" for f in failures)
    )
    gaps = [(key, why) for key, why in KNOWN_GAPS.items() if any(key in f for f in failures)]
    if gaps:
        lines += ["", "What was checked where a finding does not hold:", ""]
        lines += [f"- {why}" for _, why in gaps]
    tuned = sorted({m for m, _ in table} & set(TUNED_GRIDS))
    if tuned:
        lines += ["", "## Hyperparameters chosen on a validation split", ""]
        for m in tuned:
            grid = ", ".join(f"`{k}` in {v}" for k, v in TUNED_GRIDS[m].items())
            lines.append(f"- {NAMES[m]}: grid {grid} (`benchmarks/tune.py`)")
    if PROTOCOL[dataset] == "seq-mnist":
        with open(DIFFERENCES_FILE) as f:
            lines += ["", "## Differences from the authors' code, and what was done", "", f.read().strip()]
    if dataset == "fashion-mnist":
        lines += ["", "## Notes", "", NOTES_FASHION_MNIST]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist", choices=sorted(PROTOCOL))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="only these rows: the CLI's --synapse_type names, plus sequential and joint",
    )
    p.add_argument(
        "--buffers", type=int, nargs="+", default=None, help="only these buffer sizes (memoryless methods always run)"
    )
    p.add_argument("--json", default=None, help="also write {method/buffer: per-seed Class-IL and Task-IL} here")
    p.add_argument(
        "--from-json",
        dest="from_json",
        default=None,
        metavar="RAW",
        help="run nothing: render the markdown from the raw results a full run saved "
        "(benchmarks/results/reproduce_<dataset>.json)",
    )
    p.add_argument(
        "--output",
        default=None,
        help="markdown file to write (default REPRODUCIBILITY.md for "
        "fashion-mnist, REPRODUCIBILITY-<dataset>.md otherwise); '-' prints only",
    )
    args = p.parse_args()
    command = "python benchmarks/reproduce.py " + " ".join(sys.argv[1:])
    start = time.perf_counter()
    if args.from_json:
        with open(args.from_json) as f:
            raw = json.load(f)
        meta = raw.pop("_meta", {})
        results = {}
        for key, runs in raw.items():
            method, buffer = key.rsplit("/", 1)
            results[(method, None if buffer == "None" else int(buffer))] = runs
        args.seeds = meta.get("seeds", args.seeds)
        total = meta.get("total_s", float("nan"))
        # The numbers are the full run's; this command only rendered them again.
        command = meta.get("command", "python benchmarks/reproduce.py") + f" (rendered by: {command.strip()})"
    else:
        rows = rows_for(args.dataset, args.methods, args.buffers)
        results = run_all(args.dataset, args.seeds, args.workers, rows)
        total = time.perf_counter() - start
    if args.json:
        per_seed = {
            f"{m}/{b if b is not None else 'none'}": {
                "seeds": args.seeds,
                "class_il": [r["average_accuracy"]["class_il"] for r in runs],
                "task_il": [r["average_accuracy"]["task_il"] for r in runs],
            }
            for (m, b), runs in results.items()
        }
        with open(args.json, "w") as f:
            json.dump(per_seed, f, indent=2)
    table = summarize(results)
    failures = check_orderings(table)
    text = render(args.dataset, args.seeds, table, total, command.strip(), failures, args.workers)
    print(text)
    output = args.output or os.path.join(
        ROOT, "REPRODUCIBILITY.md" if args.dataset == "fashion-mnist" else f"REPRODUCIBILITY-{args.dataset}.md"
    )
    if args.output is None and (args.methods or args.buffers):
        print("filtered run: REPRODUCIBILITY.md is only written by a full run (use --output FILE or --json)")
        output = "-"
    if output != "-":
        with open(output, "w") as f:
            f.write(text)
        raw = os.path.join(ROOT, "benchmarks", "results", f"reproduce_{args.dataset}.json")
        os.makedirs(os.path.dirname(raw), exist_ok=True)
        meta = {"total_s": total, "seeds": args.seeds, "command": command.strip()}
        if not args.from_json:
            with open(raw, "w") as f:
                json.dump({"_meta": meta, **{f"{m}/{b}": runs for (m, b), runs in results.items()}}, f)
        print(f"written to {output} and {raw}")
    return 1 if open_failures(failures) else 0


if __name__ == "__main__":
    sys.exit(main())
