"""Choose hyperparameters on a validation split, never on the test set.

For methods without published Seq-MNIST values (presets whose source is ``validation-grid``), and for the second
rows of the protocols where the paper's values diverge (a preset's ``tuned`` block: its grid on top of the
paper's row), every point of the grid runs the protocol with a seeded random ``--validation_ratio`` of each
task's training data held out; the score is the final Class-IL accuracy averaged over those held-out parts
(the test sets are not read). A point's score is its mean over ``--seeds``; the best point per method and
buffer is printed, to be copied into the method's preset file (``src/synapse/experiments/presets/<method>.json``).

    python benchmarks/tune.py --methods mas er-ace           # seeds 0 and 1, 10% held out
    python benchmarks/tune.py --methods mas --json tune.json
    python benchmarks/tune.py --dataset perm-fashion-mnist --methods der der++ --seeds 0
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _runner import presets, provenance, run_jobs, run_one  # noqa: E402

Job = Tuple[str, Optional[int], Dict[str, Any], int, str, float]


def grids(protocol: str) -> List[Tuple[str, Optional[int], Dict[str, Any], Dict[str, List[Any]]]]:
    """``(method, buffer, base, grid)`` for every preset row of ``protocol`` chosen on a validation split: the
    ``validation-grid`` entries and the ``tuned`` second rows; ``base`` is the row's first preset (the paper's
    values, for a second row), which the grid's keys replace."""
    found = []
    for method in presets.methods():
        for tuned in (False, True):
            entry = presets.block(method, protocol, tuned) or {}
            if entry.get("source") == "validation-grid":
                for row in entry["rows"]:
                    base = presets.values(method, protocol, row["buffer"])
                    found.append((method, row["buffer"], base, entry["grid"]))
    return found


def grid_points(base: Dict[str, Any], grid: Dict[str, List[Any]]) -> List[Dict[str, Any]]:
    """Every combination of ``grid``, on top of ``base`` (for the keys the grid leaves)."""
    keys = list(grid)
    return [{**base, **dict(zip(keys, values))} for values in itertools.product(*(grid[k] for k in keys))]


def _score(job: Job) -> Tuple[Job, float, Dict[str, str]]:
    import torch

    torch.set_num_threads(1)
    method, buffer, hp, seed, dataset, ratio = job
    results = run_one(method, buffer, seed, dataset, hp=hp, validation_ratio=ratio, evaluate_on="validation")
    return job, results["average_accuracy"]["class_il"], provenance()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    datasets = sorted(d for ds in presets.PROTOCOLS.values() for d in ds)
    p.add_argument("--dataset", default="fashion-mnist", choices=datasets)
    p.add_argument("--methods", nargs="+", default=None, help="default: every method with a grid for the dataset")
    p.add_argument("--buffers", type=int, nargs="+", default=None, help="only the rows at these buffer sizes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="a point's score is its mean over these seeds")
    p.add_argument("--validation_ratio", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", default=None, help="write every grid point's validation score here")
    args = p.parse_args()
    rows = grids(str(presets.protocol_of(args.dataset)))
    known = sorted({m for m, *_ in rows})
    unknown = sorted(set(args.methods or []) - set(known))
    if unknown:
        p.error(f"no grid for {unknown} on {args.dataset}; methods with one: {known}")
    jobs: List[Job] = [
        (m, b, hp, seed, args.dataset, args.validation_ratio)
        for m, b, base, grid in rows
        if (args.methods is None or m in args.methods) and (args.buffers is None or b in args.buffers)
        for hp in grid_points(base, grid)
        for seed in args.seeds
    ]
    per_seed: Dict[Tuple[str, Optional[int], str], List[float]] = {}
    made: Dict[str, str] = {}  # the provenance of the runs (the last one's)
    for (m, b, hp, seed, *_), score, prov in run_jobs(_score, jobs, args.workers):
        made = prov
        per_seed.setdefault((m, b, json.dumps(hp, sort_keys=True)), []).append(score)
        print(f"  {m:<8} buffer {b or '-':<4} {hp} seed {seed}: validation Class-IL {100 * score:.2f}%", flush=True)
    scores: Dict[Tuple[str, Optional[int]], List[Tuple[float, Dict[str, Any]]]] = {}
    for (m, b, hp_text), values in per_seed.items():  # a point that diverged for any seed scores low
        scores.setdefault((m, b), []).append((sum(values) / len(values), json.loads(hp_text)))
    print("\nbest on the validation split:")
    for (m, b), points in sorted(scores.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        score, hp = max(points, key=lambda point: point[0])
        print(f"  ({m!r}, {b}): {hp}  # validation Class-IL {100 * score:.2f}%")
    if args.json:
        with open(args.json, "w") as f:
            points = [{"method": m, "buffer": b, "hp": hp, "score": s} for (m, b), v in scores.items() for s, hp in v]
            run = {"dataset": args.dataset, "seeds": args.seeds, "validation_ratio": args.validation_ratio}
            json.dump({**run, "provenance": made, "points": points}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
