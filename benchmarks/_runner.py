"""What the benchmark scripts share: rows from the catalog's presets, one run, the process pool, the JSON-lines
cache, provenance recorded with raw results, and the lines that render it.

``reproduce.py``, ``protocols.py``, ``crosscheck.py`` and ``step_overhead.py`` keep only their protocol, their
checks and their tables. Every method, its display name and its values come from ``synapse.catalog`` and
``synapse.experiments.presets``, so a new method file reaches every benchmark with no edit here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "src") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "src"))

from synapse.experiments import presets  # noqa: E402

Row = presets.Row


# ------------------------------------------------------------------------------------------------ rows
def display_name(method: str) -> str:
    """A method's name in the tables (the catalog's display name; SGD and Joint for the baselines)."""
    return presets.display_name(method)


def order_key(method: str) -> int:
    """A method's position in the tables: baselines first, then the catalog's ``order``."""
    return presets.methods().index(method)


def config_for(
    dataset: str,
    method: str,
    buffer: Optional[int],
    seed: int,
    fused: bool = True,
    hp: Optional[Dict[str, Any]] = None,
    **overrides: Any,
):
    """The experiment's configuration for one row: its preset for the dataset's protocol, or ``hp`` in its
    place (e.g. when tuning); ``overrides`` are further ``Config`` fields."""
    from synapse.experiments.run import Config

    protocol = presets.protocol_of(dataset)
    if protocol is None:
        raise ValueError(f"{dataset} runs no protocol with presets; known: {presets.PROTOCOLS}")
    hp = dict(presets.values(method, protocol, buffer) if hp is None else hp)
    training_type = method if method in presets.BASELINES else "continual"
    method_args = {k: v for k, v in hp.items() if k not in presets.RUN_KEYS}
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
        device="cpu" if protocol != "seq-cifar10" else "auto",  # a small MLP is fastest on the CPU
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


def summarize(results: Dict[Row, List[Dict[str, Any]]]) -> Dict[Row, Dict[str, Tuple[float, float]]]:
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


def add_table_arguments(parser: Any, methods_help: str) -> None:
    """The options of the scripts that run a table of rows over seeds: ``--seeds``, ``--workers`` and
    ``--methods`` (its help ``methods_help``), in that order (the order of their ``--help``)."""
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=None, help=methods_help)


# ------------------------------------------------------------------------------------ pool and cache
def run_jobs(work: Callable[[Any], Any], jobs: Sequence[Any], workers: int) -> Iterator[Any]:
    """``work(job)`` for every job, as they finish: ``workers`` spawned processes (one thread each is the
    worker's job), or in this process when there is one worker or one job."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(work, jobs)
        return
    with mp.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap_unordered(work, jobs)


def resolved_config(cfg: Any) -> Dict[str, Any]:
    """What a run of the experiment configuration ``cfg`` computes, in full, as JSON: its checkpoint identity
    (``config.IDENTITY``) after the checks and defaults the experiment applies: the method's catalog defaults
    filled in, the dataset's protocol (or the model family's) defaults applied. A pretrained weights file is
    named by its SHA-256, not its path.

    A cache entry that records it counts only while today's code resolves the row to the same thing, so that a
    changed preset, catalog default or protocol default runs again instead of serving the old runs."""
    from synapse.experiments.config import IDENTITY, validate
    from synapse.experiments.datasets import DATASETS

    cfg = validate(cfg).with_protocol(DATASETS[cfg.dataset])
    identity = {field: getattr(cfg, field) for field in IDENTITY}
    if identity["pretrained"] is not None:
        identity["pretrained"] = "sha256:" + file_sha256(identity["pretrained"])
    return json.loads(json.dumps(identity))  # tuples as lists, as a cache file holds them


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's bytes (hex); read once per version of the file (path, size, mtime)."""
    stat = os.stat(path)
    return _sha256(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


def same_config(recorded: Optional[Dict[str, Any]], today: Dict[str, Any]) -> bool:
    """Whether a cache entry's recorded :func:`resolved_config` is the run ``today``'s resolves to. A setting
    added to the experiment since the entry was made counts as the same when today's value is its default
    (new settings default to the old behaviour); an entry that recorded nothing never counts."""
    if recorded is None or set(recorded) - set(today):
        return False
    from synapse.experiments.config import identity_defaults

    defaults = json.loads(json.dumps(identity_defaults()))  # as a cache file holds them
    return all(recorded[k] == v if k in recorded else v == defaults.get(k) for k, v in today.items())


@functools.cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Cache:
    """A JSON-lines file of finished runs: a rerun reads what is there and appends what it adds (each run's
    result carries the :func:`provenance` of the process that made it). ``None`` as the path: nothing is kept.
    Entries record the :func:`resolved_config` of their run under ``"config"``."""

    def __init__(self, path: Optional[str]) -> None:
        self.path = path

    def entries(self) -> List[Dict[str, Any]]:
        if not self.path or not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def append(self, entry: Dict[str, Any]) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")


# ------------------------------------------------------------------------------------------ provenance
def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def cpu_model() -> str:
    """The CPU's model name, with its family, model and stepping where Linux reports them: a virtual machine's
    name may hide the generation ("AMD EPYC"), which a render should name beside the kernels it used."""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not key.strip():
                    break  # the first processor's block is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = fields.get("model name") or platform.processor() or platform.machine()
    generation = [f"{name} {fields[key]}" for key, name in (("cpu family", "family"), ("model", "model"),
                                                              ("stepping", "stepping")) if key in fields]  # fmt: skip
    return " ".join([cpu, *generation])


def provenance(threads: Optional[int] = None) -> Dict[str, str]:
    """What made a raw result: the commit (``+dirty`` with uncommitted changes to tracked files), the machine,
    torch's CPU threads and the library versions. Recorded with every raw result, so that a render states
    where its numbers came from rather than where it was rendered. The threads and the CPU's instruction set
    matter: the summation order and rounding change with them, and a run's numbers with it (by points, for
    MIR, whose top-k follows float rounding). ``threads``: those each run uses, where a parent process records
    the provenance for workers that set their own (default: this process's)."""
    import numpy
    import torch

    import synapse

    commit = _git("rev-parse", "--short=12", "HEAD") or "unknown"
    if commit != "unknown" and _git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    threads = threads or torch.get_num_threads()
    return {
        "commit": commit,
        "machine": f"{cpu_model()} ({_kernels()} kernels), {os.cpu_count()} cores, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, {threads} torch thread(s) per run",
        "versions": f"Synapse {synapse.__version__}, torch {torch.__version__}, numpy {numpy.__version__}",
    }


def _kernels() -> str:
    """The CPU instruction set torch's kernels and MKL use here (``AVX512``, ``AVX2``, ...). It changes float
    rounding, and so the numbers: at one thread, this machine's AVX-512 gives the committed seed-0 values of
    ER 200, DER++ 500 and GDumb 500, and the same code forced to AVX2 (``ATEN_CPU_CAPABILITY=avx2
    MKL_ENABLE_INSTRUCTIONS=AVX2``) gives other values (73.03, 81.48 and 74.24)."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


NOT_RECORDED = "not recorded with these raw results"


def load_results(paths: Iterable[str]) -> List[Tuple[str, Dict[str, Any]]]:
    """Each raw result file, in the order given, as its path from the repository root (what a page names)
    and its JSON."""
    loaded = []
    for path in paths:
        with open(path) as f:
            loaded.append((os.path.relpath(path, ROOT), json.load(f)))
    return loaded


def mean_std(values: Sequence[float], digits: int = 1) -> str:
    """``mean ± std`` of ``values`` at ``digits`` decimals (the sample standard deviation; 0 for one value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def percent_over_seeds(fractions: Sequence[float], digits: int = 1) -> str:
    """Fractions as percent: one value alone, several as :func:`mean_std` over them (the seeds)."""
    values = [100 * x for x in fractions]
    return mean_std(values, digits) if len(values) > 1 else f"{values[0]:.{digits}f}"


def provenance_lines(recorded: Iterable[Optional[Dict[str, str]]]) -> Tuple[str, str]:
    """The "Machine:" and versions lines of a render, from the provenance its raw results recorded (one per
    run, or one for them all): each distinct value once, in the order first seen, and
    :data:`NOT_RECORDED` for runs saved before provenance was kept."""
    machines: List[str] = []
    versions: List[str] = []
    for prov in recorded:
        machine = f"{prov['machine']} (commit {prov['commit']})" if prov else NOT_RECORDED
        version = prov["versions"] if prov else NOT_RECORDED
        for seen, value in ((machines, machine), (versions, version)):
            if value not in seen:
                seen.append(value)
    return "Machine: " + "; ".join(machines or [NOT_RECORDED]), "Versions: " + "; ".join(versions or [NOT_RECORDED])


def page_arguments(argv: List[str]) -> List[str]:
    """The arguments that decide a page's runs, for its "Command:" line: a render that runs nothing
    (``--render-only``), or one written elsewhere (``--output``), states the command of the runs it shows."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--output":
            skip = True
        elif arg != "--render-only" and not arg.startswith("--output="):
            kept.append(arg)
    return kept


def _around_section(content: str, name: str) -> Optional[Tuple[str, str]]:
    """What stands before ``<!-- name -->`` and after ``<!-- /name -->`` in ``content`` (None without both
    markers, in that order)."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    head, found, rest = content.partition(start)
    if not found or end not in rest:
        return None
    return head, rest.split(end, 1)[1]


def has_section(path: str, name: str) -> bool:
    """Whether ``path`` holds the markers ``<!-- name -->`` ... ``<!-- /name -->``, in that order."""
    with open(path) as f:
        return _around_section(f.read(), name) is not None


def write_section(path: str, name: str, text: str) -> None:
    """Replace what stands between ``<!-- name -->`` and ``<!-- /name -->`` in ``path`` (a generated table in a
    page); without both markers, in that order, the file is left as it was."""
    with open(path) as f:
        around = _around_section(f.read(), name)
    if around is None:
        raise SystemExit(f"{path} lacks the markers <!-- {name} --> ... <!-- /{name} -->; it was not changed")
    with open(path, "w") as f:
        f.write(f"{around[0]}<!-- {name} -->\n{text}\n<!-- /{name} -->{around[1]}")
