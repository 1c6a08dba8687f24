"""One-time warnings about misuse that would silently cost accuracy, read on the host without a sync.

Two traps cannot be seen from shapes and names alone: outputs that are already log-probabilities, and a
new task whose ``end_task()`` never came. Both need a look at values on the device. A :class:`HostRead`
copies a small tensor to the host asynchronously (pinned memory and an event on CUDA) and hands it over once
the copy has landed, a step or so later: the check costs no host sync, so ``backward`` stays sync-free
(``torch.cuda.set_sync_debug_mode("error")`` passes). On the CPU the value is there at once.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Callable, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn

__all__ = ["HostRead", "LogProbabilityCheck", "NewClassWatch", "OwnParameterWatch", "user_stacklevel"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a ``warnings.warn`` made inside Synapse at the user's line: the first
    frame outside the package, however deep the call (a subclass's ``__init__`` chain, say)."""
    level, frame = 1, sys._getframe(1)  # the frame that will call warnings.warn is level 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


class HostRead:
    """``value`` (small) on the host: at once on the CPU, after a non-blocking copy on CUDA, never on other
    devices (the checks built on it simply stay silent there)."""

    def __init__(self, value: Tensor) -> None:
        value = value.detach()
        self._event: Optional[torch.cuda.Event] = None
        self._host: Optional[Tensor] = None
        if value.device.type == "cpu":
            self._host = value.clone()
        elif value.device.type == "cuda":
            self._host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            self._host.copy_(value, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(value.device))

    def result(self) -> Optional[Tensor]:
        """The host copy once it has landed (asks the event, never waits); None before that."""
        if self._host is None or (self._event is not None and not self._event.query()):
            return None
        return self._host


class LogProbabilityCheck:
    """Warns once when a method that reads logits is given log-probabilities (a model ending in
    ``log_softmax``): every row's logsumexp is 0 and every value is at most 0.

    Only the first step's outputs are looked at. The test runs on the device and its one-element answer
    reaches the host through a :class:`HostRead`: on CUDA the warning comes a step or so later, without a sync.
    """

    def __init__(self, method: str) -> None:
        self.method = method
        self._pending: Optional[HostRead] = None
        self.done = False

    def start(self, outputs: Tensor) -> None:
        """Queue the test on this step's ``(batch, classes)`` outputs (first call only)."""
        if self.done or self._pending is not None or outputs.dim() != 2 or outputs.numel() == 0:
            return
        out = outputs.detach().float()
        looks_normalised = (torch.logsumexp(out, 1).abs() <= 1e-3).all() & (out <= 0).all()
        self._pending = HostRead(looks_normalised)

    def poll(self) -> None:
        """Warn if the queued test has come back true."""
        answer = self._pending.result() if self._pending is not None else None
        if answer is None:
            return
        self._pending, self.done = None, True
        if bool(answer):
            warnings.warn(
                f"the model's outputs look like log-probabilities (every row's logsumexp is 0): {self.method} "
                "reads raw logits, and on log-probabilities its loss is not the paper's (a logit-matching or "
                "sigmoid term sees shifted, squashed values). Return the logits from forward (drop the final "
                "log_softmax) and use F.cross_entropy on them in place of F.nll_loss.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )


class NewClassWatch:
    """Warns once when a method that acts at task ends meets a new task that no ``end_task()`` announced.

    The sign of a new task: a batch whose classes were never seen before and share none with the classes seen
    since the last ``end_task()`` (or the start). Classes that merely trickle in while a task runs share a
    batch with its known ones and stay silent. Domain-incremental streams (the same classes in every task)
    cannot be told apart this way: the warning is a safety net for the class-incremental case.

    Only every ``every``-th step's targets are read (a :class:`HostRead`: no sync on CUDA), and nothing after
    the warning; a resumed run starts watching afresh (this is no training state).
    """

    def __init__(self, method: str, every: int = 8) -> None:
        self.method = method
        self.every = every
        self.warned = False
        self._seen: Set[int] = set()  # every class read so far
        self._task: Set[int] = set()  # the classes read since the last end_task()
        self._pending: Optional[HostRead] = None

    def observe(self, step: int, targets: Tensor) -> None:
        """Called after each successful ``backward`` with its step index and targets."""
        if self.warned:
            return
        self.poll()
        if step % self.every == 0 and self._pending is None:
            self._pending = HostRead(targets)

    def poll(self) -> None:
        answer = self._pending.result() if self._pending is not None else None
        if answer is None:
            return
        self._pending = None
        classes = set(answer.unique().tolist())
        if self._task and classes.isdisjoint(self._seen):
            self.warned = True
            warnings.warn(
                f"{self.method} does its work at task ends, but its targets moved to classes never seen before "
                "with no end_task() since the last new classes: without it that work never happens (for most "
                "methods, it is then plain fine-tuning). "
                "Call synapse.end_task(named_batches(loader)) after each task's training.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        self._seen |= classes
        self._task |= classes

    def task_ended(self) -> None:
        """``end_task()`` came: what is read from now on belongs to the next task."""
        self.poll()  # a read of the finished task that has landed still counts as seen
        self._pending = None
        self._task = set()


class OwnParameterWatch:
    """Warns once when the parameters a method keeps outside the model (L2P's prompts and keys) never change:
    the optimizer was built on ``model.parameters()``, which does not hold them, so they never train.

    It reads their version counters, which any in-place update bumps (``optimizer.step()``'s among them): no
    values, no sync. Silent for good once one of them has changed; it warns after :attr:`patience` backward
    calls without a change (a GradScaler may skip the first steps), and starts afresh when the method's
    parameters are other tensors (a task end may make new ones).
    """

    patience = 50

    def __init__(self, method: str) -> None:
        self.method = method
        self.done = False
        self._versions: Tuple[Tuple[int, int], ...] = ()
        self._unchanged = 0

    def observe(self, params: Callable[[], List[nn.Parameter]]) -> None:
        """Called after each successful ``backward`` with the method's ``own_parameters``."""
        if self.done:
            return
        versions = tuple((id(p), p._version) for p in params())
        if not versions:
            self.done = True  # the method trains nothing outside the model
            return
        if [i for i, _ in versions] != [i for i, _ in self._versions]:
            self._versions, self._unchanged = versions, 0  # first call, or new tensors: a new baseline
            return
        if versions != self._versions:
            self.done = True  # stepped: the optimizer holds them
            return
        self._unchanged += 1
        if self._unchanged >= self.patience:
            self.done = True
            warnings.warn(
                f"{self.method}'s own parameters (prompts, keys: {len(versions)} tensors kept outside the model) have "
                f"not changed in {self.patience} steps: the optimizer does not hold them. Build it on "
                "synapse.trainable_parameters(), not model.parameters().",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
