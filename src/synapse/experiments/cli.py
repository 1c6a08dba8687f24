"""``synapse`` / ``python cli.py``: joint, sequential and continual experiments on split image datasets."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .checkpoint import CheckpointError
from .datasets import DATASETS, DatasetUnavailable
from .methods import METHODS
from .models import model_names
from .run import TRAINING_TYPES, Config, Experiment, StopRequested


def _number(
    kind: type,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = True,
):
    """An argparse type: a number within [low, high) (or open bounds as asked), with a readable error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if (
            value != value
            or (low is not None and (value <= low if low_open else value < low))
            or (high is not None and (value >= high if high_open else value > high))
        ):
            lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
            raise argparse.ArgumentTypeError(
                f"{text} is out of range: must be {' and '.join(x for x in (lo, hi) if x)}"
            )
        return value

    return parse


def _model_name(text: str) -> str:
    names = model_names()
    if text not in names:
        raise argparse.ArgumentTypeError(
            f"unknown model {text!r}; choose 'mlp', 'resnet18-reduced' or a torchvision "
            "classification model (torchvision.models.list_models())"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="synapse",
        description="Train an image classifier on a sequence of tasks (class-incremental splits) and report "
        "continual-learning metrics. Unset options follow the DER paper's protocol for the dataset "
        "(Buzzega et al. 2020): MNIST-like: mlp, 1 epoch, batch 10; CIFAR: resnet18-reduced, 50 epochs, batch 32.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = Config()
    g = p.add_argument_group("data")
    g.add_argument("--dataset_dir", default=d.dataset_dir, help="where datasets are read from and downloaded to")
    g.add_argument(
        "--dataset",
        default=d.dataset,
        choices=DATASETS.names(),
        help="MNIST-like: 5 tasks x 2 classes; cifar10: 5 x 2; cifar100: 10 x 10",
    )
    g.add_argument(
        "--validation_ratio",
        type=_number(float, 0, 1),
        default=d.validation_ratio,
        help="fraction of each task's training data held out and scored after every epoch, in [0, 1)",
    )
    g.add_argument(
        "--max_train_per_task",
        type=_number(int, 0, low_open=True),
        default=None,
        help="use at most this many training images per task (quick runs)",
    )
    g.add_argument(
        "--max_test_per_task",
        type=_number(int, 0, low_open=True),
        default=None,
        help="evaluate on at most this many test images per task (quick runs)",
    )
    g.add_argument(
        "--num_workers",
        type=_number(int, 0),
        default=d.num_workers,
        help="accepted for compatibility with DataLoader-based scripts, without effect: each task is held in memory "
        "as uint8 tensors and batched by indexing, with augmentation batched on the device",
    )
    g = p.add_argument_group("training")
    g.add_argument(
        "--model",
        type=_model_name,
        default=None,
        help="mlp, resnet18-reduced, or any torchvision classification model (default: the protocol's)",
    )
    g.add_argument(
        "--lr",
        type=_number(float, 0, low_open=True, high=None),
        default=None,
        help="SGD learning rate (default: the protocol's: 0.03 MNIST-like, 0.1 CIFAR)",
    )
    g.add_argument(
        "--training_type",
        default=d.training_type,
        choices=TRAINING_TYPES,
        help="joint: all tasks at once (upper bound); sequential: plain fine-tuning (lower bound); "
        "continual: sequential with --synapse_type",
    )
    g.add_argument("--num_epochs", type=_number(int, 0, low_open=True), default=None, help="epochs per task")
    g.add_argument(
        "--batch_size",
        type=_number(int, 0, low_open=True),
        default=None,
        help="batch size (per process under torchrun)",
    )
    g.add_argument("--seed", type=int, default=d.seed, help="seed for initialisation, data order and the buffer")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    g = p.add_argument_group("continual learning")
    g.add_argument(
        "--synapse_type", default=d.synapse_type, choices=METHODS.names(), help="the method for continual runs"
    )
    g.add_argument(
        "--buffer_size",
        type=_number(int, 0, low_open=True),
        default=d.buffer_size,
        help="replay memory size in items (per process under torchrun, unless --buffer_scope global)",
    )
    g.add_argument(
        "--buffer_scope",
        default=d.buffer_scope,
        choices=("rank", "global"),
        help="under torchrun: rank = every process keeps --buffer_size items; global = they share --buffer_size",
    )
    g.add_argument(
        "--buffer_sample_size",
        type=_number(int, 0, low_open=True),
        default=None,
        help="items per replay minibatch (default: the batch size)",
    )
    g.add_argument(
        "--alpha",
        type=_number(float, 0, high=None),
        default=d.alpha,
        help="ER: replay CE weight; DER/DER++: logit MSE weight; SI: penalty strength c",
    )
    g.add_argument("--beta", type=_number(float, 0, high=None), default=d.beta, help="DER++: replay CE weight")
    g.add_argument("--xi", type=_number(float, 0, low_open=True, high=None), default=d.xi, help="SI: damping xi")
    g.add_argument(
        "--unfused",
        action="store_true",
        help="ER family: replay in a separate forward pass instead of inside the model's forward",
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--output_dir", default=None, help="write results.json, accuracy_matrix.png, epoch_log.csv and checkpoints here"
    )
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output_dir")
    g.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and not args.output_dir:
        parser.error("--resume needs --output_dir (the folder holding the checkpoint)")
    cfg = Config(**{k: v for k, v in vars(args).items()})
    try:
        Experiment(cfg).run()
    except (DatasetUnavailable, CheckpointError) as e:
        print(f"synapse: error: {e}", file=sys.stderr)
        return 2
    except StopRequested as e:
        print(f"synapse: {e}; checkpoint written, continue with --resume", file=sys.stderr)
        return 128 + e.signum
    finally:
        from .distributed import shutdown

        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
