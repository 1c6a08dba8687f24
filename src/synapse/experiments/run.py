"""An experiment: the task schedule and training loop, with clean stops and checkpoints.

Its parts live beside it: settings and their checks (config.py), the task data (data.py), the model, optimizer
and method (build.py), results and outputs (report.py), checkpoint files and state (checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

import synapse
from synapse import catalog, named_batches
from synapse.scenarios import DomainIncremental, TaskFreeStream

from . import report
from .build import build_method, build_model, build_optimizer, describe_optimizer, wrap_for_world
from .checkpoint import (
    Periodic,
    Writer,
    checkpoint_path,
    experiment_state,
    load_experiment_state,
    newest_common,
    parse_every,
    pause_for_tests,
)
from .config import (
    IDENTITY,
    TRAINING_TYPES,
    Config,
    check_scenario,
    check_world,
    identity_defaults,
    set_threads,
    validate,
)
from .data import prepare
from .datasets import load_split, read_tasks
from .distributed import World, device_for, init_from_env, reduce_ints
from .loggers import Logger, create_loggers
from .loop import Evaluation, Totals, evaluate, shard, train_epoch
from .schedule import lr_factor, set_lr
from .streaming import DEFAULT_WORKERS, Images, Streamed, batches, cat, choose, streamed_tasks
from .streaming import close as close_streams

# Re-exported: cli.py, the tests and the benchmarks import them from here.
__all__ = ["TRAINING_TYPES", "Config", "Experiment", "StopRequested", "StoppedBeforeTraining", "check_scenario"]

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


class Experiment:
    """Runs one configuration end to end. ``run()`` returns the results dict also written to results.json."""

    def __init__(self, cfg: Config) -> None:
        cfg = validate(cfg)  # every check of the settings alone, before any state changes
        self.periodic = Periodic(parse_every(cfg.checkpoint_every))
        cfg = set_threads(cfg)
        self.world: World = init_from_env(
            cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.device = device_for(cfg.device, self.world)
        check_world(cfg, self.world.size)
        # Made (and their packages checked) before any work; only the main rank writes.
        self.logger: Logger = (
            create_loggers(cfg.log, cfg.output_dir, dataclasses.asdict(cfg)) if self.world.is_main else Logger()
        )
        self.spec, tasks = load_split(
            cfg.dataset,
            cfg.dataset_dir,
            image_size=cfg.image_size,
            test_fraction=cfg.test_fraction,
            split_dir=cfg.split_dir,
            classes_per_task=cfg.classes_per_task,
            first_task_classes=cfg.first_task_classes,
            class_order_seed=cfg.class_order_seed,
        )
        # In device memory when the data fits the budget, else streamed from the host (streaming.choose).
        limits = (cfg.max_train_per_task, cfg.max_test_per_task)
        path = choose(cfg.data, cfg.data_budget, self.spec, tasks, self.device, *limits)
        workers = min(DEFAULT_WORKERS, os.cpu_count() or 1) if cfg.num_workers is None else cfg.num_workers
        self.cfg = dataclasses.replace(
            cfg.with_protocol(self.spec), data="stream" if path.stream else "memory", num_workers=workers
        )
        self.data_path = path.why + (f" ({workers} workers)" if path.stream else "")
        if cfg.dataset.startswith("folder:") and cfg.input_size and cfg.input_size > self.spec.image_size:
            warnings.warn(
                f"the folder's images are read at {self.spec.image_size}x{self.spec.image_size} (--image_size) and "
                f"upsampled to the model's {cfg.input_size} (--input_size): pass --image_size {cfg.input_size} to "
                "read them at the size the model takes",
                UserWarning,
                stacklevel=2,
            )
        tensors = streamed_tasks(tasks, self.device, workers) if path.stream else read_tasks(tasks)
        self.main = self.world.is_main
        torch.manual_seed(self.cfg.seed)
        self.data_gen = torch.Generator().manual_seed(self.cfg.seed)
        data = prepare(self.cfg, self.spec, tensors, self.device, self.data_gen)
        self.train_sets, self.val_sets, self.test_sets = data.train_sets, data.val_sets, data.test_sets
        # Scenario datasets (synapse.scenarios): a per-task transformation, or one task-free stream.
        self.domain: Optional[DomainIncremental] = data.domain
        self.stream: Optional[TaskFreeStream] = data.stream
        self.task_classes = list(self.spec.task_classes().values())
        # A method that freezes the backbone (the prompt methods) is built before DDP wraps the model: DDP
        # reduces the parameters that were trainable when it was built.
        method_class = catalog.get(self.cfg.synapse_type).cls if self.cfg.training_type == "continual" else None
        freezes_first = bool(getattr(method_class, "requires_vit", False))
        self.model = build_model(self.cfg, self.spec, self.device, self.world, self.log, wrap=not freezes_first)
        self.synapse: Optional[synapse.Synapse] = build_method(self.cfg, self.model)
        if freezes_first:
            self.model = wrap_for_world(self.cfg, self.model, self.device, self.world)
        self.optimizer = build_optimizer(self.cfg, self.model, self.synapse)  # the method's prompts train too
        cfg_dict = dataclasses.asdict(self.cfg)
        self.identity = {k: cfg_dict[k] for k in IDENTITY}
        self.identity["world_size"] = self.world.size
        files = tasks.files_fingerprint()
        if files is not None:  # a folder's images and split: adding one while a run is stopped must not go unseen
            self.identity["folder_files"] = files
        self.ckpt_path = checkpoint_path(self.cfg.output_dir, self.world)
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
        self.diverged: Optional[str] = None  # the first epoch whose mean loss was not finite

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
    def stages(self) -> List[Tuple[str, Images, Tensor]]:
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
            return [("all tasks", cat(xs), torch.cat(ys))]
        return [(f"task {t + 1}", x, y) for t, (x, y) in enumerate(self.train_sets)]

    def _gather(self, stage: int, x: Any, y: Tensor) -> Optional[Callable[[Tensor], Tuple[Tensor, Tensor]]]:
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
        try:
            return self._run()
        finally:  # a streamed run's DataLoader workers serve it to its end, and no longer
            close_streams([*self.train_sets, *self.val_sets, *self.test_sets])

    def _run(self) -> Dict[str, Any]:
        self.log(
            "configuration:\n" + json.dumps({**dataclasses.asdict(self.cfg), "world_size": self.world.size}, indent=2)
        )
        self.log(f"data: {self.data_path}")
        if self.spec.test_split:
            self.log(f"test set: {self.spec.test_split}")
        self.log(f"optimizer: {describe_optimizer(self.cfg)}")
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
                if self.epoch == 0 and self.next_batch == 0:
                    # A task starts with a fresh optimizer state (Adam's moments; plain SGD has none), as the
                    # prompt methods' authors re-create their optimizer per task. Not on a resume mid-task.
                    self.optimizer.state.clear()
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
                        # The checkpointed copy stays on the host, where a streamed set reads its batches.
                        self.order if isinstance(x, Streamed) else self.order.to(self.device),
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
                        before_step=self._schedule(num_batches),
                        clip_grad_norm=self.cfg.clip_grad_norm,
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

    def _schedule(self, num_batches: int) -> Optional[Callable[[int], None]]:
        """What sets the lr before each batch of this epoch (None: a constant lr, left as it is): the
        schedule over the task's ``num_epochs x num_batches`` steps, at this epoch's place in them."""
        if self.cfg.lr_schedule == "constant":
            return None
        first, steps = self.epoch * num_batches, self.cfg.num_epochs * num_batches  # type: ignore[operator]
        schedule, optimizer = self.cfg.lr_schedule, self.optimizer
        return lambda batch: set_lr(optimizer, lr_factor(schedule, first + batch, steps))

    def _log_task(self, step: int) -> None:
        """After a task: its accuracy row, the averages, forgetting, and the memory's class histogram."""
        if not self.cfg.log:
            return
        t = len(self.accuracy["class_il"])
        self.logger.scalars(report.task_scalars(self.accuracy, self.task_il_applies), t)
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
        self, x: Any, y: Tensor, gather: Optional[Callable[[Tensor], Tuple[Tensor, Tensor]]] = None
    ) -> Iterable[Tuple[Tensor, Tensor]]:
        """This rank's share of a task's training data in batches of the run's size, without augmentation
        (transformed as the task sees it, for domain-IL scenarios)."""
        where = "cpu" if isinstance(x, Streamed) else y.device
        mine = shard(torch.arange(len(y), device=where), self.world.rank, self.world.size)
        step = self.cfg.batch_size or len(mine)
        chunks = (mine[start : start + step] for start in range(0, len(mine), step))
        return batches(x, y, chunks) if gather is None else map(gather, chunks)

    def _accuracy_table(self, num_tasks: int) -> str:
        """The latest accuracy row per setting; Task-IL reads n/a where it does not apply."""
        names = ["stream"] if self.stream is not None else [f"task {t + 1}" for t in range(num_tasks)]
        return report.task_table(self.accuracy, names, self.task_il_applies)

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
            val_x = cat([self.val_sets[t][0] for t in stage_tasks])
            val_y = torch.cat([self.val_sets[t][1] for t in stage_tasks])
            all_classes = [c for t in stage_tasks for c in self.task_classes[t]]
            result = evaluate(self.model, [(val_x, val_y)], [all_classes], rank=self.world.rank, world=self.world.size)
            row["validation_accuracy"] = result.class_il[0]
        self.epoch_log.append(row)
        if not math.isfinite(row["train_loss"]) and self.diverged is None:
            self.diverged = f"{name}, epoch {row['epoch']}"
            warnings.warn(
                f"training diverged: the mean loss of {self.diverged} is {row['train_loss']}, and every accuracy from "
                f"here on is a diverged model's (lower --lr, now {self.cfg.lr}, or check the data)",
                UserWarning,
                stacklevel=2,
            )
        self.logger.scalars(
            {f"epoch/{k}": v for k, v in row.items() if k in ("train_loss", "train_accuracy", "validation_accuracy")},
            len(self.epoch_log),
        )
        val = f", validation accuracy {100 * row['validation_accuracy']:.2f}%" if "validation_accuracy" in row else ""
        self.log(
            f"{name} epoch {row['epoch']}: loss {row['train_loss']:.4f}, train accuracy "
            f"{100 * row['train_accuracy']:.2f}%{val} ({seconds:.1f} s)"
        )
        # The next epoch starts afresh: no running sums carried over from a mid-epoch checkpoint of this one.
        self.epoch, self.next_batch, self.order, self.totals = self.epoch + 1, 0, None, (0.0, 0, 0)

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
        """Assemble the results (report.results), print the summary, write the outputs and close the loggers."""
        head = None
        if self._predictor() is not None:  # a method with its own predictor: its model's head, for comparison
            cil, til, _ = evaluate(
                self.model, self.test_sets, self.task_classes, rank=self.world.rank, world=self.world.size
            )
            head = {"class_il": sum(cil) / len(cil), "task_il": sum(til) / len(til) if self.task_il_applies else None}
        config = {**dataclasses.asdict(self.cfg), "world_size": self.world.size}
        results = report.results(
            self.accuracy,
            self.untrained,
            config=config,
            versions={"synapse": synapse.__version__, "torch": torch.__version__},
            scenario=self.scenario_info(),
            predictor=self.predictor_name,
            head=head,
            test_samples=self.test_samples,
            wall_time_s=self.elapsed,
            epoch_log=self.epoch_log,
            task_il_applies=self.task_il_applies,
            stream=self.stream is not None,
        )
        self.log("\nsummary (%):\n" + report.summary_text(results, self.elapsed))
        if self.diverged is not None:
            self.log(f"training diverged in {self.diverged} (a non-finite mean loss): a diverged model's numbers")
        if self.main and self.cfg.output_dir:
            title = f"{self.cfg.dataset} / {self.cfg.training_type}" + (
                f" / {self.cfg.synapse_type}" if self.cfg.training_type == "continual" else ""
            )
            # The plot draws a Task-IL panel; scenario runs have none to draw.
            figure = report.write_outputs(self.cfg.output_dir, results, title if self.task_il_applies else None)
            if figure is not None:
                self.logger.figure("accuracy_matrix", figure, len(self.accuracy["class_il"]))
            self.log(f"results written to {self.cfg.output_dir}")
        final = {f"final/{k}": v for k, v in results["average_accuracy"].items() if v is not None}
        self.logger.hparams(dict(config), final)
        self.logger.close()
        return results

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        """Write a new checkpoint generation (checkpoint.Writer: beside the old one, verified, rotated in)."""
        if self.writer is None:
            return
        progress = {name: getattr(self, name) for name in PROGRESS}
        state = experiment_state(
            self.identity, self.model, self.optimizer, self.synapse, self.data_gen, self.device, progress
        )
        self.writer.save(state)
        self.saved_step = self.step
        self.periodic.written()

    def restore(self) -> None:
        """Continue from the newest checkpoint generation that every rank holds, or start from scratch when
        there is none (checkpoint.newest_common)."""
        if self.ckpt_path is None:
            raise ValueError("--resume needs --output_dir, where the checkpoint is")
        # A checkpoint written before folder_files was recorded cannot be checked for it: it is taken as matching.
        absent = {**identity_defaults(), "folder_files": self.identity.get("folder_files")}
        found = newest_common(self.ckpt_path, self.identity, self.world, self.device, absent)
        if found is None:
            self.log(f"no checkpoint in {os.path.dirname(self.ckpt_path) or '.'}: starting from scratch")
            return
        file, state = found
        progress = load_experiment_state(state, self.model, self.optimizer, self.synapse, self.data_gen, self.device)
        for name in PROGRESS:
            setattr(self, name, progress[name])
        self.totals = tuple(self.totals)  # type: ignore[assignment]
        self.saved_step = self.step
        self.log(
            f"resumed from {file}: stage {self.stage + 1}, epoch {self.epoch + 1}, batch {self.next_batch} "
            f"(step {self.step})"
        )
