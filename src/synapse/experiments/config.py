"""An experiment's settings: ``Config``, the DER protocol's defaults, and the checks run before any work."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from synapse import catalog

from .checkpoint import DEFAULT_EVERY
from .datasets import DATASETS, DatasetSpec
from .schedule import LR_SCHEDULES
from .streaming import DATA_PATHS

TRAINING_TYPES = ("joint", "sequential", "continual")
# --optimizer's choices. SGD is the DER protocol's (no momentum); Adam and AdamW are what the prompt methods'
# authors train with (L2P and DualPrompt through timm's create_optimizer, CODA-Prompt through torch.optim).
OPTIMIZERS: Dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
ADAM_BETAS: Tuple[float, float] = (0.9, 0.999)  # torch's default, and all three authors' configurations
# A checkpoint only resumes the experiment it came from: these settings must match.
IDENTITY = (
    "dataset",
    "model",
    "training_type",
    "synapse_type",
    "seed",
    "lr",
    "num_epochs",
    "batch_size",
    "validation_ratio",
    "buffer_size",
    "buffer_scope",
    "buffer_sample_size",
    "method_args",
    "weight_decay",
    # A checkpoint's optimizer state only fits the optimizer that wrote it, and the lr it continues at
    # depends on the schedule.
    "optimizer",
    "lr_schedule",
    "clip_grad_norm",
    "normalize",
    "init",
    "evaluate_on",
    "unfused",
    "max_train_per_task",
    "max_test_per_task",
    "augment",
    "replay_augment",
    "input_size",
    "input_channels",
    "pretrained",
    "model_args",
    "image_size",
    "test_fraction",
    "split_dir",
    "classes_per_task",
    "first_task_classes",
    "class_order_seed",
)


@dataclass
class Config:
    dataset: str = "fashion-mnist"
    dataset_dir: str = "datasets"
    model: Optional[str] = None
    lr: Optional[float] = None
    training_type: str = "continual"
    synapse_type: str = "der++"
    num_epochs: Optional[int] = None
    batch_size: Optional[int] = None
    validation_ratio: float = 0.0
    buffer_size: int = 500
    buffer_scope: str = "rank"
    buffer_sample_size: Optional[int] = None
    # The method's hyperparameters by catalog name; unset ones take the catalog's defaults.
    method_args: Dict[str, Any] = dataclasses.field(default_factory=dict)
    weight_decay: float = 0.0
    # The optimizer (OPTIMIZERS) and the lr within each task (schedule.LR_SCHEDULES); the optimizer's state
    # restarts at each task's start.
    optimizer: str = "sgd"
    lr_schedule: str = "constant"
    # The most total L2 norm of the gradients the optimizer steps with (L2P's and DualPrompt's authors clip at
    # 1.0); None: no clipping.
    clip_grad_norm: Optional[float] = None
    normalize: Optional[bool] = None  # None: the protocol's
    init: Optional[str] = None  # None: the protocol's
    evaluate_on: str = "test"  # or "validation": the held-out part of each task's training data
    log: List[str] = dataclasses.field(default_factory=list)  # backends: csv, tensorboard, wandb
    log_interval: int = 50  # steps between per-step scalars
    unfused: bool = False
    seed: int = 0
    device: str = "auto"
    # The data's path: "auto" holds it on the training device when its uint8 size is within data_budget (GB;
    # None: a quarter of the device's memory) and streams it from the host otherwise; "memory" or "stream"
    # force one. Both give the same batches. num_workers: the streaming path's DataLoader workers (None: 4,
    # at most the CPUs). Experiment records the path and workers taken.
    data: str = "auto"
    data_budget: Optional[float] = None
    num_workers: Optional[int] = None
    output_dir: Optional[str] = None
    resume: bool = False
    # Periodic checkpoints inside a task: steps ("500"), a time ("30s", "10min") or "0"/"off" (task ends only).
    checkpoint_every: str = DEFAULT_EVERY
    max_train_per_task: Optional[int] = None
    max_test_per_task: Optional[int] = None
    quiet: bool = False
    # CPU threads for torch; None leaves the process's setting alone. Either way the count in effect is
    # recorded here by Experiment, so that the printed configuration and results.json show it.
    threads: Optional[int] = None
    # Vision: train augmentation (None: the dataset's), its re-application to replayed items (None: on when
    # augmenting), the model's input size (None: the data's), a local weights file.
    augment: Optional[bool] = None
    replay_augment: Optional[bool] = None
    input_size: Optional[int] = None
    input_channels: Optional[int] = None
    pretrained: Optional[str] = None
    # Keyword arguments for a timm or torchvision model's constructor (e.g. a small ViT's depth), unchanged.
    model_args: Dict[str, Any] = dataclasses.field(default_factory=dict)
    # Data: a folder: dataset's image size, held-out fraction or split lists; the task split of any class-IL
    # dataset.
    image_size: Optional[int] = None
    test_fraction: Optional[float] = None
    split_dir: Optional[str] = None
    classes_per_task: Optional[int] = None
    first_task_classes: Optional[int] = None
    class_order_seed: Optional[int] = None
    # Speed: torch.compile the model (with this backend), channels_last memory format, bf16 autocast of the
    # forward passes. None of them changes what a checkpoint holds, so none is part of its identity.
    compile: bool = False
    compile_backend: str = "inductor"
    channels_last: bool = False
    bf16: bool = False
    defaults: str = ""  # where the unset values came from, in words (filled by with_protocol)

    def with_protocol(self, spec: DatasetSpec) -> Config:
        """Fill unset values from the DER paper's protocol for the dataset, or the model family's defaults."""
        p, source = spec.protocol.for_model(self.model, self.pretrained is not None)
        batch = self.batch_size or p.batch_size
        augment = spec.augment if self.augment is None else self.augment
        if self.augment is None and augment and self._trains_nothing():
            # Its class statistics are read from the training forwards; its authors build them from un-augmented
            # images (SimpleCIL's and RanPAC's code: the test transform), and there is nothing to regularise.
            augment = False
            source += f"; no augmentation: {self.synapse_type} trains nothing and keeps un-augmented class statistics"
        return dataclasses.replace(
            self,
            defaults=source,
            augment=augment,
            replay_augment=augment if self.replay_augment is None else self.replay_augment,
            model=self.model or p.model,
            lr=self.lr if self.lr is not None else p.lr,
            num_epochs=self.num_epochs or p.num_epochs,
            batch_size=batch,
            buffer_sample_size=self.buffer_sample_size or batch,
            normalize=p.normalize if self.normalize is None else self.normalize,
            init=self.init or p.init,
        )

    def _trains_nothing(self) -> bool:
        """A continual run of a method under which nothing in the model trains (the closed-form ones)."""
        if self.training_type != "continual" or self.synapse_type not in catalog.names():
            return False
        return not getattr(catalog.get(self.synapse_type).cls, "trains_model", True)


def check_scenario(cfg: Config, spec: DatasetSpec) -> None:
    """Refuse settings that a scenario dataset cannot run, before any work (ValueError, naming the setting).

    The task-free stream (``*-360``) is one pass without task boundaries: no method that needs them
    (``MethodSpec.task_free``), no epochs, and no validation split (its held-out items would need rotations
    of their own).
    """
    if spec.scenario is None or spec.scenario.kind != "task-free":
        return
    if cfg.training_type == "continual" and not catalog.get(cfg.synapse_type).task_free:
        usable = ", ".join(s.name for s in catalog.specs() if s.task_free)
        raise ValueError(
            f"{cfg.synapse_type} needs task boundaries (it acts at task ends), and {spec.name} is a task-free stream "
            f"without them (no end_task calls): it would be plain fine-tuning; choose a task-free method: {usable}"
        )
    if cfg.num_epochs not in (None, 1):
        raise ValueError(f"{spec.name} is a single pass over its stream: num_epochs must be 1, got {cfg.num_epochs}")
    if cfg.validation_ratio > 0 or cfg.evaluate_on != "test":
        raise ValueError(f"{spec.name} has no validation split: use validation_ratio 0 and evaluate_on 'test'")


def validate(cfg: Config) -> Config:
    """Check ``cfg`` before any work or state change (ValueError, naming the setting); return it with the
    method's hyperparameters resolved from the catalog (a continual run)."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {cfg.optimizer!r}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {cfg.lr_schedule!r}")
    clip = cfg.clip_grad_norm
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip < math.inf):
        raise ValueError(f"clip_grad_norm must be a finite number > 0 or None (no clipping), got {clip!r}")
    threads = cfg.threads
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {cfg.threads!r}")
    if cfg.evaluate_on not in ("test", "validation"):
        raise ValueError(f"evaluate_on must be 'test' or 'validation', got {cfg.evaluate_on!r}")
    if cfg.evaluate_on == "validation" and cfg.validation_ratio <= 0:
        raise ValueError("evaluate_on='validation' needs validation_ratio > 0 (the held-out part it scores)")
    if cfg.training_type == "continual":  # the method's full hyperparameters, checked before any work
        cfg = dataclasses.replace(cfg, method_args=catalog.get(cfg.synapse_type).resolve(cfg.method_args))
    check_scenario(cfg, DATASETS[cfg.dataset])
    if cfg.replay_augment and not (DATASETS[cfg.dataset].augment if cfg.augment is None else cfg.augment):
        raise ValueError("replay_augment re-applies the train augmentation to replayed items: it needs augment")
    if cfg.data not in DATA_PATHS:
        raise ValueError(f"data must be one of {DATA_PATHS}, got {cfg.data!r}")
    if cfg.data_budget is not None and not cfg.data_budget >= 0:
        raise ValueError(f"data_budget must be a number of GB >= 0, got {cfg.data_budget!r}")
    if cfg.num_workers is not None and (isinstance(cfg.num_workers, bool) or cfg.num_workers < 0):
        raise ValueError(f"num_workers must be an int >= 0 or None, got {cfg.num_workers!r}")
    if cfg.log_interval < 1:
        raise ValueError(f"log_interval must be a positive int, got {cfg.log_interval!r}")
    return cfg


def check_world(cfg: Config, world_size: int) -> None:
    """The task-free stream is one stream, in order: it cannot be sharded over processes."""
    kind = getattr(DATASETS[cfg.dataset].scenario, "kind", "class-il")
    if kind == "task-free" and world_size > 1:
        raise ValueError(f"{cfg.dataset} is one stream, in order: it runs in one process, not {world_size}")


def set_threads(cfg: Config) -> Config:
    """Apply ``cfg.threads`` to torch (None: leave the process's setting) and record the count in effect."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    return dataclasses.replace(cfg, threads=torch.get_num_threads())


def identity_defaults() -> Dict[str, Any]:
    """Each :data:`IDENTITY` setting's default. A record that lacks a setting (a checkpoint, a benchmark's cached
    run) was made before the setting existed, by a run at its default: new settings default to the old
    behaviour."""
    defaults = Config()
    return {name: getattr(defaults, name) for name in IDENTITY}
