"""RanPAC: a fixed random projection of frozen features and a ridge classifier from streamed Gram matrices."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._base import TaskBatch
from .._validation import check_non_negative, check_positive_int
from ..buffer import fresh_seed
from ..catalog import HParam, MethodSpec, register
from ._frozen import FrozenFeatureFloor, FrozenFeatureMethod
from ._ridge import ridge_grid_search, ridge_solve

__all__ = ["RanPAC", "RIDGE_GRID"]

# The candidates for lambda, 10^-8 ... 10^8 by powers of ten, as the authors' code tries them (RanPAC/RanPAC,
# RanPAC.py, optimise_ridge_parameter: 10.0 ** np.arange(-8, 9); checked by benchmarks/sidebyside_pretrained.py).
RIDGE_GRID = tuple(10.0**k for k in range(-8, 9))
STATE_TENSORS = (
    "projection",
    "gram",
    "class_features",
    "held_out_gram",
    "held_out_class_features",
    "class_counts",
    "weights",
)
HELD_OUT = 5  # one row in five is held out to choose lambda: an 80/20 split, as the authors' code


class RanPAC(FrozenFeatureMethod):
    """RanPAC (McDonnell et al. 2023, "RanPAC: Random Projections and Pre-trained Models for Continual
    Learning", NeurIPS; code: ``RanPAC/RanPAC``).

    The backbone is frozen and nothing trains: its features (the input of the model's head) go through a
    fixed random projection and a ReLU, and a ridge regression onto the one-hot targets classifies them,
    solved at each :meth:`end_task` from Gram statistics streamed on the device, so the classifier never
    forgets. With ``ridge=0`` the ridge is chosen at each task end from :data:`RIDGE_GRID` on held-out
    rows (the last fifth of each batch). The equations, the held-out choice and its cost:
    docs/methods/pretrained.md, "RanPAC in detail".

    Deviations from the paper and the authors' code (each explained in the method page):

    * No first-session adaptation (the paper's Phase 1): the paper's "RanPAC without Phase 1" ablation.
    * The ridge is chosen on held-out rows of all data so far, in closed form from their Gram statistics.
    * The statistics come from the user's training forwards, not a separate pass over the task's data.
    * Scores of classes never seen are ``-inf``.

    Args:
        model: the pretrained model; its head must be an ``nn.Linear`` with one output per class. Every
            parameter outside the head is frozen.
        projection_dim: ``M``, the projection's width (the paper's 10000). ``G`` takes ``M^2`` floats
            (twice that with ``ridge=0``: the held-out rows' own), and the task-end solve ``O(M^3)``.
        ridge: ``lambda``; 0 chooses it on held-out rows at each task end.
        scaler: unused (no backward pass runs); accepted for the common signature.

    Example:
        >>> import timm
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8,
        ...                           depth=2, embed_dim=32, num_heads=2, num_classes=10)
        >>> ranpac = RanPAC(model, projection_dim=64)
        >>> x, y = torch.randn(10, 3, 16, 16), torch.randint(0, 10, (10,))
        >>> ranpac.backward(torch.nn.functional.cross_entropy(model(x), y), y, x=x)
        >>> ranpac.end_task()
        >>> ranpac.predict(x=x).shape
        torch.Size([10, 10])
    """

    acts_at_task_end = True  # the classifier is solved at task ends

    def __init__(
        self,
        model: nn.Module,
        projection_dim: int = 10000,
        ridge: float = 0.0,
        *,
        scaler: Optional[torch.amp.GradScaler] = None,
    ) -> None:
        check_positive_int("projection_dim", projection_dim)
        check_non_negative("ridge", ridge)
        super().__init__(model, scaler=scaler)
        self.projection_dim, self.ridge = projection_dim, float(ridge)
        generator = torch.Generator().manual_seed(fresh_seed())  # torch.manual_seed decides the projection
        device, m, c = self.device, projection_dim, self.num_classes
        self.projection = torch.randn(self.feature_dim, m, generator=generator).to(device)
        self.gram = torch.zeros(m, m, device=device)
        self.class_features = torch.zeros(c, m, device=device)
        held_out = (m, m) if ridge == 0 else (0, 0)  # no held-out statistics when lambda is fixed
        self.held_out_gram = torch.zeros(*held_out, device=device)
        self.held_out_class_features = torch.zeros(c, held_out[0], device=device)
        self.class_counts = torch.zeros(c, device=device)  # samples per class, held-out rows included
        self.weights = torch.zeros(c, m, device=device)  # W_o, solved at task ends
        self.chosen_ridge = self.ridge  # the lambda of the latest solve
        self.held_out_rows = 0
        self.add_value("projection_dim", int, equal=True)
        self.add_value("ridge", float, equal=True)
        self.add_value("chosen_ridge", float)
        self.add_value("held_out_rows", int)
        self.add_state("projection", dtype=torch.float32, shape=(self.feature_dim, m))
        self.add_state("gram", dtype=torch.float32, shape=(m, m))
        self.add_state("class_features", dtype=torch.float32, shape=(c, m))
        self.add_state("held_out_gram", dtype=torch.float32, shape=held_out)
        self.add_state("held_out_class_features", dtype=torch.float32, shape=(c, held_out[0]))
        self.add_state("class_counts", dtype=torch.float32, shape=(c,))
        self.add_state("weights", dtype=torch.float32, shape=(c, m))
        # Steps whose statistics the classifier has not been solved on yet (host-side; a resumed object starts
        # at 0, so it may miss the warning below, never give a false one).
        self._unsolved_steps = 0

    def project(self, features: Tensor) -> Tensor:
        """``h = ReLU(phi W)``: ``(batch, projection_dim)``."""
        return torch.relu(features @ self.projection)

    def _accumulate(self, features: Tensor, targets: Tensor) -> None:
        self._follow_device()
        self._unsolved_steps += 1
        h = self.project(features)
        held = h.shape[0] // HELD_OUT if self.ridge == 0 else 0  # a host-known split: the last rows
        fit = h.shape[0] - held
        self.gram.addmm_(h[:fit].T, h[:fit])
        self.class_features.index_add_(0, targets[:fit], h[:fit])
        self.class_counts.index_add_(0, targets, self._constant(1.0, features[:, 0]))
        if held:
            self.held_out_rows += held
            self.held_out_gram.addmm_(h[fit:].T, h[fit:])
            self.held_out_class_features.index_add_(0, targets[fit:], h[fit:])

    def _end_task(self, data: Optional[Iterable[TaskBatch]]) -> None:
        self._follow_device()
        statistics = [getattr(self, name) for name in STATE_TENSORS if name not in ("projection", "weights")]
        world = self._sum_over_ranks(statistics)  # every rank solves from all ranks' data
        held_out_rows = self.held_out_rows
        if world > 1:
            rows = torch.tensor([held_out_rows], device=self.device)
            dist.all_reduce(rows)
            held_out_rows = int(rows.item())  # a task end is no hot path
        self._solve(held_out_rows)
        self._share_over_ranks(statistics, world)

    def _solve(self, held_out_rows: int) -> None:
        ridge = self.ridge
        if ridge == 0:
            if held_out_rows == 0:
                ridge = 1.0
                self._warn_once(
                    "no_held_out",
                    "RanPAC: no rows were held out to choose the ridge (batches of under 5 rows), so it is 1.0: "
                    "pass ridge= explicitly, or train with batches of 5 rows or more",
                )
            else:
                ridge = ridge_grid_search(
                    self.gram, self.class_features, self.held_out_gram, self.held_out_class_features, RIDGE_GRID
                )
        gram, class_features = self.gram, self.class_features
        if self.ridge == 0:
            gram, class_features = gram + self.held_out_gram, class_features + self.held_out_class_features
        self.weights = ridge_solve(gram, class_features, ridge)
        self.chosen_ridge = float(ridge)
        self._unsolved_steps = 0

    def _scores(self, features: Tensor) -> Tensor:
        self._follow_device()
        if self._unsolved_steps:
            self._warn_once(
                "unsolved",
                f"RanPAC.predict: the classifier is solved at end_task(), and the {self._unsolved_steps} steps since "
                "the last one are not in it: classes first seen in them score 0 (and before the first end_task(), "
                "every class does). Call end_task() before evaluating.",
            )
        return (self.project(features) @ self.weights.T).masked_fill(self.class_counts == 0, float("-inf"))

    def _follow_device(self) -> None:
        if self.gram.device != self.device:
            for name in STATE_TENSORS:
                setattr(self, name, getattr(self, name).to(self.device))


class RanPACFloor(FrozenFeatureFloor):
    """The projection, its Gram matrix and the class-feature sums."""

    def update(self, features: Tensor, targets: Tensor) -> None:
        if not hasattr(self, "gram"):
            m = self.hp["projection_dim"]
            self.projection = torch.randn(self.dim, m, device=features.device)
            self.gram = features.new_zeros(m, m)
            self.class_features = features.new_zeros(self.classes, m)
        h = torch.relu(features @ self.projection)
        self.gram.addmm_(h.T, h)
        self.class_features.index_add_(0, targets, h)


register(
    MethodSpec(
        "ranpac",
        RanPAC,
        family="pretrained",
        paper=(
            "McDonnell et al. 2023, RanPAC: Random Projections and Pre-trained Models for Continual Learning (NeurIPS)"
        ),
        summary="frozen backbone; fixed random ReLU projection and a ridge classifier from streamed Gram matrices",
        hparams=(
            HParam("projection_dim", int, 10000, "M, the random projection's width (the paper's 10000)", low=1),
            HParam("ridge", float, 0.0, "the ridge lambda; 0: chosen on held-out rows at each task end", low=0.0),
        ),
        toy="vit",
        harness_hparams={"projection_dim": 64},
        floor=RanPACFloor,
    )
)
