"""The base of the closed-form methods: a frozen backbone whose features, read from the user's own training
forward, feed statistics that the method accumulates without a backward pass."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._base import Synapse
from .._floor import Floor
from .._model import distributed_world
from .._validation import check_class_indices, check_non_empty
from ._backbone import FeatureTap, check_same_head, find_head, float_features, freeze_backbone

__all__ = ["FrozenFeatureMethod", "FrozenFeatureFloor"]


class FrozenFeatureMethod(Synapse):
    """A method that classifies the frozen backbone's features in closed form.

    Building it freezes every parameter of the model outside its head (the model's classifier, found by
    :func:`~synapse.pretrained._backbone.find_head`) and taps the head's input. Each ``backward`` reads the
    features of the forward that produced the loss and passes them to :meth:`_accumulate`; it runs no
    backward pass, and leaves every ``.grad`` as it was: **the user's loss is not used** (it only has to
    come from that forward). Nothing trains, so :meth:`trainable_parameters` is empty and the optimizer can
    be left out. :meth:`predict` scores the features by the method's own rule (:meth:`_scores`).

    The model should run in ``eval()`` mode during training too (:attr:`trains_model` is False): in train
    mode BatchNorm layers normalise each batch by its own statistics and move their running statistics, so
    that the features accumulated drift from those :meth:`predict` reads. ``backward`` warns once when it
    finds a BatchNorm layer in train mode.

    Under ``DistributedDataParallel`` each rank adds its own stream between task ends; :meth:`end_task`
    (on every rank) sums the statistics over the ranks, so that every rank then classifies with all ranks'
    data. Each rank keeps the sums divided by the world size, so that the next task end's sum counts them
    once (the ratios a classifier reads are unchanged by the division).
    """

    has_predictor = True
    trains_model = False

    def __init__(self, model: nn.Module, *, scaler: Optional[torch.amp.GradScaler] = None) -> None:
        super().__init__(model, scaler=scaler)
        self.head = find_head(self.module)
        self.num_classes, self.feature_dim = self.head.out_features, self.head.in_features
        freeze_backbone(self.module, self.head)  # validated above: the first change to the model
        self._tap = FeatureTap(self.head)
        self._batch_norms = [m for m in self.module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]

    def trainable_parameters(self) -> List[nn.Parameter]:
        """Nothing trains: an empty list (no optimizer is needed)."""
        return []

    def remove_hooks(self) -> None:
        super().remove_hooks()
        self._tap.remove()

    def _check(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        features = self._tap.features
        if self._first_step_of_task or features is None:  # a replaced head also leaves the tap unfed
            check_same_head(self.module, self.head, type(self).__name__)
        if features is None:
            raise ValueError(
                f"{type(self).__name__}.backward found no forward of the model since the last backward: call "
                "backward with the loss of a forward you just ran (outputs = model(x))"
            )
        if features.shape[0] != targets.shape[0]:
            raise ValueError(
                f"the last forward saw a batch of {features.shape[0]}, but targets has batch size "
                f"{targets.shape[0]}: pass the loss and targets of the forward you just ran"
            )
        check_non_empty(type(self).__name__, targets)
        check_class_indices(targets, self.num_classes, first_step=self.num_steps == 0)
        self._warn_if_batch_norm_trains()

    def _warn_if_batch_norm_trains(self) -> None:
        """Warn once when a BatchNorm layer ran the step's forward in train mode (a flag read: no sync)."""
        if not any(m.training for m in self._batch_norms):
            return
        self._warn_once(
            "batch_norm_trains",
            f"{type(self).__name__} trains nothing, but the model's BatchNorm layers are in train mode: they "
            "normalise each batch by its own statistics and move their running statistics, so the features the "
            "method accumulates drift from those predict() reads (eval mode). Call model.eval() before the "
            "training steps (in place of model.train()).",
        )

    def _backward(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        features = self._tap.take()
        assert features is not None  # checked by _check
        self._accumulate(float_features(features), targets.to(features.device))

    @torch.no_grad()
    def predict(self, **model_inputs: Tensor) -> Tensor:
        """The method's class scores ``(batch, classes)`` for the model's features (in eval mode); ``-inf``
        for classes never seen. Take ``.argmax(1)``."""
        self._check_predict_inputs(model_inputs)
        was_training = self.module.training
        self.module.eval()
        try:
            self.model(**model_inputs)
        finally:
            self.module.train(was_training)
        features = self._tap.take()
        if features is None:
            raise RuntimeError("the model's forward did not reach its head: predict cannot read its features")
        return self._scores(float_features(features))

    @staticmethod
    def _sum_over_ranks(tensors: Sequence[Tensor]) -> int:
        """Sum ``tensors`` over the ranks, in place (each then holds the global sums); return the world size.
        Divide them by it afterwards (:meth:`_share_over_ranks`) so that the next sum counts them once."""
        world = distributed_world()
        if world > 1:
            for tensor in tensors:
                dist.all_reduce(tensor)
        return world

    @staticmethod
    def _share_over_ranks(tensors: Sequence[Tensor], world: int) -> None:
        if world > 1:
            for tensor in tensors:
                tensor.div_(world)

    @abstractmethod
    def _accumulate(self, features: Tensor, targets: Tensor) -> None:
        """Add one batch's ``(batch, feature_dim)`` float32 features to the method's statistics."""

    @abstractmethod
    def _scores(self, features: Tensor) -> Tensor:
        """Class scores ``(batch, num_classes)`` of float32 features."""


class FrozenFeatureFloor(Floor):
    """The floor of a closed-form method on frozen features (``benchmarks/step_overhead.py``): the user's
    forward, whose features a plain pre-hook keeps, then the method's statistics (:meth:`update`); no
    backward pass."""

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__(model, *args, **kwargs)
        head = find_head(model)
        self.features = torch.zeros(0)
        self.classes, self.dim = head.out_features, head.in_features
        head.register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, args: Any) -> None:
        self.features = args[0].detach()

    def backward(self, loss: Tensor, targets: Tensor, inputs: Tensor, logits: Tensor) -> None:
        self.update(self.features.reshape(self.features.shape[0], -1).float(), targets)

    @abstractmethod
    def update(self, features: Tensor, targets: Tensor) -> None:
        """Add one batch's features to the floor's statistics (the method's irreducible work)."""
