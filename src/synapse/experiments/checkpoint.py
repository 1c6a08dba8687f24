"""Checkpoints that survive a kill at any instant: code-free files (``weights_only=True``), written beside the
old one, verified readable, then rotated in; two generations on disk; a periodic policy for inside a task.

On disk, per process: ``checkpoint.pt`` (the latest), ``checkpoint.prev.pt`` (the generation before it) and,
only while one is being written or after a kill during the write, ``checkpoint.pt.tmp``. A kill at any point
leaves at least one complete, verified generation (after the first write).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

# 2: progress holds the run's global step and the epoch's running totals (mid-epoch checkpoints).
FORMAT = 2


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or from a different experiment."""


class CheckpointUnreadable(CheckpointError):
    """A checkpoint file is truncated, corrupt or not a Synapse checkpoint (an older one may still be good)."""


def previous_path(path: str) -> str:
    """The generation before ``path``: ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"


def generations(path: str) -> List[str]:
    """The checkpoint files of ``path`` that exist, newest first."""
    return [p for p in (path, previous_path(path)) if os.path.isfile(p)]


def read_checkpoint(path: str) -> Dict[str, Any]:
    """Load ``path`` safely (tensors and containers only); CheckpointUnreadable if it is not a whole checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointUnreadable(
            f"checkpoint {path} is corrupt or not a Synapse checkpoint ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(state, dict) or "identity" not in state:
        raise CheckpointUnreadable(f"checkpoint {path} is not a Synapse checkpoint")
    if state.get("format") != FORMAT:
        raise CheckpointUnreadable(
            f"checkpoint {path} has format {state.get('format')!r}, this version of Synapse reads format {FORMAT}"
        )
    return state


def check_identity(state: Mapping[str, Any], identity: Mapping[str, Any], path: str) -> None:
    """Refuse a checkpoint of another experiment, naming every setting that differs."""
    mismatches = [
        f"{key}: checkpoint has {state['identity'].get(key)!r}, this run has {value!r}"
        for key, value in identity.items()
        if state["identity"].get(key) != value
    ]
    if mismatches:
        raise CheckpointError(f"checkpoint {path} is from a different experiment; " + "; ".join(mismatches))


def load_generations(path: str, identity: Mapping[str, Any]) -> List[Tuple[str, Dict[str, Any]]]:
    """Every readable generation of ``path`` as ``(file, state)``, newest first; [] when there is none.

    An unreadable file is skipped with a warning (a truncated copy, a disk error: the older generation is
    still good); a checkpoint of another experiment is an error, as is having files but none readable.
    """
    found, readable = generations(path), []
    for file in found:
        try:
            state = read_checkpoint(file)
        except CheckpointUnreadable as e:
            warnings.warn(f"{e}; falling back to the previous checkpoint", UserWarning, stacklevel=2)
            continue
        check_identity(state, identity, file)
        readable.append((file, state))
    if found and not readable:
        raise CheckpointError(f"no readable checkpoint among {', '.join(found)}: delete them to start from scratch")
    return readable


def pause_for_tests(where: str) -> None:
    """Fault-injection hook for the preemption tests: ``SYNAPSE_TEST_PAUSE=<where>`` stops here for a minute,
    after saying so on stderr, so that a test can kill the process at this exact point. ``where`` is
    ``startup`` (start-up done, training not begun), ``step:<k>`` (after global step k) or ``checkpoint:<n>``
    (inside this process's n-th checkpoint write: the new file written, not yet verified or rotated in). A
    group that torchrun restarted does not pause again. SIGINT/SIGTERM end the pause and then take their
    usual course (torchrun stopping the surviving ranks). Unset (always, outside tests), it costs one lookup.
    """
    if os.environ.get("SYNAPSE_TEST_PAUSE") != where or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    rank = os.environ.get("RANK", "0")
    print(f"synapse test pause at {where} (rank {rank}, pid {os.getpid()})", file=sys.stderr, flush=True)
    received: List[Tuple[int, Any]] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    previous: Dict[int, Any] = {
        sig: signal.signal(sig, lambda signum, frame: received.append((signum, frame))) for sig in signals
    }
    try:
        end = time.monotonic() + 60
        while time.monotonic() < end and not received:
            time.sleep(0.05)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        signum, frame = received[0]
        handler = previous[signum]
        if callable(handler):
            handler(signum, frame)
        elif handler != signal.SIG_IGN:
            signal.raise_signal(signum)  # the default action, now restored


class Writer:
    """Writes the generations of one checkpoint path: new file beside the old, verified, then rotated in."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.writes = 0

    def save(self, state: Mapping[str, Any]) -> None:
        """Write ``state`` to ``path.tmp`` and flush it to disk; read it back (a file that does not load is
        never rotated in); then move the latest to ``.prev`` and the new file to the latest.

        Example::

            Writer("runs/a/checkpoint.pt").save({"format": FORMAT, "identity": {...}, ...})
        """
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        tmp = self.path + ".tmp"  # one fixed name: a kill mid-write leaves at most this one stale file
        self.writes += 1
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            pause_for_tests(f"checkpoint:{self.writes}")
            os.fsync(f.fileno())
        try:
            read_checkpoint(tmp)
        except CheckpointUnreadable as e:
            os.unlink(tmp)
            raise CheckpointError(f"a new checkpoint did not read back (the previous one is kept): {e}") from e
        if os.path.isfile(self.path):
            os.replace(self.path, previous_path(self.path))
        # A kill between these two renames leaves only .prev, which resume reads.
        os.replace(tmp, self.path)
        _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    """Make the renames durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- the periodic policy
# A time, not a step count: benchmarks/checkpoint_cost.py measures a checkpoint at about 5 steps of the MNIST
# MLP but 3% of one resnet18-reduced step (CPU time; the README's cluster section), so no step count suits
# both. Five minutes bound the work a kill loses on every model, at under 0.1% of the training time.
DEFAULT_EVERY = "5min"
_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Every:
    """When to checkpoint inside a task: every ``steps`` training steps, or every ``seconds``; neither: never
    (task ends and clean stops still checkpoint)."""

    steps: Optional[int] = None
    seconds: Optional[float] = None


def parse_every(text: str) -> Every:
    """``"500"`` (steps), ``"30s"``, ``"10min"``, ``"2h"`` (time), or ``"0"``/``"off"`` (task ends only).

    Example: ``parse_every("10min") == Every(seconds=600.0)``.
    """
    t = str(text).strip().lower()
    if t in ("0", "off", "never"):
        return Every()
    if t.isdigit():
        return Every(steps=int(t))
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*(s|sec|m|min|h)", t)
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(
            f"checkpoint_every must be a number of steps (500), a time (30s, 10min, 2h) or 0/off, got {text!r}"
        )
    return Every(seconds=float(m.group(1)) * _UNITS[m.group(2)])


class Periodic:
    """Decides when a periodic checkpoint is due. Steps count the run's global steps, so a resumed run
    checkpoints at the same steps as an uninterrupted one; time counts from the last checkpoint written."""

    def __init__(self, every: Every, clock: Callable[[], float] = time.monotonic) -> None:
        self.every, self.clock = every, clock
        self.last = clock()

    def due_by_steps(self, step: int) -> bool:
        """Deterministic: the same on every rank, no agreement needed."""
        return self.every.steps is not None and step > 0 and step % self.every.steps == 0

    def due_by_time(self) -> bool:
        """A reading of this process's clock: ranks must agree on it before acting."""
        return self.every.seconds is not None and self.clock() - self.last >= self.every.seconds

    def written(self) -> None:
        self.last = self.clock()
