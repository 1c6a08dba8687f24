"""The one contract every method implements: ``backward``, ``end_task`` and the state dict."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _autograd
from ._capture import ForwardCapture, ReplaySource
from ._validation import check_loss, check_positive_int, check_targets_and_inputs
from .augment import Transform, apply_transform
from .buffer import fresh_seed
from .memory import STREAM_POLICIES, make_buffer

__all__ = ["Synapse", "BufferedSynapse", "TaskBatch", "named_batches", "unwrap_model"]

# One batch of a task-end data pass, in the form ``backward`` takes it (less the loss):
# ``(targets, {name: input})`` with the inputs named as ``model.forward``'s parameters.
TaskBatch = Tuple[Tensor, Mapping[str, Tensor]]
CURRENT_LOSS = ("method", "user")


def named_batches(pairs: Iterable[Tuple[Any, Tensor]], name: str = "inputs") -> Iterator[TaskBatch]:
    """``(inputs, targets)`` pairs (what a ``DataLoader`` yields) as ``(targets, {name: inputs})`` batches,
    the form :meth:`Synapse.end_task` takes: ``synapse.end_task(named_batches(loader))``."""
    for inputs, targets in pairs:
        yield targets, {name: inputs}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that really runs ``forward``: through DDP/DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def distributed_world() -> int:
    """The world size when torch.distributed is running, else 1."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class Synapse(ABC):
    """Base class of all continual-learning methods.

    A method turns the user's ``loss.backward()`` into ``synapse.backward(loss, targets, **inputs)``.
    Subclasses implement :meth:`_backward` (and optionally :meth:`_check`, :meth:`_end_task`,
    :meth:`_method_state` and :meth:`_load_method_state`); validation, step counting, task bookkeeping,
    the GradScaler and the state dict live here.

    What the base gives a method (see ``docs/architecture.md``): argument validation before any state
    changes, step and task counters, the GradScaler, the state dict, one-backward-pass assembly of weighted
    terms (:meth:`_run_backward`), and, on request, a :class:`~synapse._capture.ForwardCapture` of the
    user's training forward (:meth:`_capture_forward`). Class attributes describe the method to the CLI
    and the contract tests:

    * ``needs_task_boundaries``: the method cannot run task-free (e.g. GEM's per-task memories);
    * ``needs_task_data``: :meth:`end_task` needs the finished task's data (e.g. EWC's Fisher);
    * ``has_predictor``: :meth:`predict` is the method's own rule, not the model's outputs.

    Args:
        model: the model being trained; a DDP- or ``torch.compile``-wrapped model works too.
        scaler: a ``torch.amp.GradScaler`` when training with mixed precision. ``backward`` then scales
            the total loss itself: pass it the *unscaled* loss.
    """

    needs_task_boundaries: bool = False
    needs_task_data: bool = False
    has_predictor: bool = False  # predict() is the method's own (iCaRL's nearest mean of exemplars)

    def __init__(self, model: nn.Module, *, scaler: Optional[torch.amp.GradScaler] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("model has no parameters that require grad")
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
        self.model = model
        self.module = unwrap_model(model)
        self._a_parameter = next(self.module.parameters())  # its device is the model's device
        self.scaler = scaler
        self.num_steps = 0
        self.num_tasks_ended = 0
        self._constants: Dict[Tuple[float, torch.Size, torch.dtype, torch.device], Tensor] = {}
        self._capture: Optional[ForwardCapture] = None

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
        self._check(loss, targets, model_inputs)
        self._backward(loss, targets, model_inputs)
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
        self.num_tasks_ended += 1

    @torch.no_grad()
    def predict(self, **model_inputs: Tensor) -> Tensor:
        """Class scores ``(batch, classes)`` for evaluation: the model's outputs, in eval mode, unless the
        method predicts its own way (``has_predictor``; e.g. iCaRL's nearest mean of exemplars).

        Use it in your own evaluation loop in place of ``model(inputs)``:
        ``predictions = synapse.predict(inputs=x).argmax(1)``.
        """
        was_training = self.module.training
        self.module.eval()
        try:
            return self.model(**model_inputs)
        finally:
            self.module.train(was_training)

    def remove_hooks(self) -> None:
        """Detach from the model's forward (a method that captured it cannot train afterwards)."""
        if self._capture is not None:
            self._capture.remove()

    def state_dict(self) -> Dict[str, Any]:
        """Counters, memories, importance tensors and RNG state: enough to resume bit-identically."""
        return {
            "method": type(self).__name__,
            "num_steps": self.num_steps,
            "num_tasks_ended": self.num_tasks_ended,
            "state": self._method_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; tensors move to the model's current device."""
        if not isinstance(state, Mapping) or "method" not in state or "state" not in state:
            raise ValueError("not a Synapse state dict: expected keys 'method', 'num_steps', 'state'")
        if state["method"] != type(self).__name__:
            raise ValueError(f"state dict is for {state['method']}, but this object is {type(self).__name__}")
        self._load_method_state(state["state"])
        self.num_steps = int(state["num_steps"])
        self.num_tasks_ended = int(state["num_tasks_ended"])

    # ------------------------------------------------------------------ helpers for methods
    @property
    def device(self) -> torch.device:
        return self._a_parameter.device

    def _capture_forward(self, replay_source: Optional[ReplaySource] = None) -> ForwardCapture:
        """Hook the user's training forward (once): live outputs, and fused replay rows from ``replay_source``."""
        if self._capture is None:
            self._capture = ForwardCapture(self.module, self._a_parameter, replay_source)
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

    @staticmethod
    def _iter_task_data(data: Iterable[TaskBatch]) -> Iterator[Tuple[Tensor, Dict[str, Tensor]]]:
        """The batches of a task-end pass, each checked as ``backward`` checks its arguments."""
        for item in data:
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], Mapping)):
                raise TypeError(
                    "each batch of end_task(data) must be (targets, {name: inputs}), got "
                    f"{type(item).__name__}; wrap a loader of (x, y) pairs with synapse.named_batches(loader)"
                )
            targets, inputs = item[0], dict(item[1])
            check_targets_and_inputs(targets, inputs)
            yield targets, inputs

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

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

    def _method_state(self) -> Dict[str, Any]:
        return {}

    def _load_method_state(self, state: Mapping[str, Any]) -> None:
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
        if replay_transform is not None and not callable(replay_transform):
            raise TypeError(
                f"replay_transform must be a callable (images -> images) or None, got {type(replay_transform).__name__}"
            )
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
        self._input_names: Optional[tuple] = None
        self._stores_targets = True  # a method whose loss never reads them may store none
        # Replay augmentation: the generator is made (and torch's global RNG read) only when asked for, so
        # that without a transform a run is bit-identical to one made before this option existed.
        self.replay_transform = replay_transform
        self._replay_generator: Optional[torch.Generator] = None
        if replay_transform is not None:
            self._replay_generator = torch.Generator().manual_seed(fresh_seed())

    def _check(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        if self._input_names is not None and tuple(model_inputs) != self._input_names:
            raise ValueError(
                f"model inputs {tuple(model_inputs)} differ from those of earlier steps {self._input_names}"
            )
        # Types and batch sizes were checked by backward; only what the user passed needs checking
        # against the stored layout: whatever a method adds is its own making.
        self.buffer.check_layout(BufferedSynapse._stored_items(self, targets, model_inputs), partial=True)

    def _stored_items(self, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """The named tensors one step stores."""
        items = {f"input:{k}": v for k, v in model_inputs.items()}
        if self._stores_targets:
            items["targets"] = targets
        return items

    def _store(self, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        """Offer the step's items to the buffer (already validated by :meth:`_check`)."""
        self._input_names = tuple(model_inputs)
        if self._capture is not None:
            self._capture.input_names = self._input_names
        self._follow_model_device()
        self.buffer.add(self._stored_items(targets, model_inputs), validate=False)

    def _follow_model_device(self) -> None:
        if self.buffer.device is not None and self.buffer.device != self.device:
            self.buffer.to(self.device)

    def _sample(self, num_minibatches: int = 1, names: Optional[Sequence[str]] = None) -> Dict[str, Tensor]:
        """``num_minibatches`` independent minibatches (of all fields, or ``names``), one after the other
        along dim 0: minibatch ``i`` is rows ``i*k:(i+1)*k`` with ``k = min(buffer_sample_size, len)``."""
        self._follow_model_device()
        return self._augment_replay(self.buffer.sample(self.buffer_sample_size, num_minibatches, names))

    def _augment_replay(self, sample: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """``sample`` with its inputs passed through ``replay_transform`` (none: unchanged), in place.

        Every replay path calls it once per replayed minibatch, so the draws from the method's generator
        follow the steps in the same order, fused or not, and a resumed run repeats them."""
        if self.replay_transform is None:
            return sample
        for name in sample:
            if name.startswith("input:"):
                rows = sample[name].shape[0]
                out = apply_transform(self.replay_transform, sample[name], self._replay_generator)
                if not isinstance(out, Tensor) or out.shape[0] != rows:
                    got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                    raise ValueError(f"replay_transform must return a tensor of {rows} rows for {name!r}, got {got}")
                sample[name] = out
        return sample

    @staticmethod
    def _inputs_of(sample: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        return {k[len("input:") :]: v for k, v in sample.items() if k.startswith("input:")}

    def _method_state(self) -> Dict[str, Any]:
        state = {"buffer": self.buffer.state_dict(), "input_names": list(self._input_names or [])}
        if self._replay_generator is not None:  # replay augmentation (only then: older state dicts stay valid)
            state["replay_rng"] = self._replay_generator.get_state()
        return state

    def _load_method_state(self, state: Mapping[str, Any]) -> None:
        if "buffer" not in state:
            raise ValueError("state dict has no 'buffer'")
        # Replay augmentation: the generator's state goes with the transform, checked before anything changes.
        if (self._replay_generator is not None) != ("replay_rng" in state):
            raise ValueError(
                "state dict was saved "
                + ("with" if "replay_rng" in state else "without")
                + " a replay_transform, but this method has "
                + ("one" if self._replay_generator is not None else "none")
                + ": make it as the saved one was made"
            )
        replay_rng = None
        if self._replay_generator is not None:
            replay_rng = torch.Generator()
            replay_rng.set_state(state["replay_rng"])  # a scratch generator: raises on a bad state, changes nothing
        self.buffer.load_state_dict(state["buffer"], device=self.device)
        if replay_rng is not None:
            self._replay_generator = replay_rng
        self._input_names = tuple(state.get("input_names") or ()) or None
        if self._capture is not None:
            self._capture.input_names = self._input_names
