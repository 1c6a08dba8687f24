"""An experiment: the task schedule, checkpoints, clean stops, metrics and outputs."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

import synapse
from synapse import catalog, named_batches
from synapse.augment import RandomCropFlip
from synapse.scenarios import DomainIncremental, TaskFreeStream, mnist360, mnist360_test_angles, rotate, scenario

from . import report
from .checkpoint import (
    DEFAULT_EVERY,
    FORMAT,
    CheckpointError,
    Periodic,
    Writer,
    generations,
    load_generations,
    parse_every,
    pause_for_tests,
)
from .datasets import DATASETS, DatasetSpec, load_tasks
from .distributed import World, device_for, init_from_env, reduce_ints
from .loggers import Logger, create_loggers
from .loop import Evaluation, Totals, evaluate, shard, train_epoch
from .models import create_model

TRAINING_TYPES = ("joint", "sequential", "continual")
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
    "image_size",
    "test_fraction",
    "classes_per_task",
    "first_task_classes",
    "class_order_seed",
)

# Where the run is in its schedule, and what it measured so far: all of it goes into checkpoints. ``step``
# counts the run's training steps; ``totals`` are the running sums of the epoch in progress.
PROGRESS = (
    "stage",
    "epoch",
    "next_batch",
    "step",
    "totals",
    "order",
    "accuracy",
    "untrained",
    "epoch_log",
    "test_samples",
    "elapsed",
)
# Under torchrun, ranks agree on a stop (and on a time-based checkpoint) every this many steps: one
# collective then, instead of one per step.
SYNC_EVERY = 20


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
    normalize: Optional[bool] = None  # None: the protocol's
    init: Optional[str] = None  # None: the protocol's
    evaluate_on: str = "test"  # or "validation": the held-out part of each task's training data
    log: List[str] = dataclasses.field(default_factory=list)  # backends: csv, tensorboard, wandb
    log_interval: int = 50  # steps between per-step scalars
    unfused: bool = False
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
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
    # Data: a folder: dataset's image size and held-out fraction; the task split of any class-IL dataset.
    image_size: Optional[int] = None
    test_fraction: Optional[float] = None
    classes_per_task: Optional[int] = None
    first_task_classes: Optional[int] = None
    class_order_seed: Optional[int] = None
    defaults: str = ""  # where the unset values came from, in words (filled by with_protocol)

    def with_protocol(self, spec: DatasetSpec) -> Config:
        """Fill unset values from the DER paper's protocol for the dataset, or the model family's defaults."""
        p, source = spec.protocol.for_model(self.model, self.pretrained is not None)
        batch = self.batch_size or p.batch_size
        augment = spec.augment if self.augment is None else self.augment
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


class StopRequested(Exception):
    """SIGINT/SIGTERM arrived during training; a checkpoint was written and the run can be resumed."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


class StoppedBeforeTraining(BaseException):
    """SIGINT/SIGTERM arrived during start-up, before any training step: there is nothing to save.

    A BaseException (as KeyboardInterrupt), raised from the signal handler wherever start-up is, so that no
    ``except Exception`` on the way swallows it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum} before training began")
        self.signum = signum


def _stop_before_training(signum: int, frame: Any) -> None:
    raise StoppedBeforeTraining(signum)


class _Signals:
    """SIGINT/SIGTERM handlers for a stretch of the run, restoring the previous ones on exit.

    ``deferred`` (training): a signal only sets ``received``, which the loop polls between steps, so that a
    stop always writes a checkpoint first. Not deferred (start-up): a signal raises StoppedBeforeTraining at
    once, since start-up work (imports, data, the untrained evaluation) has nothing to save.
    """

    def __init__(self, deferred: bool = True) -> None:
        self.received: Optional[int] = None
        self.deferred = deferred
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle if self.deferred else _stop_before_training)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _limit(x: Tensor, y: Tensor, n: Optional[int]) -> Tuple[Tensor, Tensor]:
    return (x, y) if n is None else (x[:n], y[:n])


def _limit_per_class(x: Tensor, y: Tensor, n: Optional[int]) -> Tuple[Tensor, Tensor]:
    """The first ``n`` items of every class, in dataset order (the task-free stream's quick-run limit)."""
    if n is None:
        return x, y
    keep = torch.cat([torch.nonzero(y == c).flatten()[:n] for c in torch.unique(y)]).sort().values
    return x[keep], y[keep]


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


def _split_validation(x: Tensor, y: Tensor, ratio: float, gen: torch.Generator) -> Tuple[Tensor, ...]:
    if ratio <= 0:
        return x, y, x[:0], y[:0]
    perm = torch.randperm(len(y), generator=gen)
    n_val = int(round(ratio * len(y)))
    val, train = perm[:n_val], perm[n_val:]
    return x[train], y[train], x[val], y[val]


class Experiment:
    """Runs one configuration end to end. ``run()`` returns the results dict also written to results.json."""

    def __init__(self, cfg: Config) -> None:
        if cfg.threads is not None:
            if isinstance(cfg.threads, bool) or not isinstance(cfg.threads, int) or cfg.threads < 1:
                raise ValueError(f"threads must be a positive int or None, got {cfg.threads!r}")
            torch.set_num_threads(cfg.threads)
        cfg = dataclasses.replace(cfg, threads=torch.get_num_threads())
        self.world: World = init_from_env(
            cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.device = device_for(cfg.device, self.world)
        if cfg.evaluate_on not in ("test", "validation"):
            raise ValueError(f"evaluate_on must be 'test' or 'validation', got {cfg.evaluate_on!r}")
        if cfg.evaluate_on == "validation" and cfg.validation_ratio <= 0:
            raise ValueError("evaluate_on='validation' needs validation_ratio > 0 (the held-out part it scores)")
        if cfg.training_type == "continual":  # the method's full hyperparameters, checked before any work
            cfg = dataclasses.replace(cfg, method_args=catalog.get(cfg.synapse_type).resolve(cfg.method_args))
        check_scenario(cfg, DATASETS[cfg.dataset])
        if cfg.replay_augment and not (DATASETS[cfg.dataset].augment if cfg.augment is None else cfg.augment):
            raise ValueError("replay_augment re-applies the train augmentation to replayed items: it needs augment")
        if cfg.log_interval < 1:
            raise ValueError(f"log_interval must be a positive int, got {cfg.log_interval!r}")
        self.periodic = Periodic(parse_every(cfg.checkpoint_every))
        # Made (and their packages checked) before any work; only the main rank writes.
        self.logger: Logger = (
            create_loggers(cfg.log, cfg.output_dir, dataclasses.asdict(cfg)) if self.world.is_main else Logger()
        )
        kind = getattr(DATASETS[cfg.dataset].scenario, "kind", "class-il")
        if kind == "task-free" and self.world.size > 1:
            raise ValueError(f"{cfg.dataset} is one stream, in order: it runs in one process, not {self.world.size}")
        self.spec, tensors, _ = load_tasks(
            cfg.dataset,
            cfg.dataset_dir,
            image_size=cfg.image_size,
            test_fraction=cfg.test_fraction,
            classes_per_task=cfg.classes_per_task,
            first_task_classes=cfg.first_task_classes,
            class_order_seed=cfg.class_order_seed,
        )
        self.cfg = cfg.with_protocol(self.spec)
        self.main = self.world.is_main
        torch.manual_seed(self.cfg.seed)
        self.data_gen = torch.Generator().manual_seed(self.cfg.seed)
        self.train_sets, self.val_sets, self.test_sets = [], [], []
        # Scenario datasets (synapse.scenarios): a per-task transformation, or one task-free stream.
        self.domain: Optional[DomainIncremental] = None
        self.stream: Optional[TaskFreeStream] = None
        if self.spec.scenario is None:
            for train_x, train_y, test_x, test_y in tensors:
                train_x, train_y = _limit(train_x, train_y, self.cfg.max_train_per_task)
                tx, ty, vx, vy = _split_validation(train_x, train_y, self.cfg.validation_ratio, self.data_gen)
                # Each task is held on the training device once (uint8: CIFAR-100's train set is 150 MB).
                self.train_sets.append((tx.to(self.device), ty.to(self.device)))
                self.val_sets.append((vx.to(self.device), vy.to(self.device)))
                test_x, test_y = _limit(test_x, test_y, self.cfg.max_test_per_task)
                self.test_sets.append((test_x.to(self.device), test_y.to(self.device)))
        elif self.spec.scenario.kind == "domain-il":
            self._domain_data(*tensors[0])
        else:
            self._stream_data(*tensors[0])
        if self.cfg.evaluate_on == "validation":  # tuning: the test sets are never read
            self.test_sets = self.val_sets
        self.task_classes = list(self.spec.task_classes().values())
        assert self.cfg.model is not None
        model = create_model(
            self.cfg.model,
            self.spec.in_channels,
            self.spec.image_size,
            self.spec.num_classes,
            self.spec.mean,
            self.spec.std,
            normalize=bool(self.cfg.normalize),
            init=self.cfg.init or "default",
            input_size=self.cfg.input_size,
            input_channels=self.cfg.input_channels,
            pretrained=self.cfg.pretrained,
            log=self.log,
        ).to(self.device)
        if self.world.size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.model = model
        self.optimizer = torch.optim.SGD(
            model.parameters(),
            lr=self.cfg.lr,  # type: ignore[arg-type]
            weight_decay=self.cfg.weight_decay,
        )
        cfg_dict = dataclasses.asdict(self.cfg)
        self.synapse: Optional[synapse.Synapse] = None
        if self.cfg.training_type == "continual":
            self.synapse = catalog.get(self.cfg.synapse_type).create(
                model,
                self.cfg.method_args,
                buffer_size=self.cfg.buffer_size,
                buffer_sample_size=self.cfg.buffer_sample_size,
                buffer_scope=self.cfg.buffer_scope,
                fused=not self.cfg.unfused,
                # The train augmentation re-applied to replayed items, as the DER authors' code does.
                replay_transform=RandomCropFlip() if self.cfg.replay_augment else None,
            )
        self.identity = {k: cfg_dict[k] for k in IDENTITY}
        self.identity["world_size"] = self.world.size
        self.ckpt_path = (
            os.path.join(
                self.cfg.output_dir, "checkpoint.pt" if self.world.size == 1 else f"checkpoint-rank{self.world.rank}.pt"
            )
            if self.cfg.output_dir
            else None
        )
        self.writer = Writer(self.ckpt_path) if self.ckpt_path else None
        self.saved_step = -1  # the global step of the checkpoint on disk (none: -1)
        # Progress through the schedule, all of it checkpointed.
        self.stage, self.epoch, self.next_batch, self.step = 0, 0, 0, 0
        self.totals: Totals = (0.0, 0, 0)
        self.order: Optional[Tensor] = None
        self.accuracy: Dict[str, List[List[float]]] = {"class_il": [], "task_il": []}
        self.untrained: Optional[Dict[str, List[float]]] = None
        self.epoch_log: List[Dict[str, Any]] = []
        self.test_samples: List[int] = []
        self.elapsed = 0.0

    # ------------------------------------------------------------------ scenarios
    def _domain_data(self, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor) -> None:
        """Domain-IL: every task is the same images under the task's transformation. The training images are
        held once and transformed batch by batch on the device; the test (and validation) sets of every task
        are transformed once, up front, since every evaluation reads them all."""
        assert self.spec.scenario is not None
        self.domain = scenario(
            self.spec.scenario.transform,
            self.spec.scenario.num_tasks,
            seed=self.cfg.seed,
            image_size=self.spec.image_size,
        )
        train_x, train_y = _limit(train_x, train_y, self.cfg.max_train_per_task)
        tx, ty, vx, vy = _split_validation(train_x, train_y, self.cfg.validation_ratio, self.data_gen)
        tx, ty, vx, vy = (t.to(self.device) for t in (tx, ty, vx, vy))
        test_x, test_y = (t.to(self.device) for t in _limit(test_x, test_y, self.cfg.max_test_per_task))
        for t in range(self.domain.num_tasks):
            self.train_sets.append((tx, ty))  # the same tensors: no copy per task
            self.val_sets.append((self.domain.transform(vx, t), vy))
            self.test_sets.append((self.domain.transform(test_x, t), test_y))

    def _stream_data(self, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor) -> None:
        """Task-free: the MNIST-360 stream over the training images, and one test set of every class rotated
        all the way round. The stream's inputs are rotated once, up front, in batches on the device (each
        position is seen once, and a step then costs one gather, however small the batch). Quick-run limits
        apply per class."""
        train_x, train_y = _limit_per_class(train_x, train_y, self.cfg.max_train_per_task)
        test_x, test_y = _limit_per_class(test_x, test_y, self.cfg.max_test_per_task)
        k = self.spec.num_classes
        self.stream = mnist360(train_y, batch_size=self.cfg.batch_size or 1, seed=self.cfg.seed, num_classes=k)
        self.stream = self.stream.to(self.device)
        self.train_sets.append(self.stream.inputs(train_x.to(self.device), train_y.to(self.device)))
        self.val_sets.append((train_x[:0].to(self.device), train_y[:0].to(self.device)))
        angles = mnist360_test_angles(test_y, k).to(self.device)
        self.test_sets.append((rotate(test_x.to(self.device), angles), test_y.to(self.device)))

    @property
    def task_il_applies(self) -> bool:
        """Task-IL scores each task on its own classes: meaningless when every task has every class."""
        return self.spec.scenario is None

    def scenario_info(self) -> Dict[str, Any]:
        """What results.json records about the scenario."""
        if self.stream is not None:
            info = dict(self.stream.info)
            if self.cfg.training_type == "joint":
                info["order"] = "joint: the stream's items, at their angles, shuffled (i.i.d.), one pass"
            return info
        if self.domain is not None:
            return {**self.domain.describe(), "task_il": "not applicable: every task has every class"}
        return {"kind": "class-il", "num_tasks": len(self.task_classes), "classes_per_task": self.spec.classes_per_task}

    # ------------------------------------------------------------------ schedule
    def stages(self) -> List[Tuple[str, Tensor, Tensor]]:
        """``(name, images, labels)`` per stage; for scenarios the labels' length is the number of items the
        stage draws from (positions of the stream, or tasks x images in a joint domain-IL run)."""
        if self.stream is not None:  # the stream's inputs, in stream order
            x, y = self.train_sets[0]
            return [("all tasks" if self.cfg.training_type == "joint" else "stream", x, y)]
        if self.cfg.training_type == "joint":
            if self.domain is not None:
                x, y = self.train_sets[0]
                return [("all tasks", x, y.repeat(self.domain.num_tasks))]
            xs, ys = zip(*self.train_sets)
            return [("all tasks", torch.cat(xs), torch.cat(ys))]
        return [(f"task {t + 1}", x, y) for t, (x, y) in enumerate(self.train_sets)]

    def _gather(self, stage: int, x: Tensor, y: Tensor) -> Optional[Callable[[Tensor], Tuple[Tensor, Tensor]]]:
        """How a stage builds a batch from its order's indices: None for the plain ``x[idx], y[idx]``."""
        domain = self.domain
        if domain is None:
            return None
        if self.cfg.training_type == "joint":  # index i is image i % N under task i // N
            n = len(x)
            return lambda idx: (domain.transform(x[idx % n], idx // n), y[idx])
        return lambda idx: (domain.transform(x[idx], stage), y[idx])

    def _new_order(self, n: int) -> Tensor:
        """A stage's order: shuffled, except the task-free stream, which is seen in its own order."""
        if self.stream is not None and self.cfg.training_type != "joint":
            return torch.arange(n)
        return torch.randperm(n, generator=self.data_gen)

    def _boundaries(self) -> Optional[Tuple[int, ...]]:
        """Where the batches start, when they are not every batch_size items (the stream's own batches)."""
        if self.stream is not None and self.cfg.training_type != "joint":
            return self.stream.boundaries
        return None

    def log(self, text: str) -> None:
        if self.main and not self.cfg.quiet:
            print(text, flush=True)

    def progress(self, total: int, desc: str) -> Any:
        from tqdm import tqdm

        return tqdm(
            total=total,
            desc=desc,
            leave=False,
            dynamic_ncols=True,
            disable=not (self.main and sys.stderr.isatty() and not self.cfg.quiet),
        )

    # ------------------------------------------------------------------ run
    def run(self) -> Dict[str, Any]:
        self.log(
            "configuration:\n" + json.dumps({**dataclasses.asdict(self.cfg), "world_size": self.world.size}, indent=2)
        )
        if self.cfg.resume:
            self.restore()
        started = time.perf_counter() - self.elapsed
        if self.untrained is None:
            cil, til, _ = self.evaluate()
            self.untrained = {"class_il": cil, "task_il": til}
        stages = self.stages()
        pause_for_tests("startup")
        with _Signals() as signals:  # training begins: from here a signal stops at a step, with a checkpoint

            def checkpoint(what: str) -> None:
                if self.writer is None:
                    return
                self.elapsed = time.perf_counter() - started
                self.save()
                self.log(f"checkpoint saved: {what}")

            def should_stop(next_batch: int, totals: Callable[[], Totals]) -> bool:
                """Between steps: write a periodic checkpoint when due; whether a signal asks to stop. Ranks
                agree on the signal and on the clock every SYNC_EVERY steps (a lone rank would hang DDP);
                step-based checkpoints need no agreement."""
                stop = due = False
                if self.world.size == 1 or self.step % SYNC_EVERY == 0:
                    local = [int(signals.received is not None), int(self.periodic.due_by_time())]
                    stop, due = (bool(v) for v in reduce_ints(local, self.world, self.device))
                if self.step != self.saved_step and (due or self.periodic.due_by_steps(self.step)):
                    self.next_batch, self.totals = next_batch, totals()
                    checkpoint(f"step {self.step} ({name}, epoch {self.epoch + 1}, batch {next_batch})")
                pause_for_tests(f"step:{self.step}")
                return stop

            while self.stage < len(stages):
                name, x, y = stages[self.stage]
                gather, boundaries = self._gather(self.stage, x, y), self._boundaries()
                while self.epoch < self.cfg.num_epochs:  # type: ignore[operator]
                    if self.order is None:
                        self.order = shard(self._new_order(len(y)), self.world.rank, self.world.size)
                    num_batches = (
                        len(boundaries) - 1 if boundaries else -(-len(self.order) // self.cfg.batch_size)  # type: ignore[operator]
                    )
                    bar = self.progress(num_batches, f"{name} epoch {self.epoch + 1}")
                    bar.update(self.next_batch)
                    t0 = time.perf_counter()

                    def on_step(bar: Any = bar) -> None:
                        self.step += 1
                        bar.update()

                    def log_step(loss_sum: Tensor, steps: int) -> None:
                        lr = self.optimizer.param_groups[0]["lr"]
                        values = {"step/loss": float(loss_sum) / steps, "step/lr": lr}
                        self.logger.scalars(values, self.step)

                    result = train_epoch(
                        self.model,
                        self.optimizer,
                        self.synapse,
                        x,
                        y,
                        self.order.to(self.device),  # the checkpointed copy stays on the host
                        self.cfg.batch_size,  # type: ignore[arg-type]
                        self.next_batch,
                        bool(self.cfg.augment),
                        self.data_gen,
                        should_stop,
                        on_step,
                        gather=gather,
                        boundaries=boundaries,
                        log_every=self.cfg.log_interval if self.cfg.log else 0,
                        log_step=log_step,
                        totals=self.totals,
                    )
                    bar.close()
                    if not result.completed:
                        if self.step != self.saved_step:  # else a periodic checkpoint of this very step is on disk
                            self.next_batch = result.next_batch
                            self.totals = (result.loss_sum, result.correct, result.seen)
                            self.elapsed = time.perf_counter() - started
                            self.save()
                        raise StopRequested(signals.received or signal.SIGTERM)
                    self.finish_epoch(name, result, time.perf_counter() - t0)
                if self.synapse is not None and self.stream is None:  # a task-free stream has no task ends
                    # The finished task's data, for methods that estimate something over it (EWC's
                    # Fisher); a generator, so the methods that ignore it cost nothing.
                    self.synapse.end_task(named_batches(self._task_batches(x, y, gather), "inputs"))
                cil, til, self.test_samples = self.evaluate()
                self.accuracy["class_il"].append(cil)
                self.accuracy["task_il"].append(til)
                self.log(f"\nafter {name} (accuracy %):\n" + self._accuracy_table(len(cil)))
                self._log_task(self.step)
                self.stage, self.epoch = self.stage + 1, 0
                checkpoint(name)
                if signals.received is not None:
                    raise StopRequested(signals.received)
            self.elapsed = time.perf_counter() - started
            # Still deferred: a signal now waits for the results to be written, and the run ends complete.
            return self.finish()

    def _log_task(self, step: int) -> None:
        """After a task: its accuracy row, the averages, forgetting, and the memory's class histogram."""
        if not self.cfg.log:
            return
        t = len(self.accuracy["class_il"])
        values: Dict[str, float] = {}
        for setting in ("class_il", "task_il") if self.task_il_applies else ("class_il",):
            row = self.accuracy[setting][-1]
            values.update({f"task/{setting}/task_{k + 1}": a for k, a in enumerate(row)})
            values[f"task/{setting}/average"] = sum(row) / len(row)
            if t > 1:
                best = [max(r[k] for r in self.accuracy[setting][:-1]) for k in range(t - 1)]
                values[f"task/{setting}/forgetting"] = sum(b - row[k] for k, b in enumerate(best)) / (t - 1)
        self.logger.scalars(values, t)
        counts = self._memory_class_counts()
        if counts is not None:
            self.logger.histogram("memory/classes", counts, t)

    def _memory_class_counts(self) -> Optional[List[int]]:
        """How many items of each class the method's memory holds (methods with a memory of targets)."""
        buffer = getattr(self.synapse, "buffer", None)
        if buffer is None or "targets" not in getattr(buffer, "names", ()) or len(buffer) == 0:
            return None
        targets = buffer.stored(["targets"])["targets"] if hasattr(buffer, "stored") else None
        if targets is None:
            return None
        return torch.bincount(targets[: len(buffer)].long().cpu(), minlength=self.spec.num_classes).tolist()

    def _task_batches(
        self, x: Tensor, y: Tensor, gather: Optional[Callable[[Tensor], Tuple[Tensor, Tensor]]] = None
    ) -> Iterable[Tuple[Tensor, Tensor]]:
        """This rank's share of a task's training data in batches of the run's size, without augmentation
        (transformed as the task sees it, for domain-IL scenarios)."""
        mine = shard(torch.arange(len(y), device=y.device), self.world.rank, self.world.size)
        step = self.cfg.batch_size or len(mine)
        for start in range(0, len(mine), step):
            idx = mine[start : start + step]
            yield (x[idx], y[idx]) if gather is None else gather(idx)

    def _accuracy_table(self, num_tasks: int) -> str:
        """The latest accuracy row per setting; Task-IL reads n/a where it does not apply."""
        names = ["stream"] if self.stream is not None else [f"task {t + 1}" for t in range(num_tasks)]
        table = report.accuracy_table(self.accuracy, names)
        if self.task_il_applies:
            return table
        lines = table.splitlines()
        width = max(7, *(len(n) for n in names)) + 1
        lines = [line for line in lines if not line.startswith(report.LABELS["task_il"])]
        return "\n".join([*lines, f"{report.LABELS['task_il']:<9}" + f"{'n/a':>{width}}" * (len(names) + 1)])

    def finish_epoch(self, name: str, result: Any, seconds: float) -> None:
        row: Dict[str, Any] = {
            "task": name,
            "epoch": self.epoch + 1,
            "train_loss": result.loss_sum / max(result.seen, 1),
            "train_accuracy": result.correct / max(result.seen, 1),
            "seconds": round(seconds, 3),
        }
        if self.cfg.validation_ratio > 0:
            stage_tasks = range(len(self.val_sets)) if self.cfg.training_type == "joint" else [self.stage]
            val_x = torch.cat([self.val_sets[t][0] for t in stage_tasks])
            val_y = torch.cat([self.val_sets[t][1] for t in stage_tasks])
            all_classes = [c for t in stage_tasks for c in self.task_classes[t]]
            result = evaluate(self.model, [(val_x, val_y)], [all_classes], rank=self.world.rank, world=self.world.size)
            row["validation_accuracy"] = result.class_il[0]
        self.epoch_log.append(row)
        self.logger.scalars(
            {f"epoch/{k}": v for k, v in row.items() if k in ("train_loss", "train_accuracy", "validation_accuracy")},
            len(self.epoch_log),
        )
        val = f", validation accuracy {100 * row['validation_accuracy']:.2f}%" if "validation_accuracy" in row else ""
        self.log(
            f"{name} epoch {row['epoch']}: loss {row['train_loss']:.4f}, train accuracy "
            f"{100 * row['train_accuracy']:.2f}%{val} ({seconds:.1f} s)"
        )
        self.epoch, self.next_batch, self.order = self.epoch + 1, 0, None

    def _predictor(self) -> Optional[Callable[[Tensor], Tensor]]:
        """The method's own predictor (iCaRL's nearest mean of exemplars), or None: the model's outputs."""
        if self.synapse is not None and type(self.synapse).has_predictor:
            method = self.synapse
            return lambda x: method.predict(inputs=x)
        return None

    @property
    def predictor_name(self) -> str:
        return f"{type(self.synapse).__name__}.predict" if self._predictor() is not None else "model"

    def evaluate(self) -> Evaluation:
        bar = self.progress(len(self.test_sets), "evaluating")

        def tasks(it: Iterable) -> Iterable:
            for t in it:
                yield t
                bar.update()

        try:
            return evaluate(
                self.model,
                self.test_sets,
                self.task_classes,
                rank=self.world.rank,
                world=self.world.size,
                progress=tasks,
                predict=self._predictor(),
            )
        finally:
            bar.close()

    def finish(self) -> Dict[str, Any]:
        summary = report.summarize(self.accuracy, self.untrained)
        accuracy: Dict[str, Any] = dict(self.accuracy)
        untrained: Optional[Dict[str, Any]] = None if self.untrained is None else dict(self.untrained)
        if not self.task_il_applies:  # reported as null, not as the copy of Class-IL that evaluate() computes
            accuracy["task_il"] = None
            if untrained is not None:
                untrained["task_il"] = None
            for metric in summary.values():
                metric["task_il"] = None
        if self.stream is not None:  # one stream, no tasks: nothing to forget or transfer between tasks
            for key in ("average_incremental_accuracy", "forgetting", "bwt", "fwt"):
                summary[key]["class_il"] = None
        head = None
        if self._predictor() is not None:  # a method with its own predictor: its model's head, for comparison
            cil, til, _ = evaluate(
                self.model, self.test_sets, self.task_classes, rank=self.world.rank, world=self.world.size
            )
            head = {"class_il": sum(cil) / len(cil), "task_il": sum(til) / len(til) if self.task_il_applies else None}
        results = {
            "config": {**dataclasses.asdict(self.cfg), "world_size": self.world.size},
            "versions": {"synapse": synapse.__version__, "torch": torch.__version__},
            "scenario": self.scenario_info(),
            "predictor": self.predictor_name,
            "head_average_accuracy": head,
            "accuracy_matrix": accuracy,
            "untrained_accuracy": untrained,
            **summary,
            "test_samples_per_task": self.test_samples,
            "wall_time_s": self.elapsed,
            "epoch_log": self.epoch_log,
        }
        self.log("\nsummary (%):\n" + report.summary_text(summary, self.elapsed))
        if self.main and self.cfg.output_dir:
            out = self.cfg.output_dir
            os.makedirs(out, exist_ok=True)
            report.write_results(os.path.join(out, "results.json"), results)
            report.write_epoch_log(os.path.join(out, "epoch_log.csv"), self.epoch_log)
            title = f"{self.cfg.dataset} / {self.cfg.training_type}" + (
                f" / {self.cfg.synapse_type}" if self.cfg.training_type == "continual" else ""
            )
            if self.task_il_applies:  # the plot draws a Task-IL panel; scenario runs have none to draw
                figure = os.path.join(out, "accuracy_matrix.png")
                report.plot_accuracy(figure, self.accuracy, title)
                self.logger.figure("accuracy_matrix", figure, len(self.accuracy["class_il"]))
            self.log(f"results written to {out}")
        final = {f"final/{k}": v for k, v in summary["average_accuracy"].items() if v is not None}
        self.logger.hparams({**dataclasses.asdict(self.cfg), "world_size": self.world.size}, final)
        self.logger.close()
        return results

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        """Write a new checkpoint generation (checkpoint.Writer: beside the old one, verified, rotated in)."""
        if self.writer is None:
            return
        state = {
            "format": FORMAT,
            "identity": self.identity,
            "model": synapse._base.unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "synapse": self.synapse.state_dict() if self.synapse is not None else None,
            "rng": {
                "torch": torch.get_rng_state(),
                "data": self.data_gen.get_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            },
            "progress": {name: getattr(self, name) for name in PROGRESS},
        }
        self.writer.save(state)
        self.saved_step = self.step
        self.periodic.written()

    def restore(self) -> None:
        """Continue from the newest readable checkpoint generation, or start from scratch when there is none.

        Under torchrun every rank must continue from the same step: a rank killed while the others were
        writing may be one generation behind them, so the ranks agree on the newest step all of them hold.
        """
        if self.ckpt_path is None:
            raise ValueError("--resume needs --output_dir, where the checkpoint is")
        folder = os.path.dirname(self.ckpt_path) or "."
        pattern = re.compile(r"checkpoint(-rank\d+)?\.pt")  # the latest generations, one per rank
        others = sorted(f for f in os.listdir(folder) if pattern.fullmatch(f)) if os.path.isdir(folder) else []
        if not generations(self.ckpt_path) and others:
            raise CheckpointError(
                f"{self.ckpt_path} does not exist, but {', '.join(others)} do: they were written by a run with another "
                f"number of processes (one file per rank); resume with that world size, not {self.world.size}"
            )
        error: Optional[CheckpointError] = None
        found: List[Tuple[str, Dict[str, Any]]] = []
        try:
            found = load_generations(self.ckpt_path, self.identity)
        except CheckpointError as e:  # raised below on every rank, after the ranks agreed (none waits alone)
            error = e
        newest = found[0][1]["progress"]["step"] if found else -1
        failed, target = reduce_ints([int(error is not None), -newest], self.world, self.device)
        target = -target  # the smallest newest step over the ranks
        if error is not None:
            raise error
        if failed:
            raise CheckpointError("another rank could not read its checkpoint (its error is printed above)")
        if target < 0:
            self.log(f"no checkpoint in {folder}: starting from scratch")
            return
        chosen = [(file, state) for file, state in found if state["progress"]["step"] == target]
        if not chosen:
            steps = [state["progress"]["step"] for _, state in found]
            raise CheckpointError(
                f"rank {self.world.rank} holds checkpoints at steps {steps}, and another rank's newest is at step "
                f"{target}: the ranks cannot continue from the same step"
            )
        file, state = chosen[0]
        synapse._base.unwrap_model(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.synapse is not None:
            self.synapse.load_state_dict(state["synapse"])
        torch.set_rng_state(state["rng"]["torch"])
        self.data_gen.set_state(state["rng"]["data"])
        if state["rng"]["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        for name in PROGRESS:
            setattr(self, name, state["progress"][name])
        self.totals = tuple(self.totals)  # type: ignore[assignment]
        self.saved_step = self.step
        self.log(
            f"resumed from {file}: stage {self.stage + 1}, epoch {self.epoch + 1}, batch {self.next_batch} "
            f"(step {self.step})"
        )
