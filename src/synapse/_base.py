"""The one contract every method implements: ``backward``, ``end_task`` and the state dict."""

from __future__ import annotations

import copy
import gc
import inspect
import warnings
from abc import ABC, abstractmethod
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _autograd
from ._capture import ForwardCapture, ReplaySource, live_captures
from ._model import distributed_world, unwrap_model
from ._state import StateError, Stateful
from ._validation import (
    check_class_indices,
    check_forward_accepts,
    check_loss,
    check_positive_int,
    check_replay_rows,
    check_targets_and_inputs,
    forward_signature,
)
from ._watch import LogProbabilityCheck, NewClassWatch, OwnParameterWatch, user_stacklevel
from .augment import Transform, apply_transform, check_replay_transform
from .buffer import fresh_seed
from .memory import STREAM_POLICIES, make_buffer

__all__ = [
    "Synapse",
    "BufferedSynapse",
    "TaskBatch",
    "check_no_live_method",
    "distributed_world",
    "named_batches",
    "unwrap_model",
]

# One batch of a task-end data pass, in the form ``backward`` takes it (less the loss):
# ``(targets, {name: input})`` with the inputs named as ``model.forward``'s parameters.
TaskBatch = Tuple[Tensor, Mapping[str, Tensor]]
CURRENT_LOSS = ("method", "user")
# The key named_batches() gives the inputs when no name is passed: the task-end pass replaces it with the
# name ``backward`` was given (no parameter of forward can be called this: it is not an identifier).
RECORDED_NAME = "<the input name backward was given>"
_BY_NAME = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def named_batches(pairs: Iterable[Tuple[Any, Tensor]], name: Optional[str] = None) -> Iterator[TaskBatch]:
    """``(inputs, targets)`` pairs (what a ``DataLoader`` yields) as ``(targets, {name: inputs})`` batches,
    the form :meth:`Synapse.end_task` takes: ``synapse.end_task(named_batches(loader))``.

    Args:
        pairs: an iterable of ``(inputs, targets)``, e.g. a ``DataLoader``.
        name: the parameter of ``model.forward`` that takes the inputs. By default, the name ``backward``
            was given (``x`` after ``synapse.backward(loss, y, x=x)``), or, before any ``backward``,
            ``forward``'s only parameter.
    """
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str (a parameter of model.forward) or None, got {type(name).__name__}")
    key = RECORDED_NAME if name is None else name
    for inputs, targets in pairs:
        yield targets, {key: inputs}


STATE_FORMAT = 2  # of the method's part of the state dict; the layout before declared state had none
_TOP_KEYS = frozenset({"method", "num_steps", "num_tasks_ended", "state"})
OPTIONAL_TOP_KEYS: Tuple[str, ...] = ()  # top-level keys a state dict may hold beside those


def _input_names(names: List[Any]) -> List[str]:
    """A saved list of input names, checked: each a ``str`` (a parameter of ``model.forward``)."""
    if not all(isinstance(name, str) for name in names):
        raise StateError(f"input_names must be a list of str, got {names!r}")
    return names


def check_no_live_method(module: nn.Module, new_method: str) -> None:
    """Raise if another method's hooks are live on ``module``: two methods would both append replay rows
    to (and split) every training forward. A method nothing refers to any more is collected first."""
    if live_captures(module):
        gc.collect()  # an unreachable method (e.g. a notebook cell run again) may wait in a reference cycle
    live = live_captures(module)
    if live:
        raise RuntimeError(
            f"{type(module).__name__} already carries a live {live[0].owner}: its forward hooks would stay on and "
            f"stack with the new {new_method}'s (extra replay rows, split errors). Call remove_hooks() on the "
            f"{live[0].owner} first (old_method.remove_hooks()), or keep using it instead of building a new one"
        )


class Synapse(Stateful, ABC):
    """Base class of all continual-learning methods.

    A method turns the user's ``loss.backward()`` into ``synapse.backward(loss, targets, **inputs)``.
    Subclasses implement :meth:`_backward` (and optionally :meth:`_check` and :meth:`_end_task`), and
    declare their persistent state in ``__init__`` (:class:`~synapse._state.Stateful`: ``add_state``,
    ``add_value``, ``add_frozen_module``, ...); validation, step counting, task bookkeeping, the GradScaler
    and the state dict live here.

    What the base gives a method (see ``docs/architecture.md``): argument validation before any state
    changes, step and task counters, the GradScaler, the state dict, one-backward-pass assembly of weighted
    terms (:meth:`_run_backward`), and, on request, a :class:`~synapse._capture.ForwardCapture` of the
    user's training forward (:meth:`_capture_forward`). Class attributes describe the method to the CLI
    and the contract tests:

    * ``needs_task_boundaries``: the method cannot run task-free (e.g. GEM's per-task memories);
    * ``needs_task_data``: :meth:`end_task` needs the finished task's data (e.g. EWC's Fisher);
    * ``has_predictor``: :meth:`predict` is the method's own rule, not the model's outputs;
    * ``acts_at_task_end``: the method does its work at :meth:`end_task` (a teacher, a penalty, a memory);
      without those calls it is plain fine-tuning, so it warns once when a new task seems to begin without
      one, and a task-free stream refuses it. Implied by the two ``needs_task_*`` attributes;
    * ``reads_logits``: the method's loss reads the model's raw logits (DER's logit matching, iCaRL's
      sigmoids, LwF's temperature): it warns once when the outputs are log-probabilities instead;
    * ``trains_model``: False for a method under which no weight of the model trains (the closed-form
      methods): the training forwards then belong in ``eval()`` mode, as the experiment program runs them,
      so that BatchNorm layers neither normalise by batch nor move their running statistics.

    The model's inputs keep the names ``backward`` was first given: later steps, :func:`named_batches`
    without a name, the task-end pass and :meth:`predict` use them, and a name ``forward`` cannot take is
    refused on the first step. One method at a time may hook a model's forward: building a second one on a
    model whose first is still hooked raises (call the first one's :meth:`remove_hooks`).

    Args:
        model: the model being trained; a DDP- or ``torch.compile``-wrapped model works too.
        scaler: a ``torch.amp.GradScaler`` when training with mixed precision. ``backward`` then scales
            the total loss itself: pass it the *unscaled* loss.
    """

    needs_task_boundaries: bool = False
    needs_task_data: bool = False
    has_predictor: bool = False  # predict() is the method's own (iCaRL's nearest mean of exemplars)
    acts_at_task_end: bool = False  # without end_task() calls the method is fine-tuning (set for needs_task_*)
    reads_logits: bool = False  # the loss reads raw logits: log-probabilities change its meaning
    trains_model: bool = True  # False: nothing in the model trains, so it runs in eval() mode while training
    requires_vit: bool = False  # works only on a timm VisionTransformer (prompts go into its tokens/attention)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.needs_task_boundaries or cls.needs_task_data:  # both mean the method's work is at task ends
            cls.acts_at_task_end = True

    def __init__(self, model: nn.Module, *, scaler: Optional[torch.amp.GradScaler] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("model has no parameters that require grad")
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
        check_no_live_method(unwrap_model(model), type(self).__name__)
        self.model = model
        self.module = unwrap_model(model)
        self._forward_signature = forward_signature(self.module)  # read once: names are checked against it
        self._input_names: Optional[Tuple[str, ...]] = None  # the names backward was given (persisted)
        self.add_value(
            "input_names",
            list,
            convert=_input_names,
            get=lambda: list(self._input_names or []),
            set=self._set_input_names,
        )
        self._logprob_check = LogProbabilityCheck(type(self).__name__)
        self._class_watch = NewClassWatch(type(self).__name__)
        self._own_watch = OwnParameterWatch(type(self).__name__)
        self._warned: Set[str] = set()  # the one-time warnings given (_warn_once)
        self._a_parameter = next(self.module.parameters())  # its device is the model's device
        self.scaler = scaler
        self.num_steps = 0
        self.num_tasks_ended = 0
        self._last_step_task = -1  # num_tasks_ended at the last successful step (-1: none since built)
        self._constants: Dict[Tuple[float, torch.Size, torch.dtype, torch.device], Tensor] = {}
        self._capture: Optional[ForwardCapture] = None
        self._reads_outputs = False  # backward reads the outputs of the user's forward (set by the method)

    # ------------------------------------------------------------------ public API
    def backward(self, loss: Tensor, targets: Tensor, **model_inputs: Tensor) -> None:
        """Use instead of ``loss.backward()``.

        Args:
            loss: the scalar loss of the current batch, unscaled.
            targets: the batch's class indices, shape ``(batch,)``.
            **model_inputs: the batch's inputs, named as ``model.forward``'s parameters
                (``inputs=inputs`` for ``forward(self, inputs)``).

        Everything is checked before any state changes: a rejected call leaves the object as it was.
        """
        check_loss(loss)
        check_targets_and_inputs(targets, model_inputs)
        self._check_input_names(model_inputs)
        self._check(loss, targets, model_inputs)
        if self.reads_logits:
            self._logprob_check.poll()
            if self._capture is not None and self._capture.outputs is not None:
                self._logprob_check.start(self._capture.outputs)  # first step only; methods clear outputs
        self._backward(loss, targets, model_inputs)
        self._set_input_names(tuple(model_inputs))
        if self.acts_at_task_end:
            self._class_watch.observe(self.num_steps, targets)
        self._own_watch.observe(self.own_parameters)
        self._last_step_task = self.num_tasks_ended
        self.num_steps += 1

    def end_task(self, data: Optional[Iterable[TaskBatch]] = None) -> None:
        """Tell the method a task just ended.

        Args:
            data: optionally, the finished task's training data as an iterable of ``(targets, inputs)``
                batches, ``inputs`` a dict named like ``backward``'s keywords (:func:`named_batches` turns
                a ``DataLoader`` of ``(x, y)`` pairs into that form). Methods that estimate something over
                the task (EWC's Fisher) read it; the others ignore it. A method whose class says
                ``needs_task_data`` raises without it.
        """
        if data is None and self.needs_task_data:
            raise ValueError(
                f"{type(self).__name__}.end_task needs the finished task's data: "
                "end_task(data) with data an iterable of (targets, {name: inputs}) batches, e.g. named_batches(loader)"
            )
        if data is not None and (isinstance(data, (Tensor, Mapping, str)) or not hasattr(data, "__iter__")):
            raise TypeError(
                f"data must be an iterable of (targets, {{name: inputs}}) batches, got {type(data).__name__}"
            )
        self._end_task(data)
        self._class_watch.task_ended()
        self.num_tasks_ended += 1

    @torch.no_grad()
    def predict(self, **model_inputs: Tensor) -> Tensor:
        """Class scores ``(batch, classes)`` for evaluation: the model's outputs, in eval mode, unless the
        method predicts its own way (``has_predictor``; e.g. iCaRL's nearest mean of exemplars).

        Use it in your own evaluation loop in place of ``model(inputs)``:
        ``predictions = synapse.predict(inputs=x).argmax(1)``, with the inputs named as in ``backward``.
        """
        self._check_predict_inputs(model_inputs)
        was_training = self.module.training
        self.module.eval()
        try:
            return self.model(**model_inputs)
        finally:
            self.module.train(was_training)

    def remove_hooks(self) -> None:
        """Detach from the model's forward (a method that captured it cannot train afterwards). Call it on
        the old method before building another one on the same model."""
        if self._capture is not None:
            self._capture.remove()

    def state_dict(self) -> Dict[str, Any]:
        """Counters, memories, importance tensors and RNG state: enough to resume bit-identically. The
        method's part (``'state'``) is built from its declarations (:mod:`synapse._state`)."""
        return {
            "method": type(self).__name__,
            "num_steps": self.num_steps,
            "num_tasks_ended": self.num_tasks_ended,
            "state": {**self._declared_state(), "format": STATE_FORMAT},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; tensors move to the model's current device.

        Strict and all or nothing: every key, type, dtype and shape is checked (memories and teachers
        included) before anything is assigned, and a state that does not fit raises
        :class:`~synapse._state.StateError` (a ``ValueError``) and leaves the method as it was. A state dict
        written before declared state (it has no ``'format'``) loads too, through :meth:`_upgrade_state`.
        """
        if not isinstance(state, Mapping) or not _TOP_KEYS <= state.keys():
            raise StateError(f"not a Synapse state dict: expected the keys {sorted(_TOP_KEYS)}")
        if state["method"] != type(self).__name__:
            raise StateError(f"state dict is for {state['method']}, but this object is {type(self).__name__}")
        extra = sorted(set(state) - _TOP_KEYS - set(OPTIONAL_TOP_KEYS))
        if extra:
            raise StateError(f"state dict has unexpected keys {extra}")
        for key in ("num_steps", "num_tasks_ended"):
            if not isinstance(state[key], int) or isinstance(state[key], bool) or state[key] < 0:
                raise StateError(f"state dict's {key!r} must be a non-negative int, got {state[key]!r}")
        inner = state["state"]
        if not isinstance(inner, Mapping):
            raise StateError(f"state dict's 'state' must be a dict, got {type(inner).__name__}")
        if "format" in inner:
            if inner["format"] != STATE_FORMAT:
                raise StateError(
                    f"state dict has format {inner['format']!r}; this version of Synapse reads format "
                    f"{STATE_FORMAT} and the unversioned one before it"
                )
            apply = self._prepare_state({k: v for k, v in inner.items() if k != "format"}, self.device)
        else:
            try:
                # That layout kept the input names only for methods with a memory: the others start with none.
                apply = self._prepare_state(self._upgrade_state({"input_names": [], **inner}), self.device)
            except StateError as error:
                raise StateError(
                    f"this state dict has no 'format', so it was written before declared state; it does not fit "
                    f"{type(self).__name__} as that version wrote it: {error}"
                ) from None
        apply()
        self.num_steps = state["num_steps"]
        self.num_tasks_ended = state["num_tasks_ended"]

    def _upgrade_state(self, state: Dict[str, Any]) -> Dict[str, Any]:
        """A method's state as the last unversioned layout wrote it, in today's layout (the same keys,
        unless a method adds one it can derive)."""
        return state

    @property
    def needs_training_forward(self) -> bool:
        """Whether ``backward`` relies on the forward that produced the loss running in train mode with grad
        enabled: its replay rides along in that forward (fused replay), or its loss reads that forward's
        outputs. A forward in ``eval()`` mode is then refused, never silently trained on without replay."""
        capture = self._capture
        return capture is not None and (capture.replays or self.reads_logits or self._reads_outputs)

    # ------------------------------------------------------------------ helpers for methods
    @property
    def device(self) -> torch.device:
        return self._a_parameter.device

    def _capture_forward(self, replay_source: Optional[ReplaySource] = None) -> ForwardCapture:
        """Hook the user's training forward (once): live outputs, and fused replay rows from ``replay_source``."""
        if self._capture is None:
            self._capture = ForwardCapture(self.module, self._a_parameter, replay_source, type(self).__name__)
        return self._capture

    def _frozen_copy(
        self,
        weights: Optional[Mapping[str, Tensor]] = None,
        load: Optional[Callable[[nn.Module, Mapping[str, Tensor]], Any]] = None,
    ) -> nn.Module:
        """A copy of the model for teachers and old models (LwF, BiC, iCaRL): in eval mode, parameters frozen
        and without gradients, on the model's device. The capture's hooks are inert in a copy, so it runs
        plain forwards. ``weights`` (loaded by ``load``, default ``load_state_dict``) restore a saved one."""
        copy_ = copy.deepcopy(self.module)
        if weights is not None:
            (load or nn.Module.load_state_dict)(copy_, weights)
        copy_.eval().requires_grad_(False)
        for p in copy_.parameters():
            p.grad = None
        return copy_.to(self.device)

    @staticmethod
    def _check_current_loss(current_loss: str) -> str:
        if current_loss not in CURRENT_LOSS:
            raise ValueError(f"current_loss must be one of {CURRENT_LOSS}, got {current_loss!r}")
        return current_loss

    def _iter_task_data(self, data: Iterable[TaskBatch]) -> Iterator[Tuple[Tensor, Dict[str, Tensor]]]:
        """The batches of a task-end pass, each checked as ``backward`` checks its arguments, with
        :func:`named_batches`' unnamed inputs named as ``backward``'s."""
        for item in data:
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], Mapping)):
                raise TypeError(
                    "each batch of end_task(data) must be (targets, {name: inputs}), got "
                    f"{type(item).__name__}; wrap a loader of (x, y) pairs with synapse.named_batches(loader)"
                )
            targets, inputs = item[0], dict(item[1])
            if RECORDED_NAME in inputs:
                inputs = {self._recorded_input_name(): inputs.pop(RECORDED_NAME), **inputs}
            check_targets_and_inputs(targets, inputs)
            check_forward_accepts(self.module, self._forward_signature, inputs)
            yield targets, inputs

    # ------------------------------------------------------------------ input names
    def _check_input_names(self, model_inputs: Mapping[str, Tensor]) -> None:
        """The first step's names must fit ``forward``; later steps must repeat them."""
        if self._input_names is None:
            check_forward_accepts(self.module, self._forward_signature, model_inputs)
        elif set(model_inputs) != set(self._input_names):
            problem = f"model inputs {tuple(model_inputs)} differ from those of earlier steps {self._input_names}"
            try:
                check_forward_accepts(self.module, self._forward_signature, model_inputs)
            except ValueError as error:
                raise ValueError(f"{problem}, and {error}") from None
            raise ValueError(problem)

    def _check_predict_inputs(self, model_inputs: Mapping[str, Any]) -> None:
        """``predict``'s keywords: those of ``backward``, in Synapse's words rather than a TypeError deep inside."""
        if self._input_names is not None and set(model_inputs) != set(self._input_names):
            raise ValueError(
                f"predict got model inputs {tuple(model_inputs)}, but backward was given {self._input_names}: "
                f"call predict({', '.join(f'{n}=...' for n in self._input_names)})"
            )
        check_forward_accepts(self.module, self._forward_signature, model_inputs)

    def _recorded_input_name(self) -> str:
        """The name for :func:`named_batches`' unnamed inputs: the one ``backward`` was given, or else
        ``forward``'s only parameter."""
        names = self._input_names
        if names is None and self._forward_signature is not None:
            named = [p for p in self._forward_signature.parameters.values() if p.kind in _BY_NAME]
            required = [p for p in named if p.default is inspect.Parameter.empty]
            names = tuple(p.name for p in (named if len(named) == 1 else required))
        if names is None or len(names) != 1:
            given = "backward was given" if self._input_names is not None else "forward takes"
            raise ValueError(
                f"named_batches(loader) without a name gives one input, but {given} {names}: pass the name, "
                "named_batches(loader, name), or build the (targets, {name: inputs}) batches yourself"
            )
        return names[0]

    def _set_input_names(self, names: Optional[Sequence[str]]) -> None:
        self._input_names = tuple(names) if names else None
        if self._capture is not None:
            self._capture.input_names = self._input_names

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def _warn_once(self, key: str, message: str) -> None:
        """A ``UserWarning`` the first time ``key`` comes up for this method, pointing at the user's line."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=user_stacklevel())

    @property
    def _first_step_of_task(self) -> bool:
        """Whether this step is the first of a task (or since the method was built): where checks that cost a
        host sync, or a walk over the model, are made once per task rather than at every step."""
        return self._last_step_task != self.num_tasks_ended

    def own_parameters(self) -> List[nn.Parameter]:
        """The trainable parameters the method keeps outside the model (L2P's prompts and keys): an optimizer
        built on ``model.parameters()`` needs them added. Empty for a method that trains only the model."""
        inside = {id(p) for p in self.module.parameters()}
        return [p for p in self.trainable_parameters() if id(p) not in inside]

    def _gradients(self, params: Sequence[nn.Parameter]) -> List[Tensor]:
        """The ``.grad`` of each parameter, creating zeros for parameters this step did not reach."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in params]  # type: ignore[misc]

    def _run_backward(
        self,
        loss: Tensor,
        terms: Sequence[Tuple[float, Tensor]] = (),
        seeded: Sequence[Tuple[Tensor, Tensor]] = (),
        loss_weight: float = 1.0,
    ) -> None:
        """One backward pass of ``loss_weight * loss + sum(weight * term)``, plus, for each
        ``(output, gradient)`` in ``seeded``, a term whose gradient with respect to ``output`` is already
        known (and is ours to scale).

        Without a scaler the terms are extra roots of the same backward and their weights are the
        gradients fed into them, so neither the weighting nor the sum adds a node to the graph. The
        seeds are cached tensors: left to autograd, each root would get a freshly allocated one.
        """
        if self.scaler is not None:
            if loss_weight != 1.0:
                loss = loss * loss_weight
            loss = self.scaler.scale(loss + sum(w * t for w, t in terms) if terms else loss)
            terms, loss_weight = (), 1.0
            scale = self._grad_scale()
            if scale is not None:
                seeded = [(output, gradient.mul_(scale)) for output, gradient in seeded]
        roots, seeds = [loss], [self._constant(loss_weight, loss)]
        for weight, term in terms:
            roots.append(term)
            seeds.append(self._constant(weight, term))
        for output, gradient in seeded:
            roots.append(output)
            seeds.append(gradient)
        _autograd.backward(roots, seeds)

    def _constant(self, value: float, like: Tensor) -> Tensor:
        """A cached tensor filled with ``value``, with ``like``'s shape, dtype and device (never written to)."""
        key = (value, like.shape, like.dtype, like.device)
        cached = self._constants.get(key)
        if cached is None:
            cached = self._constants[key] = torch.full(like.shape, value, dtype=like.dtype, device=like.device)
        return cached

    def _grad_scale(self) -> Optional[Tensor]:
        """The scaler's current scale as a device tensor (no sync), or None without a scaler."""
        if self.scaler is None or not self.scaler.is_enabled():
            return None
        return self.scaler._get_scale_async()  # the public get_scale() would sync with .item()

    # ------------------------------------------------------------------ hooks for methods
    def _check(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        """Method-specific validation; must not mutate."""

    @abstractmethod
    def _backward(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        """Run the backward pass(es) for one step, leaving the final gradients in ``.grad``."""

    def _end_task(self, data: Optional[Iterable[TaskBatch]]) -> None:
        pass


class BufferedSynapse(Synapse):
    """A method with a :class:`ReservoirBuffer` of past inputs and targets (and whatever else it stores).

    Each rank of a distributed run keeps its own reservoir of its own data stream; no communication is
    needed to insert or sample. With ``buffer_scope='rank'`` (the default) each rank holds
    ``buffer_size`` items, so the run holds ``world_size * buffer_size``; with ``'global'`` the ranks
    split ``buffer_size`` between them.

    ``buffer_policy`` chooses what the memory keeps (:mod:`synapse.memory`): ``'reservoir'`` (default), or
    ``'class_balanced'`` (GDumb's greedy class balancer). A subclass may accept other policies by setting
    the class attribute ``buffer_policies`` (a method filled at task ends lists ``'herding'``).

    ``replay_transform`` (default None: replay what was stored) augments every replayed minibatch on the
    device before it is used, fused or not (:mod:`synapse.augment`; any callable ``images -> images``).
    Its per-image randomness comes from the method's own generator (seeded from torch's global RNG when
    the method is made, and saved in :meth:`state_dict`), so a resumed run replays the same views. The
    memory stores what ``backward`` receives: to store the raw view while the model trains on an augmented
    one, call ``model(augment(x))`` and then ``backward(loss, y, inputs=x)``. Stored logits (DER) are the
    outputs of that augmented forward, as in the DER authors' code.
    """

    def __init__(
        self,
        model: nn.Module,
        buffer_size: int,
        buffer_sample_size: int,
        *,
        buffer_scope: str = "rank",
        buffer_policy: str = "reservoir",
        scaler: Optional[torch.amp.GradScaler] = None,
        replay_transform: Optional[Transform] = None,
    ) -> None:
        check_positive_int("buffer_size", buffer_size)
        check_replay_transform(replay_transform)
        check_positive_int("buffer_sample_size", buffer_sample_size)
        if buffer_scope not in ("rank", "global"):
            raise ValueError(f"buffer_scope must be 'rank' or 'global', got {buffer_scope!r}")
        policies = getattr(self, "buffer_policies", STREAM_POLICIES)
        if buffer_policy not in policies:
            raise ValueError(
                f"buffer_policy must be one of {policies} for {type(self).__name__}, got {buffer_policy!r}"
            )
        world = distributed_world()
        if buffer_scope == "global" and buffer_size < world:
            raise ValueError(f"buffer_size={buffer_size} cannot be split across {world} ranks (buffer_scope='global')")
        super().__init__(model, scaler=scaler)
        self.buffer_sample_size = buffer_sample_size
        rank = dist.get_rank() if world > 1 else 0
        capacity = buffer_size if buffer_scope == "rank" else buffer_size // world + (rank < buffer_size % world)
        # Offsetting by rank decorrelates the ranks' reservoirs under one global seed.
        self.buffer_policy = buffer_policy
        self.buffer = make_buffer(buffer_policy, capacity, seed=(fresh_seed() + rank) % 2**62)
        self._stores_targets = True  # a method whose loss never reads them may store none
        self._last_replay: Optional[Dict[str, Tensor]] = None
        self.add_state_object("buffer", lambda: self.buffer)
        self.add_constraint(self._check_stored_fields)
        # Replay augmentation: the generator is made (and torch's global RNG read) only when asked for, so
        # that without a transform a run is bit-identical to one made before this option existed.
        self.replay_transform = replay_transform
        self._replay_checked_task = -1  # num_tasks_ended at the last check of replayed rows (-1: never)
        self._replay_generator: Optional[torch.Generator] = None
        if replay_transform is not None:
            self._replay_generator = torch.Generator().manual_seed(fresh_seed())
            # declared only with a transform: state dicts of runs without one stay as they were
            self.add_generator("replay_rng", "_replay_generator")

    def _check(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        # Names, types and batch sizes were checked by backward; only what the user passed needs checking
        # against the stored layout: whatever a method adds is its own making.
        self.buffer.check_layout(BufferedSynapse._stored_items(self, targets, model_inputs), partial=True)
        outputs = None if self._capture is None or not self._first_step_of_task else self._capture.outputs
        if outputs is not None and outputs.dim() == 2:
            # Targets outside the head would be stored and fail every later replay loss. Read at each task's
            # first step (where a per-task label mapping slips); on CUDA, where reading them is a host sync,
            # at the very first step only, so that backward stays sync-free.
            check_class_indices(targets, outputs.shape[1], first_step=self.num_steps == 0)

    def _stored_items(self, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """The named tensors one step stores."""
        items = {f"input:{k}": v for k, v in model_inputs.items()}
        if self._stores_targets:
            items["targets"] = targets
        return items

    def _store(self, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        """Offer the step's items to the buffer (already validated by :meth:`_check`)."""
        self._set_input_names(tuple(model_inputs))
        self._follow_model_device()
        self.buffer.add(self._stored_items(targets, model_inputs), validate=False)

    def _follow_model_device(self) -> None:
        if self.buffer.device is not None and self.buffer.device != self.device:
            self.buffer.to(self.device)

    @property
    def last_replay(self) -> Optional[Dict[str, Tensor]]:
        """The rows the method last drew from its memory to replay, or None before its first replay.

        A dict of stored fields (``'input:<name>'``, ``'targets'`` and what the method keeps besides, e.g.
        DER's ``'logits'``), minibatch after minibatch along dim 0: the very tensors the replay loss
        reads, so holding them costs nothing and reading them never syncs. A fused replay draws in the
        training forward, a separate one in ``backward``; each draw is a new dict, so ``is`` tells whether
        a step drew. Read it before the next draw, or clone it to keep it.

        Example:
            >>> from synapse.rehearsal import ER
            >>> synapse = ER(model, buffer_size=100, buffer_sample_size=4, method="er")
            >>> for inputs, targets in loader:
            ...     optimizer.zero_grad()
            ...     outputs = model(inputs)  # the fused replay draws here
            ...     synapse.backward(criterion(outputs, targets), targets, inputs=inputs)
            ...     optimizer.step()
            >>> sorted(synapse.last_replay), synapse.last_replay["targets"].shape
            (['input:inputs', 'targets'], torch.Size([4]))
        """
        return self._last_replay

    def _replaying(self, sample: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Record ``sample`` as :attr:`last_replay` and return it (a method that draws its own replay rows
        passes them through here)."""
        self._last_replay = sample
        return sample

    def _sample(self, num_minibatches: int = 1, names: Optional[Sequence[str]] = None) -> Dict[str, Tensor]:
        """``num_minibatches`` independent minibatches (of all fields, or ``names``), one after the other
        along dim 0: minibatch ``i`` is rows ``i*k:(i+1)*k`` with ``k = min(buffer_sample_size, len)``."""
        self._follow_model_device()
        return self._replaying(
            self._augment_replay(self.buffer.sample(self.buffer_sample_size, num_minibatches, names))
        )

    def _augment_replay(self, sample: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """``sample`` with its inputs passed through ``replay_transform`` (none: unchanged), in place, and
        checked against the training forward's inputs (:func:`~synapse._validation.check_replay_rows`).

        Every replay path calls it once per replayed minibatch, so the draws from the method's generator
        follow the steps in the same order, fused or not, and a resumed run repeats them."""
        transform = self.replay_transform
        if transform is not None:
            for name in [name for name in sample if name.startswith("input:")]:
                rows = sample[name].shape[0]
                out = apply_transform(transform, sample[name], self._replay_generator)
                if not isinstance(out, Tensor) or out.shape[0] != rows:
                    got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                    raise ValueError(f"replay_transform must return a tensor of {rows} rows for {name!r}, got {got}")
                sample[name] = out
        # Checked at the first replay of each task against the training forward's inputs (where known): a loop's
        # preprocessing does not change within a task, and this is a hot path.
        live = None if self._capture is None else self._capture.inputs
        if live and self._replay_checked_task != self.num_tasks_ended:
            for name, tensor in live.items():
                if f"input:{name}" in sample:
                    check_replay_rows(name, tensor, sample[f"input:{name}"])
            self._replay_checked_task = self.num_tasks_ended
        return sample

    @staticmethod
    def _inputs_of(sample: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        return {k[len("input:") :]: v for k, v in sample.items() if k.startswith("input:")}

    def _check_stored_fields(self, state: Mapping[str, Any], path: str) -> None:
        """The memory's fields are named by the data: those of the saved inputs (and targets) must be there."""
        names, buffer = state.get("input_names"), state.get("buffer")
        storage = buffer.get("storage") if isinstance(buffer, Mapping) else None
        if isinstance(names, list) and isinstance(storage, Mapping) and storage:
            wanted = {f"input:{name}" for name in names} | ({"targets"} if self._stores_targets else set())
            missing = sorted(wanted - set(storage))
            if missing:
                raise StateError(f"{path}['buffer']['storage'] lacks the fields {missing} of the inputs it stores")
