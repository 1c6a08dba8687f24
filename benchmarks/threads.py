"""Wall time of the CLI's demo experiment against the number of CPU threads torch may use.

The demo is Split Fashion-MNIST with DER++ (buffer 500) under the DER paper's Seq-MNIST protocol: a
784-100-100 MLP, batch 10, one epoch per task, on the CPU (what ``make demo`` runs). Its steps are tiny,
so torch's default of one thread per core costs more in synchronisation than it gains; this measures by
how much, to choose the default of the CLI's ``--threads``. Each thread count runs in a fresh process
(torch's thread pool cannot be shrunk reliably once used), ``--repeats`` times, interleaved so that a
slow spell of the machine hits every count alike; the table gives the median.

    python benchmarks/threads.py                     # 1, 2, 4, ... up to the number of CPUs
    python benchmarks/threads.py --threads 1 2 3 4   # chosen counts
    python benchmarks/threads.py --max_train_per_task 2000 --repeats 1   # a quick look

Writes benchmarks/results/threads_<N>cpu.json (N: the CPUs this process may use) and prints a markdown
table; ``--json`` writes elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The child: one demo run with the given thread count; prints its timings as one JSON line.
CHILD = """
import json, sys, time
sys.path.insert(0, {src!r})
import torch
from synapse.experiments.run import Config, Experiment

start = time.perf_counter()
exp = Experiment(Config(dataset="fashion-mnist", dataset_dir={dataset_dir!r}, training_type="continual",
                        synapse_type="der++", buffer_size=500, quiet=True, device="cpu", threads={threads},
                        max_train_per_task={max_train}, max_test_per_task={max_test}))
r = exp.run()
print(json.dumps({{
    "threads_in_effect": torch.get_num_threads(),
    "config_threads": r["config"]["threads"],
    "training_s": sum(row["seconds"] for row in r["epoch_log"]),
    "run_s": r["wall_time_s"],
    "process_s": time.perf_counter() - start,
    "class_il": r["average_accuracy"]["class_il"],
    "torch": torch.__version__,
}}))
"""


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, else all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_average() -> Optional[float]:
    """The 1-minute load average (None where the OS has none): how busy the machine was."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def default_counts(cpus: int) -> List[int]:
    """1, 2, 4, ... below ``cpus``, then ``cpus`` itself."""
    counts, t = [], 1
    while t < cpus:
        counts.append(t)
        t *= 2
    return counts + [cpus]


def run_once(threads: int, args: argparse.Namespace) -> Dict[str, Any]:
    code = CHILD.format(
        src=os.path.join(ROOT, "src"),
        dataset_dir=args.dataset_dir,
        threads=threads,
        max_train=args.max_train_per_task,
        max_test=args.max_test_per_task,
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"the run with {threads} threads failed (exit {proc.returncode}):\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["threads_in_effect"] != threads:
        raise SystemExit(f"asked for {threads} threads, torch used {result['threads_in_effect']}")
    return result


def table_lines(rows: List[Dict[str, Any]]) -> List[str]:
    best = min(r["training_s"] for r in rows)
    lines = [
        "| threads | training (s) | whole run (s) | x fastest | Class-IL |",
        "|--------:|-------------:|--------------:|----------:|---------:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['threads']:>7} | {r['training_s']:>12.2f} | {r['run_s']:>13.2f} | "
            f"{r['training_s'] / best:>8.2f}x | {100 * r['class_il']:>7.2f}% |"
        )
    return lines


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=None, help="counts to try (default: 1, 2, 4, ...)")
    p.add_argument("--repeats", type=int, default=3, help="runs per count; the table gives the median")
    p.add_argument("--dataset_dir", default="datasets")
    p.add_argument("--max_train_per_task", type=int, default=None, help="default: the whole task (12000)")
    p.add_argument("--max_test_per_task", type=int, default=None, help="default: the whole task (2000)")
    p.add_argument("--json", default=None, help="default: benchmarks/results/threads_<N>cpu.json")
    args = p.parse_args(argv)
    cpus = available_cpus()
    counts = args.threads or default_counts(cpus)
    if any(t < 1 for t in counts) or args.repeats < 1:
        p.error("--threads and --repeats must be positive")

    runs: Dict[int, List[Dict[str, Any]]] = {t: [] for t in counts}
    started = time.perf_counter()
    load_before = load_average()
    for repeat in range(args.repeats):  # interleaved: a slow spell of the machine hits every count alike
        for t in counts:
            r = run_once(t, args)
            runs[t].append(r)
            print(f"  repeat {repeat + 1}, {t} threads: training {r['training_s']:.2f} s", flush=True)

    rows = [
        {
            "threads": t,
            "training_s": statistics.median(r["training_s"] for r in rs),
            "run_s": statistics.median(r["run_s"] for r in rs),
            "process_s": statistics.median(r["process_s"] for r in rs),
            "class_il": statistics.median(r["class_il"] for r in rs),
            "training_s_all": [r["training_s"] for r in rs],
        }
        for t, rs in runs.items()
    ]
    machine = f"{platform.processor() or platform.machine()}, {cpus} CPUs available ({os.cpu_count()} in the machine)"
    torch_version = runs[counts[0]][0]["torch"]
    header = (
        f"CLI demo (Split Fashion-MNIST, DER++ buffer 500, MLP 784-100-100, batch 10, CPU), {machine}, "
        f"torch {torch_version}, median of {args.repeats} run{'s' * (args.repeats > 1)} per count"
    )
    print(header + ":\n")
    print("\n".join(table_lines(rows)))
    result = {
        "setting": header,
        "host": platform.node(),
        "machine": machine,
        "cpus": cpus,
        "torch": torch_version,
        "repeats": args.repeats,
        "max_train_per_task": args.max_train_per_task,
        "max_test_per_task": args.max_test_per_task,
        "rows": rows,
        "benchmark_s": time.perf_counter() - started,
        # Other work on the machine changes the answer: on a busy machine extra threads wait on each other.
        "load_average_1min": {"before": load_before, "after": load_average()},
    }
    print(f"\n1-minute load average: {load_before} before, {result['load_average_1min']['after']} after")
    path = args.json or os.path.join(ROOT, "benchmarks", "results", f"threads_{cpus}cpu.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
