"""What one checkpoint of the experiment program costs, against one training step, to choose the default of
``--checkpoint_every``.

For each model, a DER++ experiment (buffer 500, the CLI's defaults) on Split Fashion-MNIST trains until its
memory is full (a checkpoint then holds all of it), then times ``--steps`` training steps and ``--saves``
checkpoints, each a whole ``Experiment.save()``: the state gathered, written beside the old file and flushed
to disk (fsync), read back to verify it, and rotated in. Medians over the repeats, in wall time and in this
process's CPU time (the second is what an idle machine would show when other jobs share the cores).

- ``mlp``: the DER paper's MNIST protocol (784-100-100 MLP, batch 10), what ``synapse`` runs by default.
- ``resnet18-reduced``: the CIFAR protocols' model and batch (32), here on Fashion-MNIST's 1x28x28 images
  (CIFAR is not available offline on the machines this was run on; a CIFAR step and buffer are larger).

    OMP_NUM_THREADS=1 python benchmarks/checkpoint_cost.py            # 1 thread, as the tests' machines
    python benchmarks/checkpoint_cost.py --models mlp --saves 5       # a quick look

Prints a markdown table and writes benchmarks/results/checkpoint_cost.json (``--json`` elsewhere). The
last column is the share of training time that checkpoints take at the default interval (DEFAULT_EVERY).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

import torch  # noqa: E402

from synapse.experiments.checkpoint import DEFAULT_EVERY, parse_every  # noqa: E402
from synapse.experiments.loop import train_epoch  # noqa: E402
from synapse.experiments.run import Config, Experiment  # noqa: E402

BATCH = {"mlp": 10, "resnet18-reduced": 32}


def measure(model: str, steps: int, saves: int, threads: int) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        exp = Experiment(
            Config(
                model=model,
                batch_size=BATCH[model],
                output_dir=out,
                threads=threads,
                quiet=True,
                checkpoint_every="off",
            )
        )
        x, y = exp.train_sets[0]
        batch = exp.cfg.batch_size
        assert batch is not None

        def train(num_steps: int) -> Tuple[float, float]:
            order = torch.randint(0, len(y), (num_steps * batch,), generator=exp.data_gen).to(exp.device)
            start, cpu = time.perf_counter(), time.process_time()
            train_epoch(
                exp.model, exp.optimizer, exp.synapse, x, y, order, batch, 0, exp.spec.augment, exp.data_gen,
                lambda *_: False, lambda: None,
            )  # fmt: skip
            return time.perf_counter() - start, time.process_time() - cpu

        train(-(-exp.cfg.buffer_size // batch) + 5)  # fill the memory (reservoir: one item per item seen)
        step_s, step_cpu = zip(*(train(steps) for _ in range(3)))
        step_s, step_cpu = [t / steps for t in step_s], [t / steps for t in step_cpu]
        save_s, save_cpu = [], []
        for _ in range(saves):
            start, cpu = time.perf_counter(), time.process_time()
            exp.save()
            save_s.append(time.perf_counter() - start)
            save_cpu.append(time.process_time() - cpu)
        size = os.path.getsize(os.path.join(out, "checkpoint.pt"))
    step, save = statistics.median(step_s), statistics.median(save_s)
    cpu_step, cpu_save = statistics.median(step_cpu), statistics.median(save_cpu)
    interval = parse_every(DEFAULT_EVERY).seconds
    assert interval is not None
    return {
        "model": model,
        "batch_size": batch,
        "step_ms": 1e3 * step,
        "checkpoint_ms": 1e3 * save,
        "checkpoint_mb": size / 2**20,
        "checkpoint_in_steps": save / step,
        "overhead_at_default_percent": 100 * save / interval,
        # CPU time of this process: what a busy machine (other jobs sharing the cores) leaves out of the
        # wall times above; a checkpoint's disk waits (fsync) are in the wall time only.
        "cpu_step_ms": 1e3 * cpu_step,
        "cpu_checkpoint_ms": 1e3 * cpu_save,
        "cpu_checkpoint_in_steps": cpu_save / cpu_step,
        "step_ms_runs": [1e3 * s for s in step_s],
        "checkpoint_ms_runs": [1e3 * s for s in save_s],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(BATCH), choices=list(BATCH))
    p.add_argument("--steps", type=int, default=20, help="training steps per timing (3 timings)")
    p.add_argument("--saves", type=int, default=7, help="checkpoints timed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "checkpoint_cost.json"))
    args = p.parse_args()
    rows: List[Dict[str, Any]] = []
    for m in args.models:
        rows.append(measure(m, args.steps, args.saves, args.threads))
        print(f"{m}: {rows[-1]}", flush=True)
    print(f"default --checkpoint_every {DEFAULT_EVERY}; {args.threads} thread(s); {platform.processor() or ''}")
    print(
        "| model | batch | step (ms) | checkpoint (ms) | checkpoint (MB) | checkpoint / step | cost at default "
        "| CPU: step, checkpoint (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['batch_size']} | {r['step_ms']:.2f} | {r['checkpoint_ms']:.1f} | "
            f"{r['checkpoint_mb']:.2f} | {r['checkpoint_in_steps']:.1f} steps | "
            f"{r['overhead_at_default_percent']:.4f}% | {r['cpu_step_ms']:.2f}, {r['cpu_checkpoint_ms']:.1f} |"
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(
            {
                "command": "python benchmarks/checkpoint_cost.py " + " ".join(sys.argv[1:]),
                "default": DEFAULT_EVERY,
                "threads": args.threads,
                "cpus": os.cpu_count(),
                "torch": torch.__version__,
                "rows": rows,
            },
            f,
            indent=2,
        )
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
