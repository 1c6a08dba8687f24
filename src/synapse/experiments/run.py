"""An experiment: the task schedule, checkpoints, clean stops, metrics and outputs."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

import synapse
from synapse import catalog, named_batches

from . import report
from .checkpoint import CheckpointError, atomic_save, load_checkpoint
from .datasets import DatasetSpec, load_tasks
from .distributed import World, any_rank, device_for, init_from_env
from .loop import Evaluation, evaluate, shard, train_epoch
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
)

# Where the run is in its schedule, and what it measured so far: all of it goes into checkpoints.
PROGRESS = ("stage", "epoch", "next_batch", "order", "accuracy", "untrained", "epoch_log", "test_samples", "elapsed")


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
    unfused: bool = False
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    output_dir: Optional[str] = None
    resume: bool = False
    max_train_per_task: Optional[int] = None
    max_test_per_task: Optional[int] = None
    quiet: bool = False
    # CPU threads for torch; None leaves the process's setting alone. Either way the count in effect is
    # recorded here by Experiment, so that the printed configuration and results.json show it.
    threads: Optional[int] = None

    def with_protocol(self, spec: DatasetSpec) -> Config:
        """Fill unset values from the DER paper's protocol for the dataset."""
        p = spec.protocol
        batch = self.batch_size or p.batch_size
        return dataclasses.replace(
            self,
            model=self.model or p.model,
            lr=self.lr if self.lr is not None else p.lr,
            num_epochs=self.num_epochs or p.num_epochs,
            batch_size=batch,
            buffer_sample_size=self.buffer_sample_size or batch,
            normalize=p.normalize if self.normalize is None else self.normalize,
            init=self.init or p.init,
        )


class StopRequested(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written and the run can be resumed."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


class _Signals:
    """Turns SIGINT/SIGTERM into a flag the loop polls between steps, so a stop is always clean."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
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
        self.spec, tensors, _ = load_tasks(cfg.dataset, cfg.dataset_dir)
        self.cfg = cfg.with_protocol(self.spec)
        self.main = self.world.is_main
        torch.manual_seed(self.cfg.seed)
        self.data_gen = torch.Generator().manual_seed(self.cfg.seed)
        self.train_sets, self.val_sets, self.test_sets = [], [], []
        for train_x, train_y, test_x, test_y in tensors:
            train_x, train_y = _limit(train_x, train_y, self.cfg.max_train_per_task)
            tx, ty, vx, vy = _split_validation(train_x, train_y, self.cfg.validation_ratio, self.data_gen)
            # Each task is held on the training device once (uint8: CIFAR-100's train set is 150 MB).
            self.train_sets.append((tx.to(self.device), ty.to(self.device)))
            self.val_sets.append((vx.to(self.device), vy.to(self.device)))
            test_x, test_y = _limit(test_x, test_y, self.cfg.max_test_per_task)
            self.test_sets.append((test_x.to(self.device), test_y.to(self.device)))
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
        # Progress through the schedule, all of it checkpointed.
        self.stage, self.epoch, self.next_batch = 0, 0, 0
        self.order: Optional[Tensor] = None
        self.accuracy: Dict[str, List[List[float]]] = {"class_il": [], "task_il": []}
        self.untrained: Optional[Dict[str, List[float]]] = None
        self.epoch_log: List[Dict[str, Any]] = []
        self.test_samples: List[int] = []
        self.elapsed = 0.0

    # ------------------------------------------------------------------ schedule
    def stages(self) -> List[Tuple[str, Tensor, Tensor]]:
        if self.cfg.training_type == "joint":
            xs, ys = zip(*self.train_sets)
            return [("all tasks", torch.cat(xs), torch.cat(ys))]
        return [(f"task {t + 1}", x, y) for t, (x, y) in enumerate(self.train_sets)]

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
        steps_done = 0
        with _Signals() as signals:

            def should_stop() -> bool:
                # Ranks agree every 20 steps so that they stop together (a lone rank would hang DDP).
                if self.world.size > 1 and steps_done % 20:
                    return False
                return any_rank(signals.received is not None, self.world, self.device)

            while self.stage < len(stages):
                name, x, y = stages[self.stage]
                while self.epoch < self.cfg.num_epochs:  # type: ignore[operator]
                    if self.order is None:
                        self.order = shard(
                            torch.randperm(len(y), generator=self.data_gen), self.world.rank, self.world.size
                        )
                    bar = self.progress(-(-len(self.order) // self.cfg.batch_size), f"{name} epoch {self.epoch + 1}")  # type: ignore[operator]
                    bar.update(self.next_batch)
                    t0 = time.perf_counter()

                    def on_step(bar: Any = bar) -> None:
                        nonlocal steps_done
                        steps_done += 1
                        bar.update()

                    result = train_epoch(
                        self.model,
                        self.optimizer,
                        self.synapse,
                        x,
                        y,
                        self.order.to(self.device),  # the checkpointed copy stays on the host
                        self.cfg.batch_size,  # type: ignore[arg-type]
                        self.next_batch,
                        self.spec.augment,
                        self.data_gen,
                        should_stop,
                        on_step,
                    )
                    bar.close()
                    if not result.completed:
                        self.next_batch = result.next_batch
                        self.elapsed = time.perf_counter() - started
                        self.save()
                        raise StopRequested(signals.received or signal.SIGTERM)
                    self.finish_epoch(name, result, time.perf_counter() - t0)
                if self.synapse is not None:
                    # The finished task's data, for methods that estimate something over it (EWC's
                    # Fisher); a generator, so the methods that ignore it cost nothing.
                    self.synapse.end_task(named_batches(self._task_batches(x, y), "inputs"))
                cil, til, self.test_samples = self.evaluate()
                self.accuracy["class_il"].append(cil)
                self.accuracy["task_il"].append(til)
                self.log(
                    f"\nafter {name} (accuracy %):\n"
                    + report.accuracy_table(self.accuracy, [f"task {t + 1}" for t in range(len(cil))])
                )
                self.stage, self.epoch = self.stage + 1, 0
                self.elapsed = time.perf_counter() - started
                self.save()
                if self.ckpt_path:
                    self.log(f"checkpoint saved: {name}")
                if signals.received is not None:
                    raise StopRequested(signals.received)
        self.elapsed = time.perf_counter() - started
        return self.finish()

    def _task_batches(self, x: Tensor, y: Tensor) -> Iterable[Tuple[Tensor, Tensor]]:
        """This rank's share of a task's training data in batches of the run's size, without augmentation."""
        mine = shard(torch.arange(len(y), device=y.device), self.world.rank, self.world.size)
        step = self.cfg.batch_size or len(mine)
        for start in range(0, len(mine), step):
            idx = mine[start : start + step]
            yield x[idx], y[idx]

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
        results = {
            "config": {**dataclasses.asdict(self.cfg), "world_size": self.world.size},
            "versions": {"synapse": synapse.__version__, "torch": torch.__version__},
            "predictor": self.predictor_name,
            "accuracy_matrix": self.accuracy,
            "untrained_accuracy": self.untrained,
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
            report.plot_accuracy(os.path.join(out, "accuracy_matrix.png"), self.accuracy, title)
            self.log(f"results written to {out}")
        return results

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        if self.ckpt_path is None:
            return
        state = {
            "format": 1,
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
        atomic_save(state, self.ckpt_path)

    def restore(self) -> None:
        if self.ckpt_path is None:
            raise ValueError("--resume needs --output_dir, where the checkpoint is")
        folder = os.path.dirname(self.ckpt_path) or "."
        others = (
            sorted(f for f in os.listdir(folder) if f.startswith("checkpoint") and f.endswith(".pt"))
            if (os.path.isdir(folder))
            else []
        )
        if not os.path.isfile(self.ckpt_path) and others:
            raise CheckpointError(
                f"{self.ckpt_path} does not exist, but {', '.join(others)} do: they were written by a run with another "
                f"number of processes (one file per rank); resume with that world size, not {self.world.size}"
            )
        state = load_checkpoint(self.ckpt_path, self.identity)
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
        self.log(
            f"resumed from {self.ckpt_path}: stage {self.stage + 1}, epoch {self.epoch + 1}, batch {self.next_batch}"
        )
