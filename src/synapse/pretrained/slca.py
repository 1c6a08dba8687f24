"""SLCA: a slow-learning backbone, and the head realigned at each task end on features drawn from per-class
Gaussians."""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._base import CURRENT_LOSS, Synapse, TaskBatch
from .._floor import Floor
from .._model import distributed_world, head_input_features
from .._validation import check_class_indices, check_non_empty, check_non_negative, check_positive, check_positive_int
from ..buffer import fresh_seed
from ..catalog import HParam, MethodSpec, register
from ..functional import align_classifier, asymmetric_cross_entropy, class_moments, mean_and_covariance, mean_decay
from ._backbone import check_same_head, find_head, freeze_backbone, refuse_ddp_wrapped

__all__ = ["SLCA"]

# The class statistics, one row per class that has them (symbol "k"), kept sorted by class.
STATISTICS = ("stat_classes", "class_tasks", "class_means", "class_covariances", "head_weights", "head_biases")
Moments = Dict[int, List[Tensor]]  # class -> [count, sum, second moment] (float64), over a task-end pass


class SLCA(Synapse):
    """SLCA (Zhang et al. 2023, "SLCA: Slow Learner with Classifier Alignment for Continual Learning on a
    Pre-trained Model", ICCV; code: ``GengDavid/SLCA``).

    Sequential fine-tuning of the whole model, made to work on a pretrained backbone by two changes: the
    backbone learns ``backbone_lr_scale`` times slower than the head (your optimizer takes the two groups
    from :meth:`param_groups`), and at each task end from the second on the head is realigned on features
    drawn from per-class Gaussians of the head's input (:func:`~synapse.functional.align_classifier`).
    :meth:`end_task` needs the finished task's un-augmented data. With ``current_loss='method'`` the loss
    passed to :meth:`backward` is checked, then replaced by the cross-entropy over the current task's
    classes. :meth:`predict` gives the logits with the classes not yet seen at ``-inf``. The equations,
    the defaults' sources and the check against the authors' code: docs/methods/pretrained.md, "SLCA in
    detail".

    Deviations from the authors' code (each explained in the method page):

    * One head of every class, built up front; during a task earlier rows hold the last alignment's values.
    * The current task's classes are those seen in its batches so far.
    * A class's task is the task end that computed its statistics (the authors': ``class // task_size``).
    * The logit norm averages over the tasks that have classes.
    * The draws come from the method's CPU generator (the authors': torch's global RNG on the GPU).
    * A class with one sample gets the covariance ``covariance_ridge * I`` (the authors': NaN).
    * Distributed: the moments are summed over ranks; every rank takes rank 0's aligned head.

    Args:
        model: the pretrained model; its head (``model.get_classifier()`` or its last ``nn.Linear``) must
            have one output per class.
        backbone_lr_scale: the backbone's learning rate over the head's; 0 freezes the backbone.
        ca_epochs: epochs of classifier alignment at each task end after the first (0: none).
        ca_lr: the alignment's learning rate.
        ca_samples: features drawn per class and epoch (also the alignment's batch size).
        logit_norm: the temperature of the alignment's logit normalisation (0: raw logits).
        ca_momentum: the alignment's SGD momentum.
        ca_weight_decay: the alignment's SGD weight decay.
        covariance_ridge: added to the diagonal of each class covariance.
        mean_decay: scale the older classes' means down before sampling, as the authors' code does.
        current_loss: ``'method'`` (the current task's cross-entropy replaces the loss passed to
            :meth:`backward`) or ``'user'`` (the loss is kept).
        scaler: a ``torch.amp.GradScaler`` for mixed precision; pass the unscaled loss to ``backward``.

    Example:
        >>> import timm
        >>> from synapse import named_batches
        >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8,
        ...                           depth=2, embed_dim=32, num_heads=2, num_classes=4)
        >>> slca = SLCA(model, ca_samples=8)
        >>> optimizer = torch.optim.SGD(slca.param_groups(0.01), momentum=0.9, weight_decay=5e-4)
        >>> for classes in ([0, 1], [2, 3]):
        ...     x, y = torch.randn(8, 3, 16, 16), torch.tensor(classes * 4)
        ...     optimizer.zero_grad()
        ...     slca.backward(torch.nn.functional.cross_entropy(model(x), y), y, x=x)
        ...     optimizer.step()
        ...     slca.end_task(named_batches([(x, y)]))
        >>> slca.predict(x=x).shape
        torch.Size([8, 4])
    """

    needs_task_data = True
    has_predictor = True

    def __init__(
        self,
        model: nn.Module,
        backbone_lr_scale: float = 0.01,
        ca_epochs: int = 5,
        ca_lr: float = 0.01,
        ca_samples: int = 256,
        logit_norm: float = 0.1,
        ca_momentum: float = 0.9,
        ca_weight_decay: float = 5e-4,
        covariance_ridge: float = 1e-4,
        mean_decay: bool = True,
        *,
        current_loss: str = "method",
        scaler: Optional[torch.amp.GradScaler] = None,
    ) -> None:
        check_non_negative("backbone_lr_scale", backbone_lr_scale)
        if isinstance(ca_epochs, bool) or not isinstance(ca_epochs, int) or ca_epochs < 0:
            raise ValueError(f"ca_epochs must be an int >= 0, got {ca_epochs!r}")
        check_positive("ca_lr", ca_lr)
        check_positive_int("ca_samples", ca_samples)
        check_non_negative("logit_norm", logit_norm)
        check_non_negative("ca_momentum", ca_momentum)
        check_non_negative("ca_weight_decay", ca_weight_decay)
        check_non_negative("covariance_ridge", covariance_ridge)
        if not isinstance(mean_decay, bool):
            raise ValueError(f"mean_decay must be a bool, got {mean_decay!r}")
        current_loss = self._check_current_loss(current_loss)
        if backbone_lr_scale == 0:
            refuse_ddp_wrapped(model, "SLCA")  # backbone_lr_scale=0 freezes it
        super().__init__(model, scaler=scaler)
        self.head = find_head(self.module)
        self.num_classes, self.feature_dim = self.head.out_features, self.head.in_features
        self.backbone_lr_scale, self.ca_epochs, self.ca_lr = float(backbone_lr_scale), ca_epochs, float(ca_lr)
        self.ca_samples, self.logit_norm = ca_samples, float(logit_norm)
        self.ca_momentum, self.ca_weight_decay = float(ca_momentum), float(ca_weight_decay)
        self.covariance_ridge, self.mean_decay, self.current_loss = float(covariance_ridge), mean_decay, current_loss
        if self.backbone_lr_scale == 0:
            freeze_backbone(self.module, self.head)  # everything validated: the first change to the model
        self._forward = self._capture_forward() if current_loss == "method" else None
        self._reads_outputs = current_loss == "method"
        self._features = head_input_features(self.module, self.head)
        self._generator = torch.Generator().manual_seed(fresh_seed())  # torch.manual_seed decides the draws
        c, d, device = self.num_classes, self.feature_dim, self.device
        self.seen_classes = torch.zeros(c, dtype=torch.bool, device=device)
        self.task_classes = torch.zeros(c, dtype=torch.bool, device=device)  # seen in the current task
        self.stat_classes = torch.zeros(0, dtype=torch.long, device=device)
        self.class_tasks = torch.zeros(0, dtype=torch.long, device=device)
        self.class_means = torch.zeros(0, d, dtype=torch.float64, device=device)
        self.class_covariances = torch.zeros(0, d, d, device=device)
        self.head_weights = torch.zeros(0, d, device=device)  # each class's head row as its own task left it
        self.head_biases = torch.zeros(0, device=device)
        self.add_value("num_classes", int, equal=True)
        self.add_value("feature_dim", int, equal=True)
        self.add_generator("rng", "_generator")
        self.add_state("seen_classes", dtype=torch.bool, shape=("num_classes",))
        self.add_state("task_classes", dtype=torch.bool, shape=("num_classes",))
        self.add_state("stat_classes", dtype=torch.long, shape=("k",))
        self.add_state("class_tasks", dtype=torch.long, shape=("k",))
        self.add_state("class_means", dtype=torch.float64, shape=("k", "feature_dim"))
        self.add_state("class_covariances", dtype=torch.float32, shape=("k", "feature_dim", "feature_dim"))
        self.add_state("head_weights", dtype=torch.float32, shape=("k", "feature_dim"))
        self.add_state("head_biases", dtype=torch.float32, shape=("k",))

    # ------------------------------------------------------------------ the slow learner
    def param_groups(self, lr: float) -> List[Dict[str, Any]]:
        """The optimizer's parameter groups: the head's trainable parameters at ``lr``, then the rest of the
        model's at ``backbone_lr_scale * lr`` (left out when the backbone is frozen). Pass them to any
        ``torch.optim`` optimizer; its other settings (momentum, weight decay) apply to both."""
        check_positive("lr", lr)
        head = [p for p in self.head.parameters() if p.requires_grad]
        owned = {id(p) for p in self.head.parameters()}
        backbone = [p for p in self.module.parameters() if p.requires_grad and id(p) not in owned]
        groups: List[Dict[str, Any]] = [{"params": head, "lr": lr}]
        if backbone:
            groups.append({"params": backbone, "lr": lr * self.backbone_lr_scale})
        return groups

    # ------------------------------------------------------------------ backward
    def _check(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        if self._first_step_of_task:
            check_same_head(self.module, self.head, "SLCA")
        if self._forward is not None:
            check_non_empty("SLCA", targets)
            logits = self._forward.checked_outputs("SLCA", targets.shape[0])
            if logits.shape[1] != self.num_classes:
                raise ValueError(
                    f"the model's forward gave {logits.shape[1]} logits, but its head has {self.num_classes} "
                    "outputs: SLCA reads the head's logits, one per class"
                )
        check_class_indices(targets, self.num_classes, first_step=self.num_steps == 0)

    def _backward(self, loss: Tensor, targets: Tensor, model_inputs: Mapping[str, Tensor]) -> None:
        self._follow_device()
        targets = targets.to(self.device)
        task_classes = self.task_classes.index_fill(0, targets, True)
        if self._forward is not None:
            logits = self._forward.outputs
            assert logits is not None  # checked by _check
            # The current task's cross-entropy becomes the root in place of the user's loss, whose graph is then
            # never walked.
            loss = asymmetric_cross_entropy(logits, targets, task_classes.to(logits.device))
        self._run_backward(loss)
        self.task_classes = task_classes  # committed once the step succeeded
        self.seen_classes.index_fill_(0, targets, True)
        if self._forward is not None:
            self._forward.clear()

    # ------------------------------------------------------------------ predictions
    @torch.no_grad()
    def predict(self, **model_inputs: Tensor) -> Tensor:
        """The model's logits in eval mode, ``-inf`` for the classes not seen yet. Take ``.argmax(1)``."""
        logits = super().predict(**model_inputs)
        return logits.masked_fill(~self.seen_classes.to(logits.device), float("-inf"))

    # ------------------------------------------------------------------ task end
    def _end_task(self, data: Optional[Iterable[TaskBatch]]) -> None:
        assert data is not None  # needs_task_data
        self._follow_device()
        moments = self._task_moments(data)  # checks every batch before anything changes
        classes, counts, sums, second = self._merged(moments)
        task = self.num_tasks_ended
        statistics = self._statistics_with(classes, counts, sums, second, task)
        seen = self.seen_classes.clone()
        if len(classes):
            seen[classes] = True
        seen = self._union_over_ranks(seen)
        generator = torch.Generator()
        generator.set_state(self._generator.get_state())
        aligned = None
        if task > 0 and self.ca_epochs > 0 and len(statistics["stat_classes"]):
            aligned = self._aligned_head(statistics, task, generator)
        # Everything is computed: commit.
        for name in STATISTICS:
            setattr(self, name, statistics[name])
        self.seen_classes = seen
        self.task_classes = torch.zeros_like(self.task_classes)
        self._generator = generator
        if aligned is None and self.current_loss == "method":
            # No alignment: each class's rows as its own task left them. The loss gave the earlier classes' rows
            # no gradient, but the optimizer's weight decay and momentum moved them; the authors freeze them.
            aligned = self.head_weights, self.head_biases
        if aligned is not None:
            weight, bias = aligned
            rows = self.stat_classes
            with torch.no_grad():
                self.head.weight[rows] = weight.to(self.head.weight.dtype)
                if self.head.bias is not None and bias is not None:
                    self.head.bias[rows] = bias.to(self.head.bias.dtype)

    def _task_moments(self, data: Iterable[TaskBatch]) -> Moments:
        """Per class of the task's data: the count, feature sum and second moment (float64) of the head's
        input, the model in eval mode with no gradient and its training forwards' hooks paused."""
        moments: Moments = {}
        modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        paused = self._forward.paused() if self._forward is not None else contextlib.nullcontext()
        try:
            with torch.no_grad(), paused:
                for targets, inputs in self._iter_task_data(data):
                    if targets.shape[0] == 0:
                        continue
                    check_class_indices(targets, self.num_classes, first_step=True)
                    targets = targets.to(self.device)
                    features = self._features({k: v.to(self.device) for k, v in inputs.items()})
                    if features.shape != (targets.shape[0], self.feature_dim):
                        raise ValueError(
                            f"the head received features of shape {tuple(features.shape)} for a batch of "
                            f"{targets.shape[0]}; expected ({targets.shape[0]}, {self.feature_dim})"
                        )
                    classes = targets.unique()  # a task end: host syncs are fine here
                    counts, sums, second = class_moments(features, targets, classes)
                    for i, c in enumerate(classes.tolist()):
                        if c in moments:
                            for total, part in zip(moments[c], (counts[i], sums[i], second[i])):
                                total.add_(part)
                        else:
                            moments[c] = [counts[i].clone(), sums[i].clone(), second[i].clone()]
        finally:
            for m, training in modes:
                m.training = training
        return moments

    def _merged(self, moments: Moments) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The task's classes (sorted) and their moments, summed over the ranks of a distributed run."""
        d, device = self.feature_dim, self.device
        present = torch.zeros(self.num_classes, dtype=torch.float64, device=device)
        for c, (count, _, _) in moments.items():
            present[c] = count
        world = distributed_world()
        if world > 1:
            dist.all_reduce(present)
        classes = present.nonzero().flatten()
        k = len(classes)
        counts = present[classes]
        sums = torch.zeros(k, d, dtype=torch.float64, device=device)
        second = torch.zeros(k, d, d, dtype=torch.float64, device=device)
        for i, c in enumerate(classes.tolist()):
            if c in moments:
                sums[i], second[i] = moments[c][1], moments[c][2]
        if world > 1:
            dist.all_reduce(sums)
            dist.all_reduce(second)
        return classes, counts, sums, second

    def _statistics_with(
        self, classes: Tensor, counts: Tensor, sums: Tensor, second: Tensor, task: int
    ) -> Dict[str, Tensor]:
        """The class statistics with this task's classes (re)computed: new tensors, sorted by class."""
        means, covariances = mean_and_covariance(counts, sums, second, self.covariance_ridge)
        new = {
            "stat_classes": classes,
            "class_tasks": torch.full_like(classes, task),
            "class_means": means,
            "class_covariances": covariances.float(),
            "head_weights": self.head.weight.detach()[classes].float(),
            "head_biases": (
                self.head.bias.detach()[classes].float()
                if self.head.bias is not None
                else torch.zeros(len(classes), device=self.device)
            ),
        }
        kept = ~torch.isin(self.stat_classes, classes)  # a class seen again takes its new statistics
        merged = {name: torch.cat([getattr(self, name)[kept], new[name]]) for name in STATISTICS}
        order = merged["stat_classes"].argsort()
        return {name: value[order] for name, value in merged.items()}

    def _aligned_head(
        self, statistics: Mapping[str, Tensor], task: int, generator: torch.Generator
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """The head's rows of the classes with statistics, aligned on features drawn from their Gaussians,
        starting from the rows each class's own task left. Every rank gets rank 0's."""
        class_tasks = statistics["class_tasks"]
        means = statistics["class_means"]
        if self.mean_decay:
            means = means * mean_decay(class_tasks, task)[:, None]
        trils, info = torch.linalg.cholesky_ex(statistics["class_covariances"])
        if bool((info != 0).any()):  # a task end: the sync is fine
            bad = statistics["stat_classes"][info != 0].tolist()
            raise ValueError(
                f"SLCA cannot sample from the covariances of classes {bad}: they are not positive definite in "
                f"float32 (covariance_ridge={self.covariance_ridge}); use a covariance_ridge > 0 (the authors' 1e-4)"
            )
        tasks, task_ids = class_tasks.unique(return_inverse=True)  # the tasks that have classes
        bias = statistics["head_biases"] if self.head.bias is not None else None
        weight, aligned_bias = align_classifier(
            statistics["head_weights"],
            bias,
            means,
            trils,
            task_ids,
            len(tasks),
            epochs=self.ca_epochs,
            lr=self.ca_lr,
            momentum=self.ca_momentum,
            weight_decay=self.ca_weight_decay,
            samples_per_class=self.ca_samples,
            temperature=self.logit_norm if self.logit_norm > 0 else None,
            generator=generator,
        )
        if distributed_world() > 1:
            dist.broadcast(weight, 0)
            if aligned_bias is not None:
                dist.broadcast(aligned_bias, 0)
        return weight, aligned_bias

    @staticmethod
    def _union_over_ranks(flags: Tensor) -> Tensor:
        if distributed_world() > 1:
            counts = flags.to(torch.int32)
            dist.all_reduce(counts)
            return counts > 0
        return flags

    # ------------------------------------------------------------------ device
    def _follow_device(self) -> None:
        if self.seen_classes.device != self.device:
            for name in ("seen_classes", "task_classes", *STATISTICS):
                setattr(self, name, getattr(self, name).to(self.device))


class SLCAFloor(Floor):
    """SLCA's floor: the current task's cross-entropy (the softmax over the batch's classes) in place of the
    user's loss, one backward through the whole model."""

    def backward(self, loss: Tensor, targets: Tensor, inputs: Tensor, logits: Tensor) -> None:
        mask = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device).index_fill_(0, targets, True)
        self.run_backward((asymmetric_cross_entropy(logits, targets, mask),), (self.one,))


register(
    MethodSpec(
        "slca",
        SLCA,
        family="pretrained",
        paper=(
            "Zhang et al. 2023, SLCA: Slow Learner with Classifier Alignment for Continual Learning on a "
            "Pre-trained Model (ICCV)"
        ),
        summary=(
            "the backbone trains slowly (lr x0.01), the head on the current task's classes; at task ends the "
            "head is realigned on features drawn from per-class Gaussians"
        ),
        hparams=(
            HParam("backbone_lr_scale", float, 0.01, "the backbone's lr over the head's; 0 freezes it", low=0.0),
            HParam("ca_epochs", int, 5, "classifier-alignment epochs at each task end after the first", low=0),
            HParam("ca_lr", float, 0.01, "the alignment's SGD learning rate", low=0.0, low_open=True),
            HParam("ca_samples", int, 256, "features drawn per class and alignment epoch (its batch size)", low=1),
            HParam("logit_norm", float, 0.1, "temperature of the alignment's logit normalisation; 0: none", low=0.0),
            HParam("ca_momentum", float, 0.9, "the alignment's SGD momentum", low=0.0),
            HParam("ca_weight_decay", float, 5e-4, "the alignment's SGD weight decay", low=0.0),
            HParam("covariance_ridge", float, 1e-4, "added to each class covariance's diagonal", low=0.0),
            HParam("mean_decay", bool, True, "draw older classes around scaled-down means (the authors' code)"),
            HParam(
                "current_loss",
                str,
                "method",
                "'method': the current task's cross-entropy replaces the loss passed to backward; 'user': keep it",
                choices=CURRENT_LOSS,
            ),
        ),
        toy="vit",
        harness_hparams={"ca_samples": 8, "ca_epochs": 2},
        floor=SLCAFloor,
    )
)
