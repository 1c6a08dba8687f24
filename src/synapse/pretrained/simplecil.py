"""SimpleCIL: a prototype classifier on a frozen pretrained backbone."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._base import TaskBatch
from ..catalog import MethodSpec, register
from ._frozen import FrozenFeatureFloor, FrozenFeatureMethod
from ._ridge import class_means

__all__ = ["SimpleCIL"]


class SimpleCIL(FrozenFeatureMethod):
    """SimpleCIL (Zhou et al. 2023, "Revisiting Class-Incremental Learning with Pre-Trained Models:
    Generalizability and Adaptivity are All You Need", IJCV 2024; code: ``zhoudw-zdw/RevisitingCIL``).

    The backbone is frozen and nothing trains: each class is the mean of its samples' features (the input
    of the model's head), streamed as per-class sums and counts on the device, and a sample is scored by
    the cosine similarity of its features to each class mean. ``backward`` reads the features of the
    forward that produced the loss and runs no backward pass; ``end_task`` is needed only in a distributed
    run (it sums the ranks' statistics). The equations and the streaming: docs/methods/pretrained.md,
    "SimpleCIL in detail".

    Deviations from the authors' code (each explained in the method page):

    * The prototypes come from the user's training forwards, not a task-end pass without augmentation.
    * The scores are the cosine similarities, unscaled (no prediction changes).
    * The paper's first-session adaptation (its ADAM variant, Aper) is not here.

    Args:
        model: the pretrained model; its head must be an ``nn.Linear`` with one output per class. Every
            parameter outside the head is frozen.
        scaler: unused (nothing is scaled: no backward pass runs); accepted for the common signature.

    Example:
        >>> import timm
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8,
        ...                           depth=2, embed_dim=32, num_heads=2, num_classes=10)
        >>> simplecil = SimpleCIL(model)
        >>> x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
        >>> simplecil.backward(torch.nn.functional.cross_entropy(model(x), y), y, x=x)
        >>> simplecil.predict(x=x).shape
        torch.Size([8, 10])
    """

    def __init__(self, model: nn.Module, *, scaler: Optional[torch.amp.GradScaler] = None) -> None:
        super().__init__(model, scaler=scaler)
        device = self.device
        self.class_sums = torch.zeros(self.num_classes, self.feature_dim, device=device)
        self.class_counts = torch.zeros(self.num_classes, device=device)
        self.add_state("class_sums", dtype=torch.float32, shape=(self.num_classes, self.feature_dim))
        self.add_state("class_counts", dtype=torch.float32, shape=(self.num_classes,))

    @property
    def prototypes(self) -> Tensor:
        """``(num_classes, feature_dim)`` class means; zero rows for classes never seen."""
        return class_means(self.class_sums, self.class_counts)

    def _accumulate(self, features: Tensor, targets: Tensor) -> None:
        self._follow_device()
        self.class_sums.index_add_(0, targets, features)
        self.class_counts.index_add_(0, targets, self._constant(1.0, features[:, 0]))

    def _scores(self, features: Tensor) -> Tensor:
        self._follow_device()
        cosine = F.normalize(features, dim=1) @ F.normalize(self.prototypes, dim=1).T
        return cosine.masked_fill(self.class_counts == 0, float("-inf"))

    def _follow_device(self) -> None:
        if self.class_sums.device != self.device:
            self.class_sums, self.class_counts = self.class_sums.to(self.device), self.class_counts.to(self.device)

    def _end_task(self, data: Optional[Iterable[TaskBatch]]) -> None:
        # The prototypes are current after every step; under DDP the ranks' statistics are combined here.
        self._follow_device()
        statistics = [self.class_sums, self.class_counts]
        self._share_over_ranks(statistics, self._sum_over_ranks(statistics))


class SimpleCILFloor(FrozenFeatureFloor):
    """Per-class feature sums and counts."""

    def update(self, features: Tensor, targets: Tensor) -> None:
        if not hasattr(self, "sums"):
            self.sums = features.new_zeros(self.classes, self.dim)
            self.counts = features.new_zeros(self.classes)
            self.ones = features.new_ones(features.shape[0])
        self.sums.index_add_(0, targets, features)
        self.counts.index_add_(0, targets, self.ones)


register(
    MethodSpec(
        "simplecil",
        SimpleCIL,
        family="pretrained",
        paper="Zhou et al. 2023, Revisiting Class-Incremental Learning with Pre-Trained Models (IJCV 2024)",
        summary="frozen backbone; nearest class prototype by cosine similarity, accumulated as streams",
        toy="vit",
        floor=SimpleCILFloor,
    )
)
