"""Split Fashion-MNIST as a vision workload (issue 22): 32x32, 3 channels, the CIFAR protocol's augmentation,
DER++ with a buffer of 500, 1 epoch per task, on a subset sized to minutes on a CPU; each model with and
without re-augmented replay, over seeds.

    python benchmarks/vision_fmnist.py                     # run what the raw results lack, then render
    python benchmarks/vision_fmnist.py --render [--docs]   # render the saved raw results (into docs/vision.md)

Each run is the experiment program's (``synapse.experiments``) at one thread, appended to the JSON-lines
file ``--results`` as it finishes, with the user CPU time of the run, its wall time, the provenance of the
process that made it and the configuration the experiment resolved it to (``_runner.resolved_config``). A rerun
serves a held run only while today's code resolves its row the same (``_runner.same_config``): a changed
protocol default, model-family default or catalog default runs it again, and the table shows only the runs
that still count. ``--docs`` puts the table between the markers
``<!-- vision-fmnist -->`` ... ``<!-- /vision-fmnist -->`` of docs/vision.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from _runner import (
    ROOT,
    Cache,
    percent_over_seeds,
    provenance,
    provenance_lines,
    resolved_config,
    same_config,
    write_section,
)

RESULTS = os.path.join(ROOT, "benchmarks", "results", "vision_fmnist.jsonl")
DOCS = os.path.join(ROOT, "docs", "vision.md")
MODELS = ("resnet18-reduced", "resnet18")
SEEDS = (0, 1, 2)
# The subset: training and test images per task (5 tasks of 2 classes), 16 steps of 32 per task.
TRAIN_PER_TASK, TEST_PER_TASK = 512, 200

Key = Tuple[str, bool, int]  # model, replay_augment, seed


def config(model: str, replay_augment: bool, seed: int) -> Any:
    from synapse.experiments.run import Config

    return Config(
        dataset="fashion-mnist",
        model=model,
        input_size=32,
        input_channels=3,  # resnet18-reduced takes the data's channels unless told; torchvision's take 3
        augment=True,
        replay_augment=replay_augment,
        synapse_type="der++",
        buffer_size=500,
        num_epochs=1,
        max_train_per_task=TRAIN_PER_TASK,
        max_test_per_task=TEST_PER_TASK,
        threads=1,
        device="cpu",
        seed=seed,
        quiet=True,
    )


def run(model: str, replay_augment: bool, seed: int) -> Dict[str, Any]:
    """One run; its accuracies, forgetting and costs."""
    from synapse.experiments.run import Experiment

    cfg = config(model, replay_augment, seed)
    resolved = resolved_config(cfg)
    cpu, wall = time.process_time(), time.perf_counter()
    results = Experiment(cfg).run()
    return {
        "model": model,
        "replay_augment": replay_augment,
        "seed": seed,
        "class_il": results["average_accuracy"]["class_il"],
        "task_il": results["average_accuracy"]["task_il"],
        "forgetting": results["forgetting"]["class_il"],
        "cpu_s": time.process_time() - cpu,
        "wall_s": time.perf_counter() - wall,
        "defaults": results["config"]["defaults"],
        "provenance": provenance(),
        "config": resolved,
    }


def current(entries: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The entries today's code would compute the same: their recorded configuration is the one their row
    (model, replay, seed) resolves to now. Resolved once per row."""
    today: Dict[Key, Dict[str, Any]] = {}
    kept = []
    for e in entries:
        key: Key = (e["model"], e["replay_augment"], e["seed"])
        if key not in today:
            today[key] = resolved_config(config(*key))
        if same_config(e.get("config"), today[key]):
            kept.append(e)
    return kept


def render(entries: Sequence[Dict[str, Any]]) -> str:
    """The table: one row per model and replay, seeds listed, means over them."""
    unique: Dict[Key, Dict[str, Any]] = {}
    for e in entries:  # a run saved twice (two processes) counts once
        unique.setdefault((e["model"], e["replay_augment"], e["seed"]), e)
    rows: Dict[Tuple[str, bool], List[Dict[str, Any]]] = {}
    for key in sorted(unique, key=lambda k: (MODELS.index(k[0]), not k[1], k[2])):
        rows.setdefault(key[:2], []).append(unique[key])
    lines = [
        f"Split Fashion-MNIST, {TRAIN_PER_TASK} training and {TEST_PER_TASK} test images per task, DER++ with a "
        "buffer of 500, 1 epoch per task, 32x32 with 3 channels, crop-and-flip augmentation, one CPU thread "
        "(`python benchmarks/vision_fmnist.py`; raw results: `benchmarks/results/vision_fmnist.jsonl`). "
        "Accuracies are final averages over the 5 tasks, in %.",
        "",
        "| Model | Replay | Class-IL per seed | Class-IL (mean ± sd over seeds) | Task-IL | forgetting (Class-IL) | "
        "user CPU per run |",
        "|---|---|---|---|---|---|---|",
    ]

    for (model, reaug), runs in rows.items():
        seeds = ", ".join(f"{100 * r['class_il']:.1f} (seed {r['seed']})" for r in runs)
        cpu = statistics.mean(r["cpu_s"] for r in runs)
        lines.append(
            f"| `{model}` | {'re-augmented' if reaug else 'stored augmented view'} | {seeds} | "
            + " | ".join(percent_over_seeds([r[k] for r in runs]) for k in ("class_il", "task_il", "forgetting"))
            + f" | {cpu:.0f} s |"
        )
    machine, versions = provenance_lines(e.get("provenance") for e in entries)
    return "\n".join(lines + ["", machine + ".", "", versions + "."])


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=RESULTS, help="the JSON-lines file of raw results")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--render", action="store_true", help="run nothing: render the saved results")
    p.add_argument("--docs", action="store_true", help="also put the table into docs/vision.md")
    args = p.parse_args(argv)
    cache = Cache(args.results)
    if not args.render:
        done = {(e["model"], e["replay_augment"], e["seed"]) for e in current(cache.entries())}
        for seed in args.seeds:
            for model in args.models:
                for reaug in (True, False):
                    if (model, reaug, seed) not in done:
                        entry = run(model, reaug, seed)
                        cache.append(entry)
                        print(
                            f"{model} replay_augment={reaug} seed {seed}: Class-IL {100 * entry['class_il']:.2f}, "
                            f"{entry['cpu_s']:.0f} s CPU",
                            flush=True,
                        )
    entries = cache.entries()
    kept = current(entries)
    if len(kept) < len(entries):
        print(f"{len(entries) - len(kept)} held run(s) left out: today's code resolves their rows otherwise")
    text = render(kept)
    print(text)
    if args.docs:
        write_section(DOCS, "vision-fmnist", text)


if __name__ == "__main__":
    main()
