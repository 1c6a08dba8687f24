"""What a run shows and writes: per-task tables, the summary, results.json, the plot and the epoch log."""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

from synapse import metrics

SETTINGS = ("class_il", "task_il")
METRICS = ("average_accuracy", "average_incremental_accuracy", "forgetting", "bwt", "fwt")
LABELS = {"class_il": "Class-IL", "task_il": "Task-IL"}


def accuracy_table(rows: Mapping[str, Sequence[Sequence[float]]], task_names: Sequence[str]) -> str:
    """The latest row of each accuracy matrix, as percentages, one line per setting."""
    width = max(7, *(len(n) for n in task_names))
    header = f"{'':<9}" + "".join(f"{n:>{width + 1}}" for n in task_names) + f"{'mean':>{width + 1}}"
    lines = [header]
    for setting in SETTINGS:
        last = rows[setting][-1]
        cells = "".join(f"{100 * a:>{width + 1}.2f}" for a in last)
        lines.append(f"{LABELS[setting]:<9}{cells}{100 * sum(last) / len(last):>{width + 1}.2f}")
    return "\n".join(lines)


def summarize(
    accuracy: Mapping[str, List[List[float]]], untrained: Optional[Mapping[str, List[float]]]
) -> Dict[str, Dict[str, Optional[float]]]:
    """All metrics for both settings. Forgetting, BWT and FWT need one row per task (not joint runs)."""
    out: Dict[str, Dict[str, Optional[float]]] = {k: {} for k in METRICS}
    for s in SETTINGS:
        r = accuracy[s]
        square = len(r) == len(r[-1])
        out["average_accuracy"][s] = sum(r[-1]) / len(r[-1])
        out["average_incremental_accuracy"][s] = metrics.average_incremental_accuracy(r) if square else None
        out["forgetting"][s] = metrics.forgetting(r) if square else None
        out["bwt"][s] = metrics.backward_transfer(r) if square else None
        out["fwt"][s] = metrics.forward_transfer(r, untrained[s]) if square and untrained else None
    return out


def summary_text(summary: Mapping[str, Mapping[str, Optional[float]]], wall_time_s: float) -> str:
    names = {
        "average_accuracy": "final average accuracy",
        "average_incremental_accuracy": "average incremental accuracy",
        "forgetting": "forgetting",
        "bwt": "backward transfer (BWT)",
        "fwt": "forward transfer (FWT)",
    }
    lines = [f"{'':<30}{'Class-IL':>10}{'Task-IL':>10}"]
    for key, label in names.items():
        cells = "".join(
            f"{'n/a':>10}" if summary[key][s] is None else f"{100 * summary[key][s]:>10.2f}"  # type: ignore[operator]
            for s in SETTINGS
        )
        lines.append(f"{label:<30}{cells}")
    lines.append(f"wall time: {wall_time_s:.1f} s")
    return "\n".join(lines)


def write_results(path: str, results: Mapping[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, path)


def write_epoch_log(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    fields = ["task", "epoch", "train_loss", "train_accuracy", "validation_accuracy", "seconds"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fields})


def plot_accuracy(path: str, accuracy: Mapping[str, List[List[float]]], title: str) -> None:
    """Both accuracy matrices as heatmaps, and the average accuracy after each task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, s in zip(axes[:2], SETTINGS):
        r = accuracy[s]
        image = ax.imshow([[100 * a for a in row] for row in r], vmin=0, vmax=100, cmap="viridis")
        ax.set_title(f"{LABELS[s]} accuracy (%)")
        ax.set_xlabel("evaluated on task")
        ax.set_ylabel("after training task")
        ax.set_xticks(range(len(r[0])), [str(j + 1) for j in range(len(r[0]))])
        ax.set_yticks(range(len(r)), [str(i + 1) for i in range(len(r))] if len(r) > 1 else ["all"])
        for i, row in enumerate(r):
            for j, a in enumerate(row):
                ax.text(j, i, f"{100 * a:.0f}", ha="center", va="center", color="w" if a < 0.6 else "k", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046)
    ax = axes[2]
    for s in SETTINGS:
        r = accuracy[s]
        seen = (
            [100 * sum(row[: i + 1]) / (i + 1) for i, row in enumerate(r)]
            if len(r) == len(r[0])
            else [100 * sum(r[-1]) / len(r[-1])]
        )
        ax.plot(range(1, len(seen) + 1), seen, marker="o", label=LABELS[s])
    ax.set_xticks(range(1, len(accuracy["class_il"]) + 1))
    ax.set_title("average accuracy on tasks seen so far")
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def task_table(accuracy: Mapping[str, Sequence[Sequence[float]]], names: Sequence[str], task_il_applies: bool) -> str:
    """``accuracy_table``, with Task-IL reading n/a where it does not apply (every task has every class)."""
    table = accuracy_table(accuracy, names)
    if task_il_applies:
        return table
    lines = table.splitlines()
    width = max(7, *(len(n) for n in names)) + 1
    lines = [line for line in lines if not line.startswith(LABELS["task_il"])]
    return "\n".join([*lines, f"{LABELS['task_il']:<9}" + f"{'n/a':>{width}}" * (len(names) + 1)])


def task_scalars(accuracy: Mapping[str, List[List[float]]], task_il_applies: bool) -> Dict[str, float]:
    """The loggers' values after a task: its accuracy row, the average and forgetting, per setting."""
    t = len(accuracy["class_il"])
    values: Dict[str, float] = {}
    for setting in SETTINGS if task_il_applies else ("class_il",):
        row = accuracy[setting][-1]
        values.update({f"task/{setting}/task_{k + 1}": a for k, a in enumerate(row)})
        values[f"task/{setting}/average"] = sum(row) / len(row)
        if t > 1:
            best = [max(r[k] for r in accuracy[setting][:-1]) for k in range(t - 1)]
            values[f"task/{setting}/forgetting"] = sum(b - row[k] for k, b in enumerate(best)) / (t - 1)
    return values


def results(
    accuracy: Mapping[str, List[List[float]]],
    untrained: Optional[Mapping[str, List[float]]],
    *,
    config: Mapping[str, Any],
    versions: Mapping[str, str],
    scenario: Mapping[str, Any],
    predictor: str,
    head: Optional[Mapping[str, Optional[float]]],
    test_samples: Sequence[int],
    wall_time_s: float,
    epoch_log: Sequence[Mapping[str, Any]],
    task_il_applies: bool,
    stream: bool,
) -> Dict[str, Any]:
    """results.json's content: the settings, versions and scenario, the predictor scored (and the model's
    head, for a method with its own predictor), the accuracy matrices, the metrics (``summarize``) and timings.

    Task-IL is reported as null where it does not apply, not as the copy of Class-IL that evaluation computes;
    a task-free ``stream`` has no tasks to forget or transfer between, so those metrics are null too.
    """
    summary = summarize(accuracy, untrained)
    matrix: Dict[str, Any] = dict(accuracy)
    before: Optional[Dict[str, Any]] = None if untrained is None else dict(untrained)
    if not task_il_applies:
        matrix["task_il"] = None
        if before is not None:
            before["task_il"] = None
        for metric in summary.values():
            metric["task_il"] = None
    if stream:
        for key in ("average_incremental_accuracy", "forgetting", "bwt", "fwt"):
            summary[key]["class_il"] = None
    return {
        "config": config,
        "versions": versions,
        "scenario": scenario,
        "predictor": predictor,
        "head_average_accuracy": head,
        "accuracy_matrix": matrix,
        "untrained_accuracy": before,
        **summary,
        "test_samples_per_task": test_samples,
        "wall_time_s": wall_time_s,
        "epoch_log": epoch_log,
    }


def write_outputs(folder: str, results: Mapping[str, Any], plot_title: Optional[str]) -> Optional[str]:
    """results.json, epoch_log.csv and (with a ``plot_title``) accuracy_matrix.png in ``folder``; returns the
    figure's path, or None when not drawn."""
    os.makedirs(folder, exist_ok=True)
    write_results(os.path.join(folder, "results.json"), results)
    write_epoch_log(os.path.join(folder, "epoch_log.csv"), results["epoch_log"])
    if plot_title is None:
        return None
    figure = os.path.join(folder, "accuracy_matrix.png")
    plot_accuracy(figure, results["accuracy_matrix"], plot_title)
    return figure
