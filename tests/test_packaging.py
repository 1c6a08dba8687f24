"""The package as users install it: the core imports only torch and numpy, ships py.typed, and has one
version. (CI also builds the wheel and checks it in a fresh venv: ``tools/check_wheel.py``.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import synapse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE_MODULES = (
    "synapse",
    "synapse.rehearsal",
    "synapse.gradient",
    "synapse.structure",
    "synapse.distillation",
    "synapse.catalog",
    "synapse.functional",
    "synapse.buffer",
    "synapse.episodic",
    "synapse.tasks",
    "synapse.metrics",
    "synapse.augment",
)
# The experiment program's and the optional adapters' dependencies: never imported by the core.
FORBIDDEN = (
    "synapse.experiments",
    "synapse.integrations",
    "torchvision",
    "matplotlib",
    "tqdm",
    "tensorboard",
    "wandb",
    "timm",  # the pretrained family reads timm models by their attributes, never imports timm
)


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


PROBE = """
import importlib, json, sys
for name in {blocked!r}:
    sys.modules[name] = None  # importing it now raises ImportError
import numpy, torch
before = set(sys.modules)
from synapse import catalog
for name in {modules!r}:
    importlib.import_module(name)
catalog.specs()  # imports every method file
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def _core_imports(blocked=()):
    """The modules that importing the core adds to those of torch and numpy, in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(modules=CORE_MODULES, blocked=tuple(blocked))],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_core_imports_nothing_but_torch_and_numpy():
    loaded = _core_imports()
    assert set(CORE_MODULES) <= set(loaded)
    leaked = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert leaked == [], f"the core imported {leaked}"


def test_core_works_with_the_optional_packages_unimportable():
    # torch itself imports tqdm when it is installed (torch.hub), which hides an import of it by the core
    # from the test above; with each of them unimportable, the core must still import.
    assert set(CORE_MODULES) <= set(_core_imports(blocked=FORBIDDEN))


def test_ships_py_typed():
    package_dir = os.path.dirname(synapse.__file__)
    assert os.path.isfile(os.path.join(package_dir, "py.typed"))
    assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["synapse"]  # so the wheel carries it


def test_version_has_one_source():
    pyproject = _pyproject()
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "synapse.__version__"}
    parts = synapse.__version__.split(".")
    assert len(parts) >= 3 and all(p.isdigit() for p in parts[:3]), synapse.__version__


def test_changelog_covers_the_version():
    with open(os.path.join(ROOT, "CHANGELOG.md"), encoding="utf-8") as f:
        changelog = f.read()
    release = ".".join(synapse.__version__.split(".")[:3])  # 0.2.0 for 0.2.0.dev0
    assert f"({release})" in changelog or f"[{release}]" in changelog
