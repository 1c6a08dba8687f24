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
from torch import nn

from synapse._model import unwrap_model

from .distributed import World, reduce_ints

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


def check_identity(
    state: Mapping[str, Any], identity: Mapping[str, Any], path: str, absent: Optional[Mapping[str, Any]] = None
) -> None:
    """Refuse a checkpoint of another experiment, naming every setting that differs. ``absent``: the value
    of a setting the checkpoint does not record (one added to the identity after it was written)."""
    absent = absent or {}
    recorded = {key: state["identity"].get(key, absent.get(key)) for key in identity}
    mismatches = [
        f"{key}: checkpoint has {recorded[key]!r}, this run has {value!r}"
        for key, value in identity.items()
        if recorded[key] != value
    ]
    if mismatches:
        raise CheckpointError(f"checkpoint {path} is from a different experiment; " + "; ".join(mismatches))


def load_generations(
    path: str, identity: Mapping[str, Any], absent: Optional[Mapping[str, Any]] = None
) -> List[Tuple[str, Dict[str, Any]]]:
    """Every readable generation of ``path`` as ``(file, state)``, newest first; [] when there is none.

    An unreadable file is skipped with a warning (a truncated copy, a disk error: the older generation is
    still good); a checkpoint of another experiment is an error (``absent``: as in :func:`check_identity`), as
    is having files but none readable.
    """
    found, readable = generations(path), []
    for file in found:
        try:
            state = read_checkpoint(file)
        except CheckpointUnreadable as e:
            warnings.warn(f"{e}; falling back to the previous checkpoint", UserWarning, stacklevel=2)
            continue
        check_identity(state, identity, file, absent)
        readable.append((file, state))
    if found and not readable:
        raise CheckpointError(f"no readable checkpoint among {', '.join(found)}: delete them to start from scratch")
    return readable


# ---------------------------------------------------------------------------- an experiment's state
def checkpoint_path(output_dir: Optional[str], world: World) -> Optional[str]:
    """Where this process's checkpoint goes (one file per rank under torchrun); None without an output folder."""
    if not output_dir:
        return None
    return os.path.join(output_dir, "checkpoint.pt" if world.size == 1 else f"checkpoint-rank{world.rank}.pt")


def experiment_state(
    identity: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    method: Any,
    data_gen: torch.Generator,
    device: torch.device,
    progress: Mapping[str, Any],
) -> Dict[str, Any]:
    """Everything a run continues from: weights, optimizer and method state, every random stream, and its
    ``progress`` through the schedule."""
    return {
        "format": FORMAT,
        "identity": dict(identity),
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "synapse": method.state_dict() if method is not None else None,
        "rng": {
            "torch": torch.get_rng_state(),
            "data": data_gen.get_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        },
        "progress": dict(progress),
    }


def newest_common(
    path: str,
    identity: Mapping[str, Any],
    world: World,
    device: torch.device,
    absent: Optional[Mapping[str, Any]] = None,
) -> Optional[Tuple[str, Dict[str, Any]]]:
    """The newest readable generation of ``path`` at a step that every rank holds, as ``(file, state)``; None
    when no rank has one (start from scratch).

    Under torchrun every rank must continue from the same step: a rank killed while the others were
    writing may be one generation behind them, so the ranks agree on the newest step all of them hold.
    """
    folder = os.path.dirname(path) or "."
    pattern = re.compile(r"checkpoint(-rank\d+)?\.pt")  # the latest generations, one per rank
    others = sorted(f for f in os.listdir(folder) if pattern.fullmatch(f)) if os.path.isdir(folder) else []
    if not generations(path) and others:
        raise CheckpointError(
            f"{path} does not exist, but {', '.join(others)} do: they were written by a run with another "
            f"number of processes (one file per rank); resume with that world size, not {world.size}"
        )
    error: Optional[CheckpointError] = None
    found: List[Tuple[str, Dict[str, Any]]] = []
    try:
        found = load_generations(path, identity, absent)
    except CheckpointError as e:  # raised below on every rank, after the ranks agreed (none waits alone)
        error = e
    newest = found[0][1]["progress"]["step"] if found else -1
    failed, target = reduce_ints([int(error is not None), -newest], world, device)
    target = -target  # the smallest newest step over the ranks
    if error is not None:
        raise error
    if failed:
        raise CheckpointError("another rank could not read its checkpoint (its error is printed above)")
    if target < 0:
        return None
    chosen = [(file, state) for file, state in found if state["progress"]["step"] == target]
    if not chosen:
        steps = [state["progress"]["step"] for _, state in found]
        raise CheckpointError(
            f"rank {world.rank} holds checkpoints at steps {steps}, and another rank's newest is at step "
            f"{target}: the ranks cannot continue from the same step"
        )
    return chosen[0]


def load_experiment_state(
    state: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    method: Any,
    data_gen: torch.Generator,
    device: torch.device,
) -> Dict[str, Any]:
    """Put ``experiment_state``'s weights, optimizer and method state and random streams back; return its
    progress."""
    unwrap_model(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if method is not None:
        method.load_state_dict(state["synapse"])
    torch.set_rng_state(state["rng"]["torch"])
    data_gen.set_state(state["rng"]["data"])
    if state["rng"]["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    return dict(state["progress"])


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
    # One write, newline included: the ranks of a group share one stderr, and a line must not split.
    sys.stderr.write(f"synapse test pause at {where} (rank {rank}, pid {os.getpid()})\n")
    sys.stderr.flush()
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
