"""The user's training forward, as any method sees it: live outputs, and replay rows riding along.

A method that needs the outputs of the forward the user just made (DER stores them, LwF and ER-ACE put
a loss on them) or wants its replay minibatch computed in that same forward ("fused" replay) gets a
:class:`ForwardCapture`. It registers one forward pre-hook and one forward hook on the module:

* the pre-hook appends the method's replay rows (if any) to the batch's inputs;
* the hook splits the output again, so the user receives outputs for their own batch only, and keeps
  those outputs *with their graph* (``outputs``) and the replay rows' outputs (``replay.outputs``).

Only training forwards count: train mode, grad enabled, and not a forward the method runs itself
(:meth:`ForwardCapture.paused`). Evaluation and ``torch.no_grad()`` forwards are untouched; a forward with
grad enabled but the model in eval mode is only noted (:attr:`ForwardCapture.eval_forward`), so that a method
whose replay rides on the training forward can refuse it rather than silently train without replay.

Two properties every user relies on:

* **A copy of the model is a plain model.** The hooks reach their capture through a weak reference, and
  a deep copy or pickle of a hooked module gets inert hooks instead: a teacher, an EMA copy or
  ``torch.save(model)`` carries no method, no buffer and no replay. A shallow copy shares the hooks, which
  then stand aside for any module other than the one they were registered on.
* **``torch.compile`` compiles the model, not the bookkeeping.** The hooks are excluded from tracing
  (``torch.compiler.disable``): sampling, host-to-device copies and Python counters run eagerly around
  the compiled forward, whose graph sees only the concatenated batch.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._validation import check_forward_accepts, forward_signature

__all__ = ["ForwardCapture", "Replay", "ReplaySource", "live_captures"]


@dataclass
class Replay:
    """One step's replay minibatch(es) and, once the forward ran, the model's outputs on them."""

    sample: Dict[str, Tensor]  # fields of shape (num_minibatches * k, ...), minibatch after minibatch
    num_minibatches: int
    user_batch: int = 0
    outputs: Optional[List[Tensor]] = None  # the model's outputs, one (k, ...) tensor per minibatch
    parameters_version: int = -1  # a parameter's version counter when the forward ran

    @property
    def minibatch_size(self) -> int:
        return next(iter(self.sample.values())).shape[0] // self.num_minibatches

    def part(self, tensor: Tensor, i: int) -> Tensor:
        """Minibatch ``i`` of a stacked field (no slicing for a single one)."""
        if self.num_minibatches == 1:
            return tensor
        k = self.minibatch_size
        return tensor[i * k : (i + 1) * k]


# Called at a training forward that carries no replay yet: returns the rows to append, or None.
ReplaySource = Callable[[], Optional[Replay]]


class _InertHook:
    """What a deep copy or a pickle of a hooked module gets in place of a capture's hook: nothing happens."""

    def __call__(self, *args: Any) -> None:
        return None


class _Hook:
    """A forward (pre-)hook that reaches its capture through a weak reference (see the module docstring)."""

    def __init__(self, capture: ForwardCapture, pre: bool) -> None:
        self._capture = weakref.ref(capture)
        self._pre = pre

    @torch.compiler.disable
    def __call__(self, module: nn.Module, *rest: Any) -> Any:
        capture = self._capture()
        if capture is None or module is not capture.module:
            return None
        return capture._pre_forward(module, *rest) if self._pre else capture._post_forward(module, *rest)

    def __deepcopy__(self, memo: Dict[int, Any]) -> _InertHook:
        return _InertHook()

    def __reduce__(self) -> Tuple[type, tuple]:
        return (_InertHook, ())


class ForwardCapture:
    """Watches ``module``'s training forwards for one method.

    Args:
        module: the module whose ``forward`` runs the user's batch (unwrapped from DDP/``torch.compile``).
        replay_source: for fused replay, called at each training forward that carries no replay yet;
            returns the :class:`Replay` whose ``sample["input:<name>"]`` rows are appended, or None.
        parameter: a parameter of the model; its version counter tells a forward whose backward never
            came (the optimizer stepped since) from the current one.

    After a training forward, :attr:`outputs` holds the user's rows of the output (live, with their
    graph; ``None`` if the model returned something else than a tensor) and :attr:`replay` the replay
    rows with their outputs. :meth:`clear` forgets both; methods call it at the end of ``backward``.
    """

    def __init__(
        self,
        module: nn.Module,
        parameter: Tensor,
        replay_source: Optional[ReplaySource] = None,
        owner: str = "a Synapse method",
    ) -> None:
        self.module = module
        self.owner = owner  # the method's name, for the message when a second method meets these hooks
        self._parameter = parameter
        self._replay_source = replay_source
        self.input_names: Optional[Tuple[str, ...]] = None  # set by the method from backward's keywords
        self.outputs: Optional[Tensor] = None
        self.output_type: Optional[type] = None
        self.replay: Optional[Replay] = None
        # A forward with grad enabled but in eval mode ran since the last training forward: it carried no
        # replay and its outputs were not kept (ER's fused replay then has nothing to ride on).
        self.eval_forward = False
        # The inputs of the user's rows in that forward: the view the model trained on, which may differ from
        # what backward receives (the raw view, stored for replay that re-augments).
        self.inputs: Optional[Dict[str, Tensor]] = None
        self._paused = 0
        self._signature = forward_signature(module)
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        parameters = self._signature.parameters.items() if self._signature is not None else ()
        self._positions = {name: i for i, (name, p) in enumerate(parameters) if p.kind in positional}
        self._handles = [
            module.register_forward_pre_hook(_Hook(self, pre=True), with_kwargs=True),
            module.register_forward_hook(_Hook(self, pre=False)),
        ]

    # ------------------------------------------------------------------ control
    def remove(self) -> None:
        """Take the hooks off the module."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def replays(self) -> bool:
        """Whether replay rows ride along in the training forward (fused replay)."""
        return self._replay_source is not None

    @property
    def live(self) -> bool:
        """Whether the hooks are still on the module."""
        return bool(self._handles)

    def clear(self) -> None:
        """Forget the last forward (end of a step)."""
        self.outputs = None
        self.output_type = None
        self.replay = None
        self.eval_forward = False
        self.inputs = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forwards run inside this block (a method's own: a separate replay pass, a virtual step, a
        feature pass) are invisible to the capture."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def check_input_names(self, names: Sequence[str]) -> None:
        """Raise unless ``forward`` takes these names as keywords (needed to find them in a forward call)."""
        check_forward_accepts(self.module, self._signature, names)

    # ------------------------------------------------------------------ hooks
    def _training_forward(self, module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled() and not self._paused

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> Optional[tuple]:
        if self.replay is not None and self.replay.parameters_version != self._parameter._version:
            self.replay = None  # a forward whose backward never came, and the optimizer stepped since
        if self.input_names is not None and self._training_forward(module):
            self.inputs = self._find_inputs(args, kwargs)
        if self._replay_source is None or self.replay is not None or not self._training_forward(module):
            return None
        if self.input_names is None:
            return None  # before the first backward the method has no memory to replay
        replay = self._replay_source()
        if replay is None:
            return None
        new_args, new_kwargs = list(args), dict(kwargs)
        slots = [self._locate(name, new_args, new_kwargs) for name in self.input_names]
        container, key = slots[0]
        replay.user_batch = container[key].shape[0]
        for (container, key), name in zip(slots, self.input_names):
            container[key] = torch.cat([container[key], replay.sample[f"input:{name}"]])
        replay.parameters_version = self._parameter._version
        self.replay = replay
        return tuple(new_args), new_kwargs

    def _find_inputs(self, args: tuple, kwargs: Dict[str, Any]) -> Optional[Dict[str, Tensor]]:
        """The named inputs of this forward call, or None where one is not found as a tensor."""
        assert self.input_names is not None
        found = {}
        for name in self.input_names:
            position = self._positions.get(name, len(args))
            value = kwargs[name] if name in kwargs else args[position] if position < len(args) else None
            if not isinstance(value, Tensor):
                return None
            found[name] = value
        return found

    def current_inputs(self, given: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """The inputs of the user's rows in the last training forward, where they match ``given`` (backward's)
        in names and batch size; else ``given``. A method that runs a frozen copy on the current batch (iCaRL,
        BiC) reads them, so that it distils on the view the model trained on, not on the raw view stored."""
        live = self.inputs
        if live is None or live.keys() != given.keys():
            return given
        if any(live[k].shape[0] != given[k].shape[0] for k in given):
            return given
        return live

    def _locate(self, name: str, args: List[Any], kwargs: Dict[str, Any]) -> Tuple[Any, Any]:
        """Where input ``name`` sits in this forward call: ``(kwargs, name)`` or ``(args, position)``."""
        if name in kwargs:
            where: Tuple[Any, Any] = (kwargs, name)
        elif self._positions.get(name, len(args)) < len(args):
            where = (args, self._positions[name])
        else:
            raise TypeError(f"fused replay could not find model input {name!r} in this forward call")
        if not isinstance(where[0][where[1]], Tensor):
            raise TypeError(
                f"fused replay needs model input {name!r} as a tensor, got {type(where[0][where[1]]).__name__}"
            )
        return where

    def _post_forward(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if not self._training_forward(module):
            if torch.is_grad_enabled() and not self._paused:
                self.eval_forward = True  # a forward that trains (grad on) with the model in eval mode
            return None
        self.eval_forward = False
        replay = self.replay
        if replay is not None and replay.outputs is None:
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"fused replay needs the model to return a logits tensor, got {type(output).__name__}; "
                    "use fused=False"
                )
            # One split, not a slice per piece: its backward is one concatenation, where slices' would
            # each scatter into a zero tensor of the full output's size.
            output, *replay.outputs = output.split(
                [replay.user_batch, *[replay.minibatch_size] * replay.num_minibatches]
            )
        self.outputs = output if isinstance(output, Tensor) else None
        self.output_type = type(output)
        return output if replay is not None and output is not None else None

    def checked_outputs(self, method: str, batch: int) -> Tensor:
        """The live outputs of the forward that produced this step's loss; raises if there was none."""
        out = self.outputs
        if out is None or out.dim() != 2 or out.shape[0] != batch:
            got = (
                "none"
                if self.output_type is None
                else f"a {self.output_type.__name__}"
                if out is None
                else f"shape {tuple(out.shape)}"
            )
            raise ValueError(
                f"{method} reads the outputs of the forward pass that produced this loss, but the last training "
                f"forward of the model gave {got} for a batch of {batch}: call the model in train mode with grad "
                "enabled on this batch before backward, and return a (batch, classes) logits tensor"
            )
        return out


def live_captures(module: nn.Module) -> List[ForwardCapture]:
    """The captures whose hooks are live on ``module`` (their method still exists and did not remove them).
    Hooks whose capture is gone (its method was collected) are taken off on the way: they do nothing."""
    found: List[ForwardCapture] = []
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key, hook in list(hooks.items()):
            if not isinstance(hook, _Hook):
                continue
            capture = hook._capture()
            if capture is None:  # what RemovableHandle.remove() would do, had the handle survived
                del hooks[key]
                for extra in ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs"):
                    getattr(module, extra, {}).pop(key, None)
            elif capture.module is module and capture.live and capture not in found:
                found.append(capture)
    return found
