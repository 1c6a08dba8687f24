"""Record, in a benchmark cache made before caches recorded it, each run's resolved configuration
(``_runner.resolved_config``) as the code that made the run resolved it.

Every entry names the commit that made it (its ``provenance``). For each such commit this script checks the
commit out into a temporary worktree and, in a fresh process importing that commit's code, rebuilds each
entry's configuration with that commit's own benchmark script and resolves it with that commit's checks and
protocol defaults; what the entry itself records it was given (a pretrained-signal run's ``setting``) wins over
the commit's code, since a run's tree may have been ahead of its commit. The entry then gets ``"config"`` and
``"config_stamp"`` (which commit resolved it, and whether the run's tree had uncommitted changes, which nothing
can recover). Entries that already record a
configuration, or name no commit, are left as they are (a cache ignores an entry without one: it runs again).

    python benchmarks/stamp_configs.py pretrained_signal benchmarks/results/pretrained_signal_runs.jsonl
    python benchmarks/stamp_configs.py protocols benchmarks/results/protocols_runs.jsonl
    python benchmarks/stamp_configs.py vision_fmnist benchmarks/results/vision_fmnist.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Dict, List

from _runner import ROOT, Cache

# The field every run of a script's cache has (the scripts' other entries, if any, are not runs).
RUN_FIELD = {"pretrained_signal": "method", "protocols": "method", "vision_fmnist": "model"}

# Run at the entry's commit, in its benchmarks folder: rebuild each entry's Config with that commit's own
# script, then resolve it as ``_runner.resolved_config`` does (written out here, since old commits lack it).
RESOLVE = r"""
import dataclasses, inspect, json, sys
sys.path.insert(0, "benchmarks")
from synapse.experiments.config import IDENTITY, validate
from synapse.experiments.datasets import DATASETS

def config_of(script, entry):
    if script == "pretrained_signal":
        import pretrained_signal as s
        wanted = {"lr": entry.get("lr"), "validation": entry.get("validation_ratio") is not None}
        accepted = inspect.signature(s.config).parameters
        extra = {k: v for k, v in wanted.items() if k in accepted}
        if set(wanted) - set(extra) and any(v not in (None, False) for v in wanted.values()):
            raise SystemExit("this commit's config() cannot build the entry")
        cfg = s.config(entry["method"], entry["buffer"], entry["seed"], s.WEIGHTS, **extra)
        # What the entry records it was given wins over the commit's code (a run's tree may have been ahead).
        given = entry["setting"]
        return dataclasses.replace(cfg, model_args=given["model_args"], first_task_classes=given["first"],
                                   classes_per_task=given["per_task"], max_train_per_task=given["max_train"],
                                   method_args={**cfg.method_args, **given.get("method_args", {})})
    if script == "vision_fmnist":
        import vision_fmnist as s
        return s.config(entry["model"], entry["replay_augment"], entry["seed"])
    import protocols as s
    import _runner
    return _runner.config_for(s.DATASET[entry["protocol"]], entry["method"], entry["buffer"], entry["seed"],
                              True, hp=entry["values"], **entry["overrides"])

script, entries = sys.argv[1], json.load(sys.stdin)
out = []
for entry in entries:
    cfg = validate(config_of(script, entry))
    cfg = cfg.with_protocol(DATASETS[cfg.dataset])
    identity = {field: getattr(cfg, field) for field in IDENTITY}
    if identity.get("pretrained") is not None:
        identity["pretrained"] = "sha256:" + entry["weights_sha256"]
    out.append(json.loads(json.dumps(identity)))
print(json.dumps(out))
"""


def stamp(script: str, path: str) -> int:
    """Stamp every entry of ``path`` that lacks a configuration; returns how many were stamped."""
    entries = Cache(path).entries()
    by_commit: Dict[str, List[int]] = {}
    for i, entry in enumerate(entries):
        commit = (entry.get("provenance") or entry.get("result", {}).get("provenance") or {}).get("commit")
        if "config" not in entry and RUN_FIELD[script] in entry and commit and commit != "unknown":
            by_commit.setdefault(commit, []).append(i)
    for commit, indices in by_commit.items():
        clean = commit.removesuffix("+dirty")
        with tempfile.TemporaryDirectory() as tree:
            subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", tree, clean], check=True,
                           capture_output=True)  # fmt: skip
            try:
                env = {**os.environ, "PYTHONPATH": os.path.join(tree, "src")}
                done = subprocess.run(
                    [sys.executable, "-c", RESOLVE, script],
                    input=json.dumps([entries[i] for i in indices]),
                    cwd=tree, env=env, capture_output=True, text=True, check=False,
                )  # fmt: skip
            finally:
                subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], check=True)
        if done.returncode != 0:
            raise SystemExit(f"resolving at {clean} failed:\n{done.stderr}")
        dirty = " (the run's tree had uncommitted changes)" if commit.endswith("+dirty") else ""
        note = f"resolved at {clean}{dirty}"
        for i, config in zip(indices, json.loads(done.stdout)):
            entries[i] = {**entries[i], "config": config, "config_stamp": note}
        print(f"{commit}: {len(indices)} entr{'y' if len(indices) == 1 else 'ies'} stamped", flush=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in entries)
    return sum(map(len, by_commit.values()))


def main(argv: Any = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("script", choices=sorted(RUN_FIELD))
    parser.add_argument("cache", help="the JSON-lines cache to stamp in place")
    args = parser.parse_args(argv)
    print(f"{stamp(args.script, args.cache)} entries stamped in {args.cache}")


if __name__ == "__main__":
    main()
