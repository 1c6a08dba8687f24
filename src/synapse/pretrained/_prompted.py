"""The base of the prompt methods (L2P, DualPrompt): a frozen ViT whose forwards carry learned prompts, a
head masked to the current task's classes, and the key-query pull, in one backward pass; and what the prompt
methods (CODA-Prompt too) declare and check alike."""

from __future__ import annotations

from abc import abstractmethod
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .._base import CURRENT_LOSS, Synapse, TaskBatch
from .._model import distributed_world
from .._validation import check_class_indices, check_non_empty, check_non_negative, check_positive_int
from ..catalog import HParam
from ..functional import asymmetric_cross_entropy
from ._backbone import check_same_head, find_head, freeze_backbone, refuse_ddp_wrapped
from ._prompt import Injection, PromptedViT, find_vit

__all__ = [
    "CURRENT_LOSS_HPARAM",
    "TRAIN_MASK_HPARAM",
    "PromptMethod",
    "average_over_ranks",
    "check_bool",
    "check_pool",
    "declare_parameter",
    "uniform_parameter",
]

# The loss options of the prompt methods' catalog entries (CODA-Prompt's train mask is always on: it has the
# second only).
TRAIN_MASK_HPARAM = HParam("train_mask", bool, True, "mask the logits of classes outside the current task")
CURRENT_LOSS_HPARAM = HParam(
    "current_loss",
    str,
    "method",
    "'method': the masked cross-entropy replaces the loss passed to backward; 'user': keep it",
    choices=CURRENT_LOSS,
)


def check_bool(name: str, value: object) -> None:
    """Raise ``TypeError`` unless ``value`` is a bool (an int would pass for one in ``if`` tests)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_pool(pool_size: int, prompt_length: int, top_k: int) -> None:
    """Check a pool of ``pool_size`` prompts of ``prompt_length`` tokens, ``top_k`` of them chosen per sample."""
    check_positive_int("pool_size", pool_size)
    check_positive_int("prompt_length", prompt_length)
    check_positive_int("top_k", top_k)
    if top_k > pool_size:
        raise ValueError(f"top_k must be at most pool_size={pool_size}, got {top_k}")


def uniform_parameter(*shape: int, device: torch.device) -> nn.Parameter:
    """A parameter drawn from ``U(-1, 1)``, the authors' ``'uniform'`` initialiser of prompts and keys."""
    return nn.Parameter(torch.empty(*shape, device=device).uniform_(-1.0, 1.0))


def average_over_ranks(parameters: Iterable[nn.Parameter]) -> None:
    """Under DDP, average the gradients of ``parameters`` (a method's prompts: not the wrapped model's, so DDP
    does not see them) over the ranks, as DDP does the model's (an asynchronous collective, no host sync)."""
    world = distributed_world()
    if world > 1:
        for p in parameters:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(world)


def declare_parameter(owner: Synapse, name: str, shape: Tuple[int, ...], dtype: torch.dtype = torch.float32) -> None:
    """Declare ``owner``'s parameter ``name`` as state; a load copies into it, so an optimizer keeps holding it."""

    def load(value: Tensor) -> None:
        with torch.no_grad():
            getattr(owner, name).copy_(value)

    owner.add_state(name, dtype=dtype, shape=shape, get=lambda: getattr(owner, name).detach(), set=load)


class PromptMethod(Synapse):
    """A method that learns prompts for a frozen pretrained ViT (see :mod:`synapse.pretrained._prompt`).

    Building it freezes every parameter of the model outside its head (``model.get_classifier()``) and hooks
    the model: each forward first runs the frozen, un-prompted model without grad to get the query
    features, asks the method (:meth:`_inject`) which prompts to inject, and runs with them. A training
    forward (train mode, grad enabled) also keeps the key-query pull of its selection.

    ``backward`` then takes, with ``current_loss='method'``, the cross-entropy of the outputs of that forward
    with the logits of classes outside the current task masked out (``train_mask``; the task's classes are
    those of its batches so far), in place of the loss it was given, minus ``pull_constraint`` times the
    pull; with ``'user'``, the loss it was given minus the same pull term. One backward pass.

    What trains (:meth:`trainable_parameters`): the method's prompts and keys, and the model's head. Give
    those to the optimizer. Under ``DistributedDataParallel`` the gradients of the prompts and keys (which
    are not the model's, so DDP does not see them) are averaged over the ranks in ``backward``.
    """

    requires_vit = True

    def __init__(
        self,
        model: nn.Module,
        *,
        pull_constraint: float,
        train_mask: bool,
        current_loss: str,
        prefix_blocks: Sequence[int] = (),
        prompt_tokens: bool = False,
        pool_prompts: bool = False,
        scaler: Optional[torch.amp.GradScaler] = None,
    ) -> None:
        check_non_negative("pull_constraint", pull_constraint)
        check_bool("train_mask", train_mask)
        current_loss = self._check_current_loss(current_loss)
        refuse_ddp_wrapped(model, type(self).__name__)
        super().__init__(model, scaler=scaler)
        self.head = find_head(self.module)
        self.num_classes, self.feature_dim = self.head.out_features, self.head.in_features
        self.vit = find_vit(self.module)
        self.prompts = PromptedViT(
            self.vit,
            self._provide,
            prefix_blocks=prefix_blocks,
            prompt_tokens=prompt_tokens,
            pool_prompts=pool_prompts,
        )  # validates the model: the first change to it
        freeze_backbone(self.module, self.head)
        self.embed_dim = self.prompts.embed_dim
        self.pull_constraint = float(pull_constraint)
        self.train_mask = train_mask
        if train_mask:  # the mask is the current task's classes, which end_task resets: without it the loss
            self.acts_at_task_end = True  # spans every class seen, another method (and it warns)
        self.current_loss = current_loss
        self._forward = self._capture_forward()
        self._reads_outputs = current_loss == "method"
        self.last_selection: Optional[Tensor] = None  # (batch, top_k) prompt indices of the latest forward
        self._pull: Optional[Tensor] = None  # the key-query pull of the latest training forward
        self._task_classes = torch.zeros(self.num_classes, dtype=torch.bool, device=self.device)
        self.add_state("task_classes", dtype=torch.bool, shape=(self.num_classes,), attr="_task_classes")

    # ------------------------------------------------------------------ what subclasses write
    @abstractmethod
    def _inject(self, query: Tensor, training: bool) -> Tuple[Injection, Tensor, Tensor]:
        """The prompts for a batch whose query features are ``query`` (``(batch, feature_dim)``, no grad):
        the injection, the prompt indices selected ``(batch, top_k)`` and the key-query pull (a scalar)."""

    @abstractmethod
    def _own_parameters(self) -> List[nn.Parameter]:
        """The prompts and keys (the parameters the method keeps outside the model)."""

    # ------------------------------------------------------------------ public
    def trainable_parameters(self) -> List[nn.Parameter]:
        """The prompts and keys, then the model's head: what the optimizer should get."""
        return [*self._own_parameters(), *self.head.parameters()]

    def remove_hooks(self) -> None:
        super().remove_hooks()
        self.prompts.remove()

    # ------------------------------------------------------------------ the forward
    def _provide(self, query: Tensor, training: bool) -> Injection:
        injection, selection, pull = self._inject(query.float(), training)
        self.last_selection = selection
        if training:
            self._pull = pull
        return injection

    # ------------------------------------------------------------------ backward
    def _check(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        name = type(self).__name__
        if self._first_step_of_task:
            check_same_head(self.module, self.head, name)
        pull = self._pull
        if pull is None or self.prompts.last_query is None:
            raise ValueError(
                f"{name}.backward found no training forward of the model since the last backward: call "
                "backward with the loss of a forward you just ran in train mode (outputs = model(x))"
            )
        if self.prompts.last_query.shape[0] != targets.shape[0]:
            raise ValueError(
                f"the last forward saw a batch of {self.prompts.last_query.shape[0]}, but targets has batch size "
                f"{targets.shape[0]}: pass the loss and targets of the forward you just ran"
            )
        if self.current_loss == "method":
            logits = self._forward.checked_outputs(name, targets.shape[0])
            if logits.shape[1] != self.num_classes:
                check_same_head(self.module, self.head, name)  # the likelier cause, named
                raise ValueError(f"{name} reads (batch, {self.num_classes}) logits, got {tuple(logits.shape)}")
        check_non_empty(name, targets)
        check_class_indices(targets, self.num_classes, first_step=self.num_steps == 0)

    def current_term(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The cross-entropy the method puts on the current batch: over the current task's classes (those
        of its batches so far, this one's included) with ``train_mask``, else over all."""
        if not self.train_mask:
            return F.cross_entropy(logits, targets)
        allowed = self._task_classes.to(logits.device).index_fill(0, targets, True)
        return asymmetric_cross_entropy(logits, targets, allowed)

    def _backward(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        pull = self._pull
        assert pull is not None  # checked by _check
        targets = targets.to(self.device).long()
        root = loss
        if self.current_loss == "method":
            logits = self._forward.outputs
            assert logits is not None  # checked by _check
            root = self.current_term(logits, targets)  # the user's loss is replaced: its graph is never walked
        terms = [(-self.pull_constraint, pull)] if self.pull_constraint else []
        self._run_backward(root, terms)
        average_over_ranks(self._own_parameters())
        self._task_classes = self._task_classes.to(self.device).index_fill_(0, targets, True)
        self._pull = None
        self._forward.clear()

    def _end_task(self, data: Optional[Iterable[TaskBatch]]) -> None:
        self._task_classes = torch.zeros_like(self._task_classes)  # a new task has no classes yet

    # ------------------------------------------------------------------ state
    def _add_parameter_state(self, name: str, shape: Tuple[int, ...]) -> None:
        """Declare the parameter ``name``; a load copies into it, so the optimizer keeps holding it."""
        declare_parameter(self, name, shape)
