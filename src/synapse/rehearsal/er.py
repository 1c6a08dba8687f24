"""Experience Replay, Dark Experience Replay (DER) and DER++ from a reservoir buffer."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._base import BufferedSynapse
from .._capture import Replay
from .._floor import Floor
from .._state import StateError
from .._validation import check_non_negative
from ..augment import Transform
from ..catalog import HParam, MethodSpec, register
from ..functional import logit_distillation_grad

__all__ = ["ER", "DER", "DERpp", "CustomER"]

METHODS = ("er", "der", "der++", "custom")

CustomLossFn = Callable[[Tensor, Tensor, Tensor], Tensor]
# (weight, term) pairs, and (outputs, gradient) pairs seeded into the backward (DER's logit matching)
ReplayTerms = Tuple[List[Tuple[float, Tensor]], List[Tuple[Tensor, Tensor]]]


class ER(BufferedSynapse):
    """Experience Replay and Dark Experience Replay from a reservoir buffer.

    ``ER(model, method=...)`` is the entry for four variants, each its own class (:class:`DER`,
    :class:`DERpp`, :class:`CustomER`; ``method`` reports it). With ``L`` the user's loss, ``f`` the model
    and ``(x', y', z')`` memory items with the logits stored with them:

    * ``'er'``: ``L + alpha * CE(f(x'), y')``, Chaudhry et al. 2019, "On Tiny Episodic Memories in
      Continual Learning";
    * ``'der'``: ``L + alpha * MSE(f(x'), z')``, Buzzega et al. 2020, "Dark Experience for General
      Continual Learning: a Strong, Simple Baseline", eq. 4;
    * ``'der++'`` (default): DER plus ``beta * CE(f(x''), y'')`` on a second minibatch, eq. 6;
    * ``'custom'``: ``L + custom_loss_fn(f(x'), z', y')``.

    ``z'`` are the outputs of the user's own forward when the item was stored. By default the replayed
    minibatches ride in that forward (*fused replay*: the user still gets outputs for their own batch
    only) and ``backward`` runs one backward pass; a loss from an eval-mode forward is then refused once
    the memory holds anything (use ``fused=False`` to train with frozen BatchNorm statistics). The
    equations, fused replay, growing heads, the memory policies and augmentation:
    docs/methods/rehearsal.md, "ER, DER and DER++ in detail".

    Deviations (each explained in the method page):

    * ER sums ``L`` and the replay term by default; ``joint_mean=True`` is the paper's one mean.
    * With ``fused=True`` BatchNorm sees the batch and the replayed items together.

    Args:
        model: the model being trained (may be wrapped in DDP or ``torch.compile``).
        buffer_size: items kept in the reservoir (per rank in a distributed run).
        buffer_sample_size: items per replay minibatch.
        alpha: weight of the ER cross-entropy or the DER logit-matching term.
        beta: weight of DER++'s cross-entropy term.
        method: ``'er'``, ``'der'``, ``'der++'`` or ``'custom'``: the variant, and with it the class built.
        custom_loss_fn: ``fn(logits, past_logits, past_targets) -> scalar`` for ``method='custom'``.
        joint_mean: ``method='er'`` only: one mean over the batch and the replay minibatch; ``L`` must
            then be the batch's *mean* cross-entropy, and ``alpha`` stays 1.
        fused: replay inside the user's forward (see the method page).
        logits_dtype: dtype for stored logits, e.g. ``torch.bfloat16`` to halve their memory;
            by default the output's dtype.
        buffer_scope: ``'rank'`` (default): every rank of a distributed run keeps ``buffer_size`` items of
            its own stream; ``'global'``: ``buffer_size`` is the whole run's budget, split across ranks.
        scaler: a ``torch.amp.GradScaler`` for mixed precision; pass the unscaled loss to ``backward``.
        buffer_policy: what the memory keeps: ``'reservoir'`` (default), a uniform sample of the stream, or
            ``'class_balanced'``, GDumb's greedy class balancer (:class:`synapse.memory.ClassBalancedBuffer`).
        replay_transform: augment every replayed minibatch on the device before its forward, e.g.
            :class:`synapse.augment.RandomCropFlip` (default None: replay what was stored; see the method
            page).

    Example:
        >>> synapse = ER(model, buffer_size=500, buffer_sample_size=32, alpha=0.3, beta=0.5)  # a DERpp
        >>> for inputs, targets in loader:
        ...     optimizer.zero_grad()
        ...     loss = criterion(model(inputs), targets)
        ...     synapse.backward(loss, targets, inputs=inputs)
        ...     optimizer.step()
    """

    method: str = "er"  # the variant (a method built on ER names itself)
    _stores_logits = False  # the memory keeps the logits of the user's forward (DER)
    _replays_targets = True  # the replay loss reads the stored labels
    _num_minibatches = 1  # independent buffer minibatches per step

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
        replay_transform: Optional[Transform] = None,
        joint_mean: bool = False,
        buffer_policy: str = "reservoir",
    ) -> None:
        check_non_negative("alpha", alpha)
        if not isinstance(joint_mean, bool):
            raise TypeError(f"joint_mean must be a bool, got {joint_mean!r}")
        if joint_mean and (method != "er" or alpha != 1.0):
            raise ValueError(
                f"joint_mean=True is ER's mean over the union of both batches: it needs method='er' and "
                f"alpha=1.0, got method={method!r}, alpha={alpha!r}"
            )
        check_non_negative("beta", beta)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if method == "custom" and not callable(custom_loss_fn):
            raise ValueError("method='custom' needs custom_loss_fn(logits, past_logits, past_targets)")
        if custom_loss_fn is not None and method != "custom":
            raise ValueError(f"custom_loss_fn is only used with method='custom', got method={method!r}")
        if logits_dtype is not None and not (isinstance(logits_dtype, torch.dtype) and logits_dtype.is_floating_point):
            raise ValueError(f"logits_dtype must be a floating torch.dtype or None, got {logits_dtype!r}")
        variant = _VARIANTS[method]
        if type(self) is ER:
            # The seed's ER(method=...) stays the public entry: it becomes the variant's class before any
            # state is built. (A __new__ would hide this signature from inspect, which the catalog reads.)
            self.__class__ = variant
        elif not isinstance(self, variant):
            own = [cls for cls in _VARIANTS.values() if isinstance(self, cls)][-1]  # parents come first
            is_ = "is" if own is type(self) else f"builds on {own.__name__},"
            raise ValueError(
                f"{type(self).__name__} {is_} ER's method={own.method!r} variant, but got "
                f"method={method!r}: build ER(model, ..., method={method!r}), or derive from {variant.__name__}"
            )
        super().__init__(
            model,
            buffer_size,
            buffer_sample_size,
            buffer_scope=buffer_scope,
            buffer_policy=buffer_policy,
            scaler=scaler,
            replay_transform=replay_transform,
        )
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.custom_loss_fn = custom_loss_fn
        self.fused = bool(fused)
        self.logits_dtype = logits_dtype
        self.joint_mean = bool(joint_mean)
        self._reads_outputs = self._stores_logits  # DER stores the outputs of your forward
        # DER's loss reads inputs and logits only (paper, Alg. 1); a class-balanced memory needs the labels.
        self._stores_targets = self._replays_targets or buffer_policy == "class_balanced"
        self._ragged_logits = False  # becomes True once rows of different logit widths coexist
        self.add_value("ragged_logits", bool, attr="_ragged_logits")
        self._fields: Tuple[Any, List[str]] = (None, [])  # (what they depend on, the replayed fields)
        # The user's forward: DER stores its outputs; fused replay rides along in it.
        self._forward = self._capture_forward(self._fused_replay if self.fused else None)

    def _fused_replay(self) -> Optional[Replay]:
        """The replay rows for the user's next training forward (called by the capture's pre-hook)."""
        if len(self.buffer) == 0:
            return None
        return Replay(self._sample(self._num_minibatches, self._replay_fields()), self._num_minibatches)

    def _replay_fields(self) -> List[str]:
        """The buffer fields this method's replay loss reads (cached: this runs every step)."""
        key = (self._input_names, self._ragged_logits)
        if self._fields[0] != key:
            fields = [f"input:{n}" for n in self._input_names or ()]
            if self._replays_targets:
                fields.append("targets")
            if self._stores_logits:
                fields.append("logits")
            if self._ragged_logits:
                fields.append("logit_width")
            self._fields = (key, fields)
        return self._fields[1]

    # ------------------------------------------------------------------ backward
    def _check(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        if self.fused and self._forward.replay is None and self._forward.eval_forward and len(self.buffer) > 0:
            raise ValueError(
                f"{type(self).__name__}'s fused replay rides on training-mode forwards, but this loss came from a "
                "forward in eval mode, which carried no replay: this step would be plain fine-tuning. Call "
                "model.train() before the forward, or, to train with frozen BatchNorm statistics, build the "
                "method with fused=False: replay then runs in a separate forward in the model's current mode"
            )
        batch = targets.shape[0]
        if self._stores_logits:
            logits = self._forward.checked_outputs(self.method, batch)
            stored = self.buffer.schema().get("logits")
            if stored is not None and logits.shape[1] < stored[0][0]:
                raise ValueError(
                    f"the model now outputs {logits.shape[1]} logits but the buffer stores {stored[0][0]}: "
                    "heads may grow between tasks, not shrink"
                )
        replay = self._forward.replay
        if replay is not None and replay.user_batch != batch:
            raise ValueError(f"the last forward carried a batch of {replay.user_batch}, but targets has {batch}")
        super()._check(loss, targets, model_inputs)

    def _stored_items(self, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        items = super()._stored_items(targets, model_inputs)
        if not self._stores_logits:
            return items
        logits = self._stored_logits()
        stored = self.buffer.schema().get("logits")
        # Stored logits keep one dtype (e.g. if autocast is switched on or off mid-run).
        dtype = stored[1] if stored else self.logits_dtype or logits.dtype
        items["logits"] = logits = logits if logits.dtype == dtype else logits.to(dtype)
        if self._ragged_logits:  # rows of different widths coexist: remember each row's own
            items["logit_width"] = torch.full(
                (logits.shape[0],), self._stored_logits().shape[1], dtype=torch.int32, device=logits.device
            )
        return items

    def _backward(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        terms: ReplayTerms = ([], [])
        loss_weight = 1.0
        if len(self.buffer) > 0:
            replay = self._forward.replay if self.fused else self._separate_replay_forward()
            if replay is not None and replay.outputs is not None:
                terms = self._replay_terms(replay)
                if self.joint_mean:  # (B L + k CE') / (B + k): weights known on the host
                    batch, k = targets.shape[0], replay.minibatch_size
                    loss_weight, terms = batch / (batch + k), ([(k / (batch + k), terms[0][0][1])], [])
        self._run_backward(self._current_term(loss, targets), *terms, loss_weight=loss_weight)
        if self._stores_logits:
            self._widen_logits_if_needed()
        self._store(targets, model_inputs)  # the buffer stores non-finite logits as 0
        self._commit_step()
        self._forward.clear()

    def _current_term(self, loss: Tensor, targets: Tensor) -> Tensor:
        """The current batch's root of the backward: the user's loss, unless a subclass owns the term
        (ER-ACE). Called before anything is mutated; state it changes waits for :meth:`_commit_step`."""
        return loss

    def _commit_step(self) -> None:
        """Apply state a subclass computed for this step, once the step has succeeded."""

    def _stored_logits(self) -> Tensor:
        """The logits this step stores: the user's forward's outputs, detached."""
        assert self._forward.outputs is not None  # checked by _check
        return self._forward.outputs.detach()

    def _widen_logits_if_needed(self) -> None:
        stored = self.buffer.schema().get("logits")
        width = self._stored_logits().shape[1]
        if stored is not None and width > stored[0][0]:
            if not self._ragged_logits:  # every row stored so far has the old width
                self.buffer.add_field("logit_width", torch.full((), stored[0][0], dtype=torch.int32))
            self.buffer.widen("logits", width)
            self._ragged_logits = True

    def _separate_replay_forward(self) -> Replay:
        sample = self._sample(self._num_minibatches, self._replay_fields())
        with self._forward.paused():
            outputs = self.module(**self._inputs_of(sample))
        replay = Replay(sample, self._num_minibatches)
        replay.outputs = list(outputs.split(replay.minibatch_size))
        return replay

    def _replay_terms(self, replay: Replay) -> ReplayTerms:
        """The replay loss for :meth:`_run_backward`: ``(weight, term)`` pairs, and ``(outputs, gradient)``
        pairs for DER's logit matching, whose gradient is computed directly. ER's: ``alpha CE(f(x'), y')``."""
        assert replay.outputs is not None
        return [(self.alpha, F.cross_entropy(replay.outputs[0], replay.sample["targets"]))], []

    # ------------------------------------------------------------------ state
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # Before the variants were classes, all four saved themselves as "ER": such a state loads into the
        # variant whose memory holds its fields (checked by _check_stored_fields), and only there.
        if isinstance(state, Mapping) and state.get("method") == "ER" and type(self) in _VARIANTS.values():
            state = {**state, "method": type(self).__name__}
        super().load_state_dict(state)

    def _check_stored_fields(self, state: Mapping[str, Any], path: str) -> None:
        super()._check_stored_fields(state, path)
        buffer = state.get("buffer")
        storage = buffer.get("storage") if isinstance(buffer, Mapping) else None
        if not isinstance(storage, Mapping) or not storage:
            return
        for field, stored in (("logits", self._stores_logits), ("targets", self._stores_targets)):
            if (field in storage) != stored:
                raise StateError(
                    f"{path}['buffer']['storage'] {'lacks' if stored else 'has'} the field {field!r}: it was "
                    f"written by another variant of ER than this one (method={self.method!r})"
                )


class DER(ER):
    """Dark Experience Replay: ``L + alpha * MSE(f(x'), z')`` (Buzzega et al. 2020, eq. 4). Build it with
    ``ER(model, ..., method='der')``; see :class:`ER`."""

    method = "der"
    _stores_logits = True
    _replays_targets = False
    reads_logits = True  # the logit-matching MSE: log-probabilities change its strength

    def _replay_terms(self, replay: Replay) -> ReplayTerms:
        """DER's logit matching on the first minibatch, its gradient seeded into the replayed outputs."""
        out, sample, part = replay.outputs, replay.sample, replay.part
        assert out is not None
        widths = part(sample["logit_width"], 0) if self._ragged_logits else None
        return [], [(out[0], logit_distillation_grad(out[0], part(sample["logits"], 0), widths, self.alpha))]


class DERpp(DER):
    """DER++: DER plus ``beta * CE(f(x''), y'')`` on a second, independent minibatch (Buzzega et al. 2020,
    eq. 6). Build it with ``ER(model, ..., method='der++')``, the default; see :class:`ER`."""

    method = "der++"
    _replays_targets = True
    _num_minibatches = 2

    def _replay_terms(self, replay: Replay) -> ReplayTerms:
        terms, seeded = super()._replay_terms(replay)
        assert replay.outputs is not None
        ce = F.cross_entropy(replay.outputs[1], replay.part(replay.sample["targets"], 1))
        return [*terms, (self.beta, ce)], seeded


class CustomER(ER):
    """ER with the user's replay loss: ``L + custom_loss_fn(f(x'), z', y')``. Build it with
    ``ER(model, ..., method='custom', custom_loss_fn=fn)``; see :class:`ER`."""

    method = "custom"
    _stores_logits = True

    def _replay_terms(self, replay: Replay) -> ReplayTerms:
        out, sample = replay.outputs, replay.sample
        assert out is not None and self.custom_loss_fn is not None
        return [(1.0, self.custom_loss_fn(out[0], sample["logits"], sample["targets"]))], []


_VARIANTS: Dict[str, Type[ER]] = {cls.method: cls for cls in (ER, DER, DERpp, CustomER)}


_ER_PAPER = "Chaudhry et al. 2019, *On Tiny Episodic Memories in Continual Learning*"
_DER_PAPER = "Buzzega et al. 2020, *Dark Experience for General Continual Learning: a Strong, Simple Baseline*"
_BUFFER_POLICY = HParam(
    "buffer_policy",
    str,
    "reservoir",
    "what the memory keeps: a uniform sample of the stream, or an equal share per class (GDumb)",
    choices=("reservoir", "class_balanced"),
)


class _ERFloor(Floor):
    """ER's floor: the replay minibatch rides in the user's forward; one backward of ``loss + alpha CE``."""

    fused = 1

    def backward(self, loss: Tensor, targets: Tensor, inputs: Tensor, logits: Tensor) -> None:
        term = F.cross_entropy(self.replayed[0], self.y.index_select(0, self.idx))
        self.run_backward((loss, term), (self.one, self.weight("alpha")))


class _DERFloor(Floor):
    """DER's floor: the replayed rows' logit-matching gradient seeded into them, in the user's backward."""

    fused = 1

    def backward(self, loss: Tensor, targets: Tensor, inputs: Tensor, logits: Tensor) -> None:
        seed = logit_distillation_grad(self.replayed[0], self.z.index_select(0, self.idx), weight=self.hp["alpha"])
        self.run_backward((loss, self.replayed[0]), (self.one, seed))


class _DERppFloor(Floor):
    """DER++'s floor: DER's seeded logit matching on one minibatch, ``beta CE`` on a second, one backward."""

    fused = 2

    def backward(self, loss: Tensor, targets: Tensor, inputs: Tensor, logits: Tensor) -> None:
        first, second = self.idx.split(self.k)
        ce = F.cross_entropy(self.replayed[1], self.y.index_select(0, second))
        seed = logit_distillation_grad(self.replayed[0], self.z.index_select(0, first), weight=self.hp["alpha"])
        self.run_backward((loss, ce, self.replayed[0]), (self.one, self.weight("beta"), seed))


register(
    MethodSpec(
        "er",
        ER,
        family="rehearsal",
        order=8,
        floor=_ERFloor,
        paper=_ER_PAPER,
        summary="Experience Replay: cross-entropy on a reservoir minibatch",
        fixed={"method": "er"},
        hparams=(
            HParam("alpha", float, 1.0, "weight of the replay cross-entropy", low=0.0),
            HParam("joint_mean", bool, False, "one mean over the batch and the replay minibatch (alpha must be 1)"),
            _BUFFER_POLICY,
        ),
    )
)
register(
    MethodSpec(
        "der",
        ER,
        family="rehearsal",
        display="DER",
        order=10,
        floor=_DERFloor,
        paper=_DER_PAPER,
        summary="Dark Experience Replay: match the logits stored with each sample",
        fixed={"method": "der"},
        hparams=(
            HParam("alpha", float, 0.3, "weight of the logit-matching MSE", low=0.0),
            _BUFFER_POLICY,
        ),
    )
)
register(
    MethodSpec(
        "der++",
        ER,
        family="rehearsal",
        display="DER++",
        order=11,
        floor=_DERppFloor,
        paper=_DER_PAPER,
        summary="DER plus cross-entropy on a second, independent minibatch",
        fixed={"method": "der++"},
        hparams=(
            HParam("alpha", float, 0.3, "weight of the logit-matching MSE", low=0.0),
            HParam("beta", float, 0.5, "weight of the replay cross-entropy", low=0.0),
            _BUFFER_POLICY,
        ),
    )
)
