"""A folder dataset's published train/test split, read from two list files instead of a seeded hold-out.

The prompt-method papers evaluate ImageNet-R on a fixed split (CODA-Prompt ships its lists; docs/vision.md
says what each authors' code uses). A user who has the lists puts them beside the image tree, or in a folder
given as ``--split_dir``; :func:`find_split` finds and checks them before any work. Two formats:

- ``train.txt`` and ``test.txt``: one image path a line (blank lines and ``#`` comments skipped);
- CODA-Prompt's ``imagenet-r_train.yaml`` and ``imagenet-r_test.yaml``: a ``data:`` list of image paths
  (needs PyYAML). Their ``targets:`` are not read: classes are numbered by folder, as for every folder dataset.

A path is relative to the image tree, and may carry a prefix before its class folder (CODA-Prompt's
``data/imagenet-r/``): it is read from its first component that names a class folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

# Imported by datasets.py inside folder_spec (this module needs its error type first).
from .datasets import DatasetUnavailable

FORMATS = (("train.txt", "test.txt"), ("imagenet-r_train.yaml", "imagenet-r_test.yaml"))
SHOWN = 5  # bad paths quoted in an error


@dataclass(frozen=True)
class Split:
    """A checked split: each part's files (under the tree, sorted by class, then path) and labels, and where
    it came from, in words."""

    train: Tuple[List[str], List[int]]
    test: Tuple[List[str], List[int]]
    why: str


def list_files(folder: str) -> Optional[Tuple[str, str]]:
    """The (train, test) list files in ``folder`` in one of :data:`FORMATS`; None when it holds none.

    Raises DatasetUnavailable when it holds one file of a pair without the other, or two pairs."""
    found = []
    for pair in FORMATS:
        present = [name for name in pair if os.path.isfile(os.path.join(folder, name))]
        if len(present) == 1:
            missing = next(name for name in pair if name not in present)
            raise DatasetUnavailable(
                f"{folder} holds the split list {present[0]} but not {missing}: a split needs both"
            )
        if present:
            found.append(pair)
    if len(found) > 1:
        raise DatasetUnavailable(f"{folder} holds two splits ({' and '.join(map(str, found))}): keep one")
    return (os.path.join(folder, found[0][0]), os.path.join(folder, found[0][1])) if found else None


def read_entries(file: str) -> List[str]:
    """The image paths listed in ``file`` (:data:`FORMATS`)."""
    if not file.endswith(".yaml"):
        with open(file, encoding="utf-8-sig") as f:  # a byte-order mark and CRLF line ends are read too
            return [s for s in (line.strip() for line in f) if s and not s.startswith("#")]
    try:
        import yaml
    except ImportError:
        raise DatasetUnavailable(f"reading {file} needs PyYAML: pip install pyyaml") from None
    with open(file, encoding="utf-8") as f:
        doc = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
        raise DatasetUnavailable(f"{file}: expected a 'data:' list of image paths (CODA-Prompt's format)")
    return data


def _resolve(tree: str, label_of: Dict[str, int], entry: str) -> Union[Tuple[str, int], str]:
    """``(file, label)`` for one listed path: the file from the first class-folder component from which it
    exists; else what is wrong: ``'unknown'`` (no class folder in the path) or ``'missing'`` (no such file)."""
    parts = [p for p in entry.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:  # every file is read from inside the tree
        return "unknown"
    starts = [i for i, p in enumerate(parts[:-1]) if p in label_of]
    for i in starts:
        file = os.path.join(tree, *parts[i:])
        if os.path.isfile(file):
            return file, label_of[parts[i]]
    return "missing" if starts else "unknown"


def _read_part(tree: str, label_of: Dict[str, int], file: str) -> Tuple[List[str], List[int]]:
    files: Dict[str, int] = {}
    bad: Dict[str, List[str]] = {"unknown": [], "missing": [], "repeated": []}
    for entry in read_entries(file):
        found = _resolve(tree, label_of, entry)
        if isinstance(found, str):
            bad[found].append(entry)
        elif found[0] in files:
            bad["repeated"].append(entry)
        else:
            files[found[0]] = found[1]
    problems = [
        f"{len(found)} {what} (e.g. {', '.join(map(repr, found[:SHOWN]))})"
        for found, what in (
            (bad["unknown"], "paths through no class folder of the tree"),
            (bad["missing"], "paths to files that are not there"),
            (bad["repeated"], "paths listed twice"),
        )
        if found
    ]
    if problems:
        raise DatasetUnavailable(f"{file} lists {'; '.join(problems)}; the tree is {tree}")
    if not files:
        raise DatasetUnavailable(f"{file} lists no images")
    ordered = sorted(files.items(), key=lambda item: (item[1], item[0]))
    return [f for f, _ in ordered], [label for _, label in ordered]


def find_split(tree: str, classes: Sequence[str], split_dir: Optional[str] = None) -> Optional[Split]:
    """The split listed in ``split_dir`` (it must hold one), else beside the tree (None: it holds none),
    every listed path checked against ``tree``'s class folders ``classes``.

    Raises DatasetUnavailable for lists that are incomplete, bad, or share an image."""
    where = tree if split_dir is None else split_dir
    if split_dir is not None and not os.path.isdir(split_dir):
        raise DatasetUnavailable(f"split_dir {split_dir!r} is not a directory")
    pair = list_files(where)
    if pair is None:
        if split_dir is None:
            return None
        expected = " or ".join(" and ".join(p) for p in FORMATS)
        raise DatasetUnavailable(f"split_dir {split_dir} holds no split lists: expected {expected}")
    label_of = {name: label for label, name in enumerate(classes)}
    train, test = (_read_part(tree, label_of, file) for file in pair)
    shared = sorted(set(train[0]) & set(test[0]))
    if shared:
        raise DatasetUnavailable(
            f"{pair[0]} and {pair[1]} share {len(shared)} images (e.g. {', '.join(map(repr, shared[:SHOWN]))})"
        )
    why = f"the split lists {pair[0]} ({len(train[0])} images) and {pair[1]} ({len(test[0])} images)"
    return Split(train, test, why)
