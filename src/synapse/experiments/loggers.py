"""Experiment logging: one small interface, three backends (``--log csv tensorboard wandb``).

Every backend writes under ``--output_dir``. What the run logs, and when:

* per-step scalars every ``--log_interval`` steps: the training loss, the method's own terms where it
  reports them (``Synapse.step_metrics``) and the learning rate. They are accumulated *on the device*
  and fetched once per interval, so logging adds no host sync to the steps in between;
* per epoch: training loss and accuracy (and validation accuracy with ``--validation_ratio``);
* after each task: the accuracy-matrix row, Class-IL and Task-IL average accuracy, forgetting, and the
  class histogram of the method's memory (methods with one);
* at the end: the accuracy-matrix figure, and the configuration as hyperparameters.

The optional packages are imported only when their backend is asked for; a missing one is one clear
error naming the extra that installs it.
"""

from __future__ import annotations

import csv
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

BACKENDS = ("csv", "tensorboard", "wandb")


class LoggerUnavailable(RuntimeError):
    """An asked-for backend's package is not installed; the message names the extra to install."""


class Logger:
    """The interface the run talks to. Backends override what they support; the rest is a no-op."""

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        pass

    def histogram(self, tag: str, counts: Sequence[int], step: int) -> None:
        pass

    def figure(self, tag: str, path: str, step: int) -> None:
        pass

    def hparams(self, config: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class CSVLogger(Logger):
    """``steps.csv`` (the per-step scalars, one row per logging step) beside the run's ``epoch_log.csv``."""

    def __init__(self, output_dir: str) -> None:
        self.path = os.path.join(output_dir, "steps.csv")
        self._rows: List[Dict[str, Any]] = []

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if any(k.startswith("step/") for k in values):
            self._rows.append({"step": step, **{k[len("step/") :]: v for k, v in values.items()}})

    def close(self) -> None:
        if not self._rows:
            return
        fields = ["step", *sorted({k for row in self._rows for k in row} - {"step"})]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self._rows)


class TensorBoardLogger(Logger):
    """Event files under ``<output_dir>/tensorboard`` through ``torch.utils.tensorboard``."""

    def __init__(self, output_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's module needs the tensorboard package
            raise LoggerUnavailable(
                "--log tensorboard needs the tensorboard package: pip install -e '.[cli]' (or pip install tensorboard)"
            ) from e
        self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def histogram(self, tag: str, counts: Sequence[int], step: int) -> None:
        import numpy as np

        # The class histogram as a histogram of class indices, so TensorBoard shows one bar per class.
        samples = np.repeat(np.arange(len(counts)), np.asarray(counts, dtype=np.int64))
        if len(samples):
            self.writer.add_histogram(tag, samples, step, bins=np.arange(len(counts) + 1) - 0.5)

    def figure(self, tag: str, path: str, step: int) -> None:
        import matplotlib.image
        import numpy as np

        image = matplotlib.image.imread(path)
        self.writer.add_image(tag, np.asarray(image)[..., :3], step, dataformats="HWC")

    def hparams(self, config: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        simple = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
        self.writer.add_hparams(simple, dict(metrics), run_name=".")

    def close(self) -> None:
        self.writer.close()


class WandbLogger(Logger):
    """A Weights & Biases run in ``<output_dir>/wandb``; ``WANDB_MODE=offline`` works without an account."""

    def __init__(self, output_dir: str, config: Mapping[str, Any]) -> None:
        try:
            import wandb
        except ImportError as e:
            raise LoggerUnavailable("--log wandb needs the wandb package: pip install wandb") from e
        self.wandb: Any = wandb  # typed loosely: its stubs vary across versions
        self.run = self.wandb.init(
            dir=output_dir,
            config=dict(config),
            mode=os.environ.get("WANDB_MODE", "offline"),
            project=os.environ.get("WANDB_PROJECT", "synapse"),
        )

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def histogram(self, tag: str, counts: Sequence[int], step: int) -> None:
        self.run.log({tag: self.wandb.Histogram(np_histogram=(list(counts), list(range(len(counts) + 1))))}, step=step)

    def figure(self, tag: str, path: str, step: int) -> None:
        self.run.log({tag: self.wandb.Image(path)}, step=step)

    def close(self) -> None:
        self.run.finish()


class Loggers(Logger):
    """Several backends as one."""

    def __init__(self, backends: Sequence[Logger]) -> None:
        self.backends = list(backends)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for b in self.backends:
            b.scalars(values, step)

    def histogram(self, tag: str, counts: Sequence[int], step: int) -> None:
        for b in self.backends:
            b.histogram(tag, counts, step)

    def figure(self, tag: str, path: str, step: int) -> None:
        for b in self.backends:
            b.figure(tag, path, step)

    def hparams(self, config: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        for b in self.backends:
            b.hparams(config, metrics)

    def close(self) -> None:
        for b in self.backends:
            b.close()


def create_loggers(names: Sequence[str], output_dir: Optional[str], config: Mapping[str, Any]) -> Loggers:
    """The asked-for backends (validated first: an unknown or unavailable one fails before any is made)."""
    unknown = sorted(set(names) - set(BACKENDS))
    if unknown:
        raise ValueError(f"unknown log backend(s) {unknown}; choose from {BACKENDS}")
    if names and output_dir is None:
        raise ValueError("--log needs --output_dir: every backend writes there")
    backends: List[Logger] = []
    for name in dict.fromkeys(names):  # each once, in the order asked
        assert output_dir is not None
        if name == "csv":
            backends.append(CSVLogger(output_dir))
        elif name == "tensorboard":
            backends.append(TensorBoardLogger(output_dir))
        else:
            backends.append(WandbLogger(output_dir, config))
    return Loggers(backends)
