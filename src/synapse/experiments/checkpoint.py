"""Atomic, code-free checkpoints: plain tensors and containers, loadable with ``weights_only=True``."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Dict, Mapping

import torch

FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or from a different experiment."""


def atomic_save(obj: Any, path: str) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str, identity: Mapping[str, Any]) -> Dict[str, Any]:
    """Load ``path`` safely and check it belongs to the experiment described by ``identity``."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: nothing to resume (run without --resume to start)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a Synapse checkpoint ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT or "identity" not in state:
        raise CheckpointError(f"checkpoint {path} is not a Synapse checkpoint of format {FORMAT}")
    mismatches = [
        f"{key}: checkpoint has {state['identity'].get(key)!r}, this run has {value!r}"
        for key, value in identity.items()
        if state["identity"].get(key) != value
    ]
    if mismatches:
        raise CheckpointError(f"checkpoint {path} is from a different experiment; " + "; ".join(mismatches))
    return state
