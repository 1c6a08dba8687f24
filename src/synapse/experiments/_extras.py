"""The experiment program's optional dependencies (the ``cli`` extra), checked before it starts.

``pip install -e .`` installs the library alone (torch and numpy). The experiment program also needs
torchvision (CIFAR datasets, torchvision models), matplotlib (the accuracy plot) and tqdm (progress
bars), and imports each only where it is used, so without this check a run would fail with a traceback
at the first of those places: possibly after hours of training, when the plot is drawn. This module
imports none of them.
"""

from __future__ import annotations

import importlib.util
from typing import List, Sequence

# The ``cli`` extra of pyproject.toml: import name of each distribution.
CLI_EXTRAS = ("torchvision", "matplotlib", "tqdm")
INSTALL_HINT = "pip install -e '.[cli]' in a checkout, or pip install 'torch-synapse[cli]'"


def missing_modules(names: Sequence[str] = CLI_EXTRAS) -> List[str]:
    """The modules of ``names`` that cannot be imported, found without importing them (which is slow)."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken parent package, or a module set to None in sys.modules
            found = False
        if not found:
            missing.append(name)
    return missing


def missing_extras_message(missing: Sequence[str]) -> str:
    """One line saying which modules are missing and how to install the extra that provides them."""
    return (
        f"synapse: error: the experiment program needs the 'cli' extra, and {', '.join(missing)} "
        f"{'is' if len(missing) == 1 else 'are'} not installed; install it with: {INSTALL_HINT}"
    )
