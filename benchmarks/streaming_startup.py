"""What the streaming path saves per epoch by keeping its ``DataLoader`` workers (issue 22).

On a generated image folder, one streamed training set (:class:`synapse.experiments.streaming.Streamed`, the
experiment program's reader) is read for ``--epochs`` epochs, each in a fresh shuffled order, in two ways:

- ``persistent``: the program's path: the workers start at the first epoch and serve every later one;
- ``restarted``: the workers are ended after every epoch (``Streamed.close``), so each epoch starts new ones,
  as the program did before it kept them.

Nothing is trained: the epoch is the reading alone, where the start-up shows. The two ways alternate over
``--repeats`` rounds (a shared machine's load drifts); the table gives medians over the rounds of the first
epoch and of the later ones, and of the time each later epoch waits for its first batch.

    python benchmarks/streaming_startup.py                  # measure, write the raw JSON, print the table
    python benchmarks/streaming_startup.py --render --docs  # the table from the raw JSON, into docs/vision.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

from _runner import ROOT, provenance, provenance_lines, write_section
from vision_checks import write_folder

RESULTS = os.path.join(ROOT, "benchmarks", "results", "streaming_startup.json")
DOCS = os.path.join(ROOT, "docs", "vision.md")
MODES = ("restarted", "persistent")


def read_epochs(folder: str, size: int, workers: int, batch: int, epochs: int, restart: bool) -> List[Dict[str, float]]:
    """Each epoch's wall time and wait for its first batch, in seconds, reading the folder's training set."""
    import torch

    from synapse.experiments.datasets import load_split
    from synapse.experiments.streaming import cat, streamed_tasks

    _, tasks = load_split(f"folder:{folder}", "unused", image_size=size)
    images = cat([train for train, *_ in streamed_tasks(tasks, torch.device("cpu"), workers)])
    g = torch.Generator().manual_seed(0)
    timings = []
    try:
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=g)  # type: ignore[arg-type]
            t0 = time.perf_counter()
            first = None
            for _x, _y in images.batches(order.split(batch)):  # type: ignore[union-attr]
                first = time.perf_counter() - t0 if first is None else first
            timings.append({"epoch_s": time.perf_counter() - t0, "first_batch_s": first or 0.0})
            if restart:
                images.close()  # type: ignore[union-attr]
    finally:
        images.close()  # type: ignore[union-attr]
    return timings


def measure(images: int, size: int, workers: int, batch: int, epochs: int, repeats: int) -> Dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        folder = write_folder(root, images, size)
        rounds = {mode: [] for mode in MODES}  # type: Dict[str, List[List[Dict[str, float]]]]
        for r in range(repeats):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                rounds[mode].append(read_epochs(folder, size, workers, batch, epochs, mode == "restarted"))
    return {
        "settings": {"images": images, "size": size, "workers": workers, "batch": batch, "epochs": epochs},
        "rounds": rounds,
        "load_average": os.getloadavg(),
        "provenance": provenance(),
    }


def render(result: Dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"Reading a generated folder of {s['images']} PNG training images ({s['size']}x{s['size']}, RGB) through "
        f"the streaming path, {s['workers']} workers, batch {s['batch']}, {s['epochs']} epochs per round, "
        f"{len(result['rounds']['persistent'])} rounds per way, medians over the rounds "
        "(`python benchmarks/streaming_startup.py`; raw results: `benchmarks/results/streaming_startup.json`; "
        f"load average when it ended: {', '.join(f'{x:.1f}' for x in result['load_average'])}).",
        "",
        "| Workers | first epoch | each later epoch | a later epoch's wait for its first batch |",
        "|---|---|---|---|",
    ]
    later: Dict[str, float] = {}
    for mode in MODES:
        rounds = result["rounds"][mode]
        first = statistics.median(r[0]["epoch_s"] for r in rounds)
        later[mode] = statistics.median(e["epoch_s"] for r in rounds for e in r[1:])
        wait = statistics.median(e["first_batch_s"] for r in rounds for e in r[1:])
        name = "kept (the program's path)" if mode == "persistent" else "started anew every epoch"
        lines.append(f"| {name} | {first * 1e3:.0f} ms | {later[mode] * 1e3:.0f} ms | {wait * 1e3:.0f} ms |")
    saved = later["restarted"] - later["persistent"]
    machine, versions = provenance_lines([result["provenance"]])
    return "\n".join(
        lines + ["", f"Saved per later epoch: {saved * 1e3:.0f} ms.", "", machine + ".", "", versions + "."]
    )


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=RESULTS, help="the raw results file")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--render", action="store_true", help="run nothing: render the saved results")
    p.add_argument("--docs", action="store_true", help="also put the table into docs/vision.md")
    args = p.parse_args(argv)
    if not args.render:
        result = measure(args.images, args.size, args.workers, args.batch, args.epochs, args.repeats)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    with open(args.json) as f:
        text = render(json.load(f))
    print(text)
    if args.docs:
        write_section(DOCS, "streaming-startup", text)


if __name__ == "__main__":
    main()
