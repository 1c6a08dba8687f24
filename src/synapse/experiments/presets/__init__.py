"""Best hyperparameters per (method, protocol, buffer), one JSON file per method, each value with its source.

``<method>.json`` (a catalog name, or a baseline: ``sequential``, ``joint``) holds, per protocol, where its
values come from and one row per buffer size (``null`` for a method without a memory)::

    {"method": "er", "protocols": {"seq-mnist": {
        "source": "authors-config", "reference": "aimagelab/mammoth utils/best_args.py, key seq-mnist",
        "rows": [{"buffer": 200, "values": {"lr": 0.01, "mb": 10, "joint_mean": true}}]}}}

``source`` is one of :data:`SOURCES`; ``stand-in`` rows (values the authors did not publish for that
protocol) carry a ``note`` saying where they come from, ``validation-grid`` ones the ``grid`` searched. A
protocol may also name a ``known_gap``: a finding of the paper the benchmark does not reproduce, with what
was checked. Where the paper's values fail on this data (diverge), a protocol may add a ``tuned`` block: a
second row for some of its buffers, ``validation-grid`` values with their ``grid`` and ``reference`` (the
tuning command), read with ``tuned=True``; the tables show both. In ``values``, the keys of :data:`RUN_KEYS`
are run settings (``lr`` is SGD's, ``mb`` the replay minibatch, ``batch_size`` the stream's batch); the rest
are the method's hyperparameters by catalog name.

The CLI's ``--preset PROTOCOL`` and the benchmark scripts read these files; nothing else lists the values.

Example:
    >>> from synapse.experiments import presets
    >>> presets.values("der++", "seq-mnist", 500)
    {'lr': 0.03, 'mb': 10, 'alpha': 1.0, 'beta': 0.5}
"""

from __future__ import annotations

import json
import os
from functools import cache
from typing import Any, Callable, Dict, List, NoReturn, Optional, Tuple

from synapse import catalog

__all__ = [
    "BASELINES",
    "PROTOCOLS",
    "RUN_KEYS",
    "SOURCES",
    "Row",
    "block",
    "display_name",
    "load",
    "methods",
    "protocol_of",
    "table",
    "values",
]

HERE = os.path.dirname(os.path.abspath(__file__))
Row = Tuple[str, Optional[int]]  # (method, buffer size or None)
SOURCES = ("paper", "authors-config", "validation-grid", "stand-in")
RUN_KEYS = ("lr", "mb", "weight_decay", "batch_size")
# The training types without a method: the bounds every table starts with (display name, table position).
BASELINES: Dict[str, Tuple[str, int]] = {"sequential": ("SGD (fine-tuning)", 0), "joint": ("Joint", 1)}
# Each protocol and the datasets that run it (the DER paper's protocols, on MNIST or on Fashion-MNIST).
PROTOCOLS: Dict[str, Tuple[str, ...]] = {
    "seq-mnist": ("fashion-mnist", "mnist"),
    "seq-cifar10": ("cifar10",),
    "seq-cifar100": ("cifar100",),  # CIFAR-100 in 10 tasks: the pretrained-backbone papers' protocol
    "perm-mnist": ("perm-fashion-mnist", "perm-mnist"),
    "rot-mnist": ("rot-fashion-mnist", "rot-mnist"),
    "mnist-360": ("fashion-mnist-360", "mnist-360"),
}


def protocol_of(dataset: str) -> Optional[str]:
    """The protocol a dataset runs (``'fashion-mnist'`` -> ``'seq-mnist'``), or None for one without presets."""
    return next((p for p, datasets in PROTOCOLS.items() if dataset in datasets), None)


def methods() -> List[str]:
    """The baselines, then every catalog method, in table order (each spec's ``order``, then catalog order)."""
    ranked = [(order, i, name) for i, (name, (_, order)) in enumerate(BASELINES.items())]
    ranked += [(spec.order, len(BASELINES) + i, spec.name) for i, spec in enumerate(catalog.specs())]
    return [name for *_, name in sorted(ranked)]


def display_name(method: str) -> str:
    """A method's name in tables: the baseline's, or the catalog's ``display``."""
    return BASELINES[method][0] if method in BASELINES else catalog.get(method).display_name


@cache
def load(method: str) -> Dict[str, Any]:
    """``method``'s preset file, checked (an empty one for a method that has none); raises ``ValueError``
    naming the file and the problem."""
    path = os.path.join(HERE, f"{method}.json")
    if not os.path.exists(path):
        return {"method": method, "protocols": {}}
    with open(path) as f:
        data = json.load(f)
    _check(method, data, path)
    return data


def _check(method: str, data: Dict[str, Any], path: str) -> None:
    def fail(problem: str) -> NoReturn:
        raise ValueError(f"{path}: {problem}")

    if data.get("method") != method:
        fail(f"'method' must be {method!r}, got {data.get('method')!r}")
    spec = None if method in BASELINES else catalog.get(method)
    for protocol, entry in data.get("protocols", {}).items():
        if protocol not in PROTOCOLS:
            fail(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
        _check_entry(fail, spec, protocol, entry)
        if "tuned" in entry:
            tuned = entry["tuned"]
            where = f"{protocol} (tuned)"
            if tuned.get("source") != "validation-grid" or not isinstance(tuned.get("grid"), dict) or not tuned["grid"]:
                fail(f"{where}: a second row is 'validation-grid', with the 'grid' it searched")
            _check_entry(fail, spec, where, tuned)
            extra = {row["buffer"] for row in tuned["rows"]} - {row["buffer"] for row in entry["rows"]}
            if extra:
                fail(f"{where}: buffers {sorted(extra)} have no first row (the paper's values) to pair with")


def _check_entry(
    fail: Callable[[str], NoReturn], spec: Optional[catalog.MethodSpec], where: str, entry: Dict[str, Any]
) -> None:
    if entry.get("source") not in SOURCES:
        fail(f"{where}: 'source' must be one of {SOURCES}, got {entry.get('source')!r}")
    if not entry.get("reference") or (entry["source"] == "stand-in" and not entry.get("note")):
        fail(f"{where}: every entry names its 'reference', and a stand-in its 'note'")
    buffers = [row["buffer"] for row in entry.get("rows", [])]
    if not buffers or len(set(buffers)) != len(buffers):
        fail(f"{where}: 'rows' must list each buffer size once, got {buffers}")
    for row in entry["rows"]:
        has_buffer = spec is not None and spec.has_buffer
        if (row["buffer"] is not None) != has_buffer:
            fail(f"{where}: buffer {row['buffer']} for a method {'with' if has_buffer else 'without'} a memory")
        own = {k: v for k, v in row["values"].items() if k not in RUN_KEYS}
        if "lr" not in row["values"] or (spec is None and own):
            fail(f"{where}, buffer {row['buffer']}: needs 'lr', and a baseline takes only {RUN_KEYS}")
        if spec is not None:
            try:
                spec.resolve(own)
            except ValueError as e:
                fail(f"{where}, buffer {row['buffer']}: {e}")


def block(method: str, protocol: str, tuned: bool = False) -> Optional[Dict[str, Any]]:
    """``method``'s entry for ``protocol`` (source, reference, rows, ...), or None; with ``tuned``, its second
    rows' (the ``tuned`` block), or None."""
    entry = load(method)["protocols"].get(protocol)
    return (entry or {}).get("tuned") if tuned else entry


def values(method: str, protocol: str, buffer: Optional[int], tuned: bool = False) -> Dict[str, Any]:
    """The preset values of one row (a fresh dict; ``tuned``: of its second row); raises ``KeyError`` saying
    which rows exist."""
    entry = block(method, protocol, tuned)
    rows = {row["buffer"]: row["values"] for row in (entry or {}).get("rows", [])}
    if buffer not in rows:
        have = ", ".join("no buffer" if b is None else f"buffer {b}" for b in rows) or "none"
        kind = "validation-tuned preset" if tuned else "preset"
        where = "no buffer" if buffer is None else f"buffer {buffer}"
        raise KeyError(f"no {protocol} {kind} for {method} at {where} (it has: {have})")
    return dict(rows[buffer])


def table(protocol: str, tuned: bool = False) -> Dict[Row, Dict[str, Any]]:
    """Every preset row of ``protocol`` (``tuned``: every second row), method by method in table order, each
    method's rows in file order."""
    rows: Dict[Row, Dict[str, Any]] = {}
    for method in methods():
        for row in (block(method, protocol, tuned) or {}).get("rows", []):
            rows[(method, row["buffer"])] = dict(row["values"])
    return rows
