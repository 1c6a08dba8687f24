"""What experiment logging costs: the CPU demo (Split Fashion-MNIST, DER++, buffer 500, seed 0) with and
without ``--log csv tensorboard`` at the default interval, interleaved, each in a fresh process.

    python benchmarks/logging_overhead.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = ["--dataset", "fashion-mnist", "--synapse_type", "der++", "--buffer_size", "500", "--quiet", "--seed", "0"]


def training_seconds(log: list) -> float:
    """The run's own training wall time (results.json), so process start-up and data loading are excluded."""
    with tempfile.TemporaryDirectory() as out:
        extra = ["--log", *log] if log else []
        subprocess.run([sys.executable, "cli.py", *DEMO, "--output_dir", out, *extra], cwd=ROOT, check=True)
        with open(os.path.join(out, "results.json")) as f:
            return json.load(f)["wall_time_s"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--log", nargs="+", default=["csv", "tensorboard"])
    args = p.parse_args()
    times: dict = {"none": [], "logged": []}
    for _ in range(args.rounds):  # interleaved, so a slow period of the machine hits both alike
        times["none"].append(training_seconds([]))
        times["logged"].append(training_seconds(args.log))
    plain, logged = statistics.median(times["none"]), statistics.median(times["logged"])
    print(
        f"demo training time, median of {args.rounds}: without logging {plain:.2f} s; "
        f"with --log {' '.join(args.log)} {logged:.2f} s ({100 * (logged / plain - 1):+.1f}%)"
    )
    print(json.dumps(times))
    return 0


if __name__ == "__main__":
    sys.exit(main())
