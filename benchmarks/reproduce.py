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
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _runner import (  # noqa: E402  (benchmarks/ is not a package)
    ROOT,
    Row,
    add_table_arguments,
    config_for,
    display_name,
    presets,
    provenance,
    provenance_lines,
    run_jobs,
    run_one,
    summarize,
)
from synapse import catalog  # noqa: E402

__all__ = ["config_for", "run_one", "summarize", "rows_for", "run_all", "check_orderings", "open_failures", "main"]

# The values of every row are the methods' presets (src/synapse/experiments/presets/<method>.json): for
# Seq-MNIST and Seq-CIFAR-10 the DER paper's appendix (hyperparameters selected by grid search), as its
# authors' released configuration lists them (mammoth, utils/best_args.py), and for methods without published
# seq-mnist values, values chosen by benchmarks/tune.py on a validation split carved from the training data
# (never the test set), each preset naming its source and grid.
PROTOCOL = {d: p for p in ("seq-mnist", "seq-cifar10") for d in presets.PROTOCOLS[p]}
PROTOCOL_TEXT = {
    "seq-mnist": "5 tasks x 2 classes, MLP 784-100-100 with Xavier init, pixels in [0, 1] (no normalisation), "
    "1 epoch per task, batch 10, no augmentation",
    "seq-cifar10": "5 tasks x 2 classes, resnet18-reduced, 50 epochs per task, batch 32, random crop and flip",
}


def tuned_grids(protocol: str) -> Dict[str, Dict[str, List[Any]]]:
    """The grids benchmarks/tune.py searched, for the methods whose ``protocol`` presets it chose."""
    blocks = {m: presets.block(m, protocol) or {} for m in presets.methods()}
    return {m: b["grid"] for m, b in blocks.items() if b.get("source") == "validation-grid"}


def known_gaps(protocol: str) -> Dict[str, str]:
    """Findings that do not hold on this data with this implementation, each with what was checked, from the
    methods' presets: ``{text a failure contains: what was checked}``."""
    blocks = [presets.block(m, protocol) or {} for m in presets.methods()]
    return {b["known_gap"]["match"]: b["known_gap"]["text"] for b in blocks if "known_gap" in b}


def _worker(
    job: Tuple[str, Optional[int], int, str, Dict[str, Any]],
) -> Tuple[Tuple[str, Optional[int], int], Dict[str, Any]]:
    import torch

    torch.set_num_threads(1)  # one core per worker: two runs side by side use the machine fully
    method, buffer, seed, dataset, overrides = job
    r = run_one(method, buffer, seed, dataset, **overrides)
    keep = ("average_accuracy", "forgetting", "wall_time_s", "accuracy_matrix", "predictor", "head_average_accuracy")
    return (method, buffer, seed), {"seed": seed, **{k: r.get(k) for k in keep}, "provenance": provenance()}


def rows_for(dataset: str, methods: Optional[List[str]] = None, buffers: Optional[List[int]] = None) -> List[Row]:
    """The rows to run (every method with a preset for the dataset's protocol): all of them, or those of
    ``methods``; methods with a memory only at ``buffers`` (methods without one ignore the filter and always
    run)."""
    rows = list(presets.table(PROTOCOL[dataset]))
    known = sorted({m for m, _ in rows})
    unknown = sorted(set(methods or []) - set(known))
    if unknown:
        raise SystemExit(f"reproduce.py: unknown method(s) {unknown} for {PROTOCOL[dataset]}; choose from {known}")
    return [(m, b) for m, b in rows if (not methods or m in methods) and (b is None or not buffers or b in buffers)]


def run_all(
    dataset: str,
    seeds: List[int],
    workers: int,
    rows: Optional[List[Row]] = None,
    **overrides: Any,
) -> Dict[Row, List[Dict[str, Any]]]:
    rows = rows if rows is not None else rows_for(dataset)
    jobs = [(m, b, s, dataset, overrides) for (m, b) in rows for s in seeds]
    results: Dict[Row, List[Dict[str, Any]]] = {}
    for (method, buffer, seed), r in run_jobs(_worker, jobs, workers):
        results.setdefault((method, buffer), []).append(r)
        print(
            f"  {method:<10} buffer {buffer or '-':<4} seed {seed}: Class-IL "
            f"{100 * r['average_accuracy']['class_il']:.2f}%  Task-IL {100 * r['average_accuracy']['task_il']:.2f}%"
            f"  ({r['wall_time_s']:.1f} s)",
            flush=True,
        )
    # The pool hands runs back as they finish: each row's runs go back into the order of ``seeds``.
    return {k: sorted(results[k], key=lambda r: seeds.index(r["seed"])) for k in rows}


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
    regularisers = [m for m in presets.methods() if m not in presets.BASELINES and catalog.get(m).regulariser]
    for method in regularisers:
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


def open_failures(failures: List[str], protocol: str = "seq-mnist") -> List[str]:
    """The failures that no known gap of the protocol (the presets' ``known_gap`` entries) explains. The CI
    test tolerates exactly these; any other failure fails it, and a gap that closes shows as an unused entry."""
    gaps = known_gaps(protocol)
    return [f for f in failures if not any(key in f for key in gaps)]


NOTES_FASHION_MNIST = """\
- Fashion-MNIST is a harder dataset than MNIST, so these numbers are not comparable with the paper's
  Seq-MNIST table; the hyperparameters, tuned by the paper on MNIST, are used unchanged."""

# Every difference found between this reproduction and the DER authors' code (aimagelab/mammoth:
# datasets/seq_mnist.py, backbone/MNISTMLP.py, models/{er,der,derpp,agem,si}.py, utils/buffer.py,
# utils/training.py, utils/best_args.py), and what was done about it: a markdown table kept beside this script.
DIFFERENCES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seq_mnist_differences.md")


def render(
    dataset: str,
    seeds: List[int],
    table,
    total_s: float,
    command: str,
    failures: List[str],
    workers: int,
    recorded: List[Optional[Dict[str, str]]],
) -> str:
    """The markdown page; ``recorded``: the provenance the raw results hold (None for runs saved without)."""
    machine, versions = provenance_lines(recorded)
    protocol = PROTOCOL[dataset]
    lines = [
        f"# Reproduction: the DER paper's {PROTOCOL[dataset]} protocol on Split {dataset}",
        "",
        "Generated by `benchmarks/reproduce.py`; do not edit by hand.",
        "",
        f"- Command: {command}",
        f"- Seeds: {', '.join(map(str, seeds))} (mean ± sample std over seeds)",
        f"- {versions}",
        f"- {machine}",
        f"- Total wall time: {total_s / 60:.1f} min ({total_s:.0f} s), {workers} run(s) in parallel, one thread each"
        if total_s == total_s
        else "- Total wall time: not recorded with these raw results (see the per-run times)",
        f"- Protocol: {PROTOCOL_TEXT[PROTOCOL[dataset]]}; plain SGD, single head; hyperparameters: the paper's "
        f"best for {PROTOCOL[dataset]} (the methods' presets, `src/synapse/experiments/presets/`).",
        "",
        "| Method | Buffer | Class-IL (%) | Task-IL (%) | Forgetting, Class-IL (%) | Wall time / run (s) |",
        "|---|---|---|---|---|---|",
    ]
    for (method, buffer), row in table.items():
        forgetting = "n/a" if method == "joint" else f"{row['forgetting'][0]:.2f} ± {row['forgetting'][1]:.2f}"
        lines.append(
            f"| {display_name(method)} | {buffer or '-'} | {row['class_il'][0]:.2f} ± {row['class_il'][1]:.2f} | "
            f"{row['task_il'][0]:.2f} ± {row['task_il'][1]:.2f} | {forgetting} | {row['wall_time_s'][0]:.1f} |"
        )
    heads = [(key, row) for key, row in table.items() if "class_il_head" in row]
    if heads:
        lines += ["", "Methods with their own predictor are scored by it above; their model's own head scores:", ""]
        for (method, buffer), row in heads:
            lines.append(
                f"- {display_name(method)}, buffer {buffer}: head Class-IL {row['class_il_head'][0]:.2f} ± "
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
    gaps = known_gaps(protocol)
    used = [key for f in failures for key in gaps if key in f]  # in the order of the failures they explain
    if used:
        lines += ["", "What was checked where a finding does not hold:", ""]
        lines += [f"- {gaps[key]}" for key in dict.fromkeys(used)]
    grids = tuned_grids(protocol)
    tuned = sorted({m for m, _ in table} & set(grids))
    if tuned:
        lines += ["", "## Hyperparameters chosen on a validation split", ""]
        for m in tuned:
            grid = ", ".join(f"`{k}` in {v}" for k, v in grids[m].items())
            lines.append(f"- {display_name(m)}: grid {grid} (`benchmarks/tune.py`)")
    if PROTOCOL[dataset] == "seq-mnist":
        with open(DIFFERENCES_FILE) as f:
            lines += ["", "## Differences from the authors' code, and what was done", "", f.read().strip()]
    if dataset == "fashion-mnist":
        lines += ["", "## Notes", "", NOTES_FASHION_MNIST]
    return "\n".join(lines) + "\n"


def results_from_raw(raw: Dict[str, Any]) -> Dict[Row, List[Dict[str, Any]]]:
    """The per-seed runs of a raw results file (``{"method/buffer": [run, ...]}``, ``_meta`` aside), by row."""
    results = {}
    for key, runs in raw.items():
        if key != "_meta":
            method, buffer = key.rsplit("/", 1)
            results[(method, None if buffer == "None" else int(buffer))] = runs
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist", choices=sorted(PROTOCOL))
    add_table_arguments(p, "only these rows: the CLI's --synapse_type names, plus sequential and joint")
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
        "--merge",
        nargs="+",
        default=[],
        metavar="PARTIAL",
        help="with --from-json: replace rows with those of filtered runs' raw results (their --output's .json), "
        "record each re-run's command in the raw results and the page, and save the merged raw results",
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
        for path in args.merge:  # rows re-run since the full run, each with its own command
            with open(path) as f:
                partial = json.load(f)
            partial_meta = partial.pop("_meta", {})
            raw.update(partial)
            rerun = {"command": partial_meta.get("command"), "rows": sorted(partial)}
            meta.setdefault("reruns", []).append({**rerun, "total_s": partial_meta.get("total_s")})
        if args.merge:
            with open(args.from_json, "w") as f:
                json.dump({"_meta": meta, **raw}, f)
        results = results_from_raw(raw)
        args.seeds = meta.get("seeds", args.seeds)
        total = meta.get("total_s", float("nan"))
        reruns = "".join(
            f"; rows {', '.join(r['rows'])} re-run since by `{r['command']}` ({(r['total_s'] or 0) / 60:.1f} min)"
            for r in meta.get("reruns", [])
        )
        # The numbers are the runs' own: the page states their commands, whichever command renders it.
        command = f"`{meta.get('command', 'python benchmarks/reproduce.py')}`{reruns}"
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
    recorded = [r.get("provenance") for runs in results.values() for r in runs]
    shown = command if args.from_json else f"`{command.strip()}`"
    text = render(args.dataset, args.seeds, table, total, shown, failures, args.workers, recorded)
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
        # The committed raw results only from a full run to the default output; otherwise beside the output.
        full = args.output is None and not (args.methods or args.buffers)
        raw = os.path.join(ROOT, "benchmarks", "results", f"reproduce_{args.dataset}.json")
        raw = raw if full else os.path.splitext(output)[0] + ".json"
        os.makedirs(os.path.dirname(os.path.abspath(raw)), exist_ok=True)
        meta = {"total_s": total, "seeds": args.seeds, "command": command.strip()}
        if not args.from_json:
            with open(raw, "w") as f:
                json.dump({"_meta": meta, **{f"{m}/{b}": runs for (m, b), runs in results.items()}}, f)
        print(f"written to {output} and {raw}")
    return 1 if open_failures(failures, PROTOCOL[args.dataset]) else 0


if __name__ == "__main__":
    sys.exit(main())
