"""Rehearsal: replay from a memory. Experience Replay, Dark Experience Replay (DER) and DER++."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import BufferedSynapse
from ._validation import check_non_negative
from .functional import logit_distillation_grad

__all__ = ["ER"]

METHODS = ("er", "der", "der++", "custom")

CustomLossFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class _Replay:
    """One step's replay minibatch(es) and, once the forward ran, the model's outputs on them."""

    sample: Dict[str, Tensor]  # fields of shape (num_minibatches * k, ...), minibatch after minibatch
    num_minibatches: int
    user_batch: int = 0
    outputs: Optional[List[Tensor]] = None  # the model's outputs, one (k, num_logits) tensor per minibatch
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


class ER(BufferedSynapse):
    """Experience Replay and Dark Experience Replay from a reservoir buffer.

    Methods (``L`` is the user's loss on the current batch, ``(x', y', z')`` buffer samples with their
    stored logits ``z'``, ``f`` the model):

    * ``'er'``: ``L + alpha * CE(f(x'), y')`` -- Experience Replay as in Chaudhry et al. 2019,
      "On Tiny Episodic Memories in Continual Learning", with reservoir sampling. (The paper averages
      the cross-entropy over the union of both batches; with batches of ``B`` and ``k`` items that is
      this objective with ``alpha = k / B``, scaled by ``B / (B + k)``.)
    * ``'der'``: ``L + alpha * MSE(f(x'), z')`` -- Buzzega et al. 2020, "Dark Experience for General
      Continual Learning: a Strong, Simple Baseline", eq. 4.
    * ``'der++'``: ``L + alpha * MSE(f(x'), z') + beta * CE(f(x''), y'')`` with ``(x'', y'')`` a second,
      independent buffer minibatch -- the same paper, eq. 6.
    * ``'custom'``: ``L + custom_loss_fn(f(x'), z', y')``.

    ``z'`` are the logits the user's own forward produced when the sample was stored (captured by a
    forward hook, never recomputed). If the model's head grows between tasks, stored logits are
    narrower than today's output; DER then compares only the columns that existed at insertion, and
    rows stored at different widths are masked individually.

    **Fused replay** (``fused=True``, the default): the buffer minibatch(es) ride along in the
    forward pass the user already makes -- a forward pre-hook appends them to the batch and a forward
    hook splits the output, so the user still receives outputs for their own batch only -- and
    ``backward`` runs a single backward pass. Replay rides on the first training-mode forward with
    grad enabled after each ``backward``; eval mode and ``torch.no_grad()`` forwards are untouched.
    BatchNorm layers then see the current batch and the replayed samples together, as in the ER
    of Chaudhry et al. (their batch is the union of both). With ``fused=False`` the replay minibatches
    go through a separate forward pass and the loss terms are summed before one backward.

    Args:
        model: the model being trained (may be wrapped in DDP or ``torch.compile``).
        buffer_size: items kept in the reservoir (per rank in a distributed run).
        buffer_sample_size: items per replay minibatch.
        alpha: weight of the ER cross-entropy or the DER logit-matching term.
        beta: weight of DER++'s cross-entropy term.
        method: ``'er'``, ``'der'``, ``'der++'`` or ``'custom'``.
        custom_loss_fn: ``fn(logits, past_logits, past_targets) -> scalar`` for ``method='custom'``.
        fused: replay inside the user's forward (see above).
        logits_dtype: dtype for stored logits, e.g. ``torch.bfloat16`` to halve their memory;
            by default the output's dtype.
        buffer_scope: ``'rank'`` (default): every rank of a distributed run keeps ``buffer_size`` items of
            its own stream; ``'global'``: ``buffer_size`` is the whole run's budget, split across ranks.
        scaler: a ``torch.amp.GradScaler`` for mixed precision; pass the unscaled loss to ``backward``.

    Example:
        >>> synapse = ER(model, buffer_size=500, buffer_sample_size=32, alpha=0.3, beta=0.5)
        >>> for inputs, targets in loader:
        ...     optimizer.zero_grad()
        ...     loss = criterion(model(inputs), targets)
        ...     synapse.backward(loss, targets, inputs=inputs)
        ...     optimizer.step()
    """

    def __init__(
        self,
        model: nn.Module,
        buffer_size: int = 1024,
        buffer_sample_size: int = 32,
        alpha: float = 1.0,
        beta: float = 1.0,
        method: str = "der++",
        custom_loss_fn: Optional[CustomLossFn] = None,
        *,
        fused: bool = True,
        logits_dtype: Optional[torch.dtype] = None,
        buffer_scope: str = "rank",
        scaler: Optional[torch.amp.GradScaler] = None,
    ) -> None:
        check_non_negative("alpha", alpha)
        check_non_negative("beta", beta)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if method == "custom" and not callable(custom_loss_fn):
            raise ValueError("method='custom' needs custom_loss_fn(logits, past_logits, past_targets)")
        if custom_loss_fn is not None and method != "custom":
            raise ValueError(f"custom_loss_fn is only used with method='custom', got method={method!r}")
        if logits_dtype is not None and not (isinstance(logits_dtype, torch.dtype) and logits_dtype.is_floating_point):
            raise ValueError(f"logits_dtype must be a floating torch.dtype or None, got {logits_dtype!r}")
        super().__init__(model, buffer_size, buffer_sample_size, buffer_scope=buffer_scope, scaler=scaler)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.method = method
        self.custom_loss_fn = custom_loss_fn
        self.fused = bool(fused)
        self.logits_dtype = logits_dtype
        self._stores_logits = method != "er"
        self._stores_targets = method != "der"  # DER's loss reads inputs and logits only (paper, Alg. 1)
        self._ragged_logits = False  # becomes True once rows of different logit widths coexist
        self._num_minibatches = 2 if method == "der++" else 1
        self._signature = inspect.signature(self.module.forward)
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self._positions = {
            name: i for i, (name, p) in enumerate(self._signature.parameters.items()) if p.kind in positional
        }
        self._last_logits: Optional[Tensor] = None
        self._fields: Tuple[Any, List[str]] = (None, [])  # (what they depend on, the replayed fields)
        self._replay: Optional[_Replay] = None  # pending until backward; while set, forwards carry no replay
        self._replaying = False  # our own replay forward is running: hooks stand aside
        self._hooks = [
            self.module.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            self.module.register_forward_hook(self._post_forward),
        ]

    def remove_hooks(self) -> None:
        """Detach from the model (the object is unusable afterwards)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ------------------------------------------------------------------ forward hooks
    def _training_forward(self, module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled() and not self._replaying

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> Optional[tuple]:
        if self._replay is not None and self._replay.parameters_version != self._a_parameter._version:
            # A forward whose backward never came, and the optimizer stepped since: start afresh.
            self._replay = None
        if not (self.fused and self._replay is None and self._training_forward(module)) or len(self.buffer) == 0:
            return None
        assert self._input_names is not None
        new_args, new_kwargs = list(args), dict(kwargs)
        slots = [self._locate(name, new_args, new_kwargs) for name in self._input_names]
        container, key = slots[0]
        user_batch = container[key].shape[0]
        sample = self._sample(self._num_minibatches, self._replay_fields())
        for (container, key), name in zip(slots, self._input_names):
            container[key] = torch.cat([container[key], sample[f"input:{name}"]])
        self._replay = _Replay(
            sample, self._num_minibatches, user_batch=user_batch, parameters_version=self._a_parameter._version
        )
        return tuple(new_args), new_kwargs

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

    def _replay_fields(self) -> List[str]:
        """The buffer fields this method's replay loss reads (cached: this runs every step)."""
        key = (self._input_names, self._ragged_logits)
        if self._fields[0] != key:
            fields = [f"input:{n}" for n in self._input_names or ()]
            if self.method != "der":
                fields.append("targets")
            if self._stores_logits:
                fields.append("logits")
            if self._ragged_logits:
                fields.append("logit_width")
            self._fields = (key, fields)
        return self._fields[1]

    def _post_forward(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if not self._training_forward(module):
            return None
        replay = self._replay
        if replay is not None and replay.outputs is None:
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"fused replay needs the model to return a logits tensor, got {type(output).__name__}; "
                    "use ER(..., fused=False)"
                )
            # One split, not a slice per piece: its backward is one concatenation, where slices' would
            # each scatter into a zero tensor of the full output's size.
            output, *replay.outputs = output.split(
                [replay.user_batch, *[replay.minibatch_size] * replay.num_minibatches]
            )
        if self._stores_logits and isinstance(output, Tensor):
            self._last_logits = output.detach()
        return output if replay is not None and output is not None else None

    # ------------------------------------------------------------------ backward
    def _check(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        if self._input_names is None and self.fused:
            missing = [n for n in model_inputs if n not in self._signature.parameters]
            if missing and not any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in self._signature.parameters.values()
            ):
                raise ValueError(
                    f"model inputs {missing} are not parameters of {type(self.module).__name__}.forward"
                    f"{self._signature}; name them as forward does"
                )
        batch = targets.shape[0]
        if self._stores_logits:
            logits = self._last_logits
            if logits is None or logits.dim() != 2 or logits.shape[0] != batch:
                got = "none" if logits is None else f"shape {tuple(logits.shape)}"
                raise ValueError(
                    f"{self.method} stores the logits of the forward pass that produced this loss, but the "
                    f"last training forward of the model gave {got} for a batch of {batch}: call the model "
                    "in train mode with grad enabled on this batch before backward"
                )
            stored = self.buffer.schema().get("logits")
            if stored is not None and logits.shape[1] < stored[0][0]:
                raise ValueError(
                    f"the model now outputs {logits.shape[1]} logits but the buffer stores {stored[0][0]}: "
                    "heads may grow between tasks, not shrink"
                )
        if self._replay is not None and self._replay.user_batch != batch:
            raise ValueError(f"the last forward carried a batch of {self._replay.user_batch}, but targets has {batch}")
        super()._check(loss, targets, model_inputs)

    def _stored_items(self, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        items = super()._stored_items(targets, model_inputs)
        if not self._stores_logits:
            return items
        assert self._last_logits is not None
        stored = self.buffer.schema().get("logits")
        # Stored logits keep one dtype (e.g. if autocast is switched on or off mid-run).
        logits = self._last_logits
        dtype = stored[1] if stored else self.logits_dtype or logits.dtype
        items["logits"] = logits = logits if logits.dtype == dtype else logits.to(dtype)
        if self._ragged_logits:  # rows of different widths coexist: remember each row's own
            items["logit_width"] = torch.full(
                (logits.shape[0],), self._last_logits.shape[1], dtype=torch.int32, device=logits.device
            )
        return items

    def _backward(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        terms: Tuple[List[Tuple[float, Tensor]], List[Tuple[Tensor, Tensor]]] = ([], [])
        if len(self.buffer) > 0:
            replay = self._replay if self.fused else self._separate_replay_forward()
            if replay is not None and replay.outputs is not None:
                terms = self._replay_terms(replay)
        self._run_backward(loss, *terms)
        if self._stores_logits:
            self._widen_logits_if_needed()
        self._store(targets, model_inputs)  # the buffer stores non-finite logits as 0
        self._replay = None
        self._last_logits = None

    def _widen_logits_if_needed(self) -> None:
        stored = self.buffer.schema().get("logits")
        assert self._last_logits is not None
        if stored is not None and self._last_logits.shape[1] > stored[0][0]:
            if not self._ragged_logits:  # every row stored so far has the old width
                self.buffer.add_field("logit_width", torch.full((), stored[0][0], dtype=torch.int32))
            self.buffer.widen("logits", self._last_logits.shape[1])
            self._ragged_logits = True

    def _separate_replay_forward(self) -> _Replay:
        sample = self._sample(self._num_minibatches, self._replay_fields())
        inputs = self._inputs_of(sample)
        self._replaying = True
        try:
            outputs = self.module(**inputs)
        finally:
            self._replaying = False
        replay = _Replay(sample, self._num_minibatches)
        replay.outputs = list(outputs.split(replay.minibatch_size))
        return replay

    def _replay_terms(self, replay: _Replay) -> Tuple[List[Tuple[float, Tensor]], List[Tuple[Tensor, Tensor]]]:
        """The replay loss for :meth:`_run_backward`: ``(weight, term)`` pairs, and ``(outputs, gradient)``
        pairs for DER's logit matching, whose gradient is computed directly."""
        out, sample, part = replay.outputs, replay.sample, replay.part
        assert out is not None
        if self.method == "er":
            return [(self.alpha, F.cross_entropy(out[0], sample["targets"]))], []
        if self.method == "custom":
            assert self.custom_loss_fn is not None
            return [(1.0, self.custom_loss_fn(out[0], sample["logits"], sample["targets"]))], []
        widths = part(sample["logit_width"], 0) if self._ragged_logits else None
        seeded = [(out[0], logit_distillation_grad(out[0], part(sample["logits"], 0), widths, self.alpha))]
        if self.method == "der++":
            return [(self.beta, F.cross_entropy(out[1], part(sample["targets"], 1)))], seeded
        return [], seeded

    # ------------------------------------------------------------------ state
    def _method_state(self) -> Dict[str, Any]:
        state = super()._method_state()
        state["ragged_logits"] = self._ragged_logits
        return state

    def _load_method_state(self, state: Mapping[str, Any]) -> None:
        super()._load_method_state(state)
        self._ragged_logits = bool(state.get("ragged_logits", False))
