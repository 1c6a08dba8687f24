"""``synapse`` / ``python cli.py``: joint, sequential and continual experiments on split image datasets."""

from __future__ import annotations

import argparse
import ast
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

from synapse import catalog

from . import presets
from ._extras import missing_extras_message, missing_modules
from .build import MethodBuildError
from .checkpoint import DEFAULT_EVERY, CheckpointError, parse_every
from .config import OPTIMIZERS, validate
from .datasets import DATASETS, DatasetUnavailable, check_folder_options
from .loggers import BACKENDS, LoggerUnavailable
from .models import INITS, ModelArgsError, ModelUnavailable, WeightsError, check_model_name
from .run import TRAINING_TYPES, Config, Experiment, StoppedBeforeTraining, StopRequested, _Signals, check_scenario
from .schedule import LR_SCHEDULES


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


def _dataset_name(text: str) -> str:
    if text not in DATASETS:
        raise argparse.ArgumentTypeError(
            f"unknown dataset {text!r}; choose from {', '.join(DATASETS.names())} or folder:PATH"
        )
    try:
        DATASETS[text]  # a folder: dataset's layout is checked here, before any work
    except DatasetUnavailable as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _model_name(text: str) -> str:
    try:
        return check_model_name(text)
    except (KeyError, ModelUnavailable) as e:
        raise argparse.ArgumentTypeError(str(e.args[0])) from None


# The MNIST-like protocols train a 784-100-100 MLP at batch 10: each step is far too small to share
# among threads, and torch's default of one thread per core only adds waiting. benchmarks/threads.py,
# training time of the CLI demo (benchmarks/results/threads_*.json): on an idle 16-core host, medians of
# 3 runs, 1 thread 5.5 s, 2 6.3 s, 4 6.9 s, 8 7.0 s, 16 (torch's default there) 6.7 s, with runs of one
# count up to 30% apart (pooled with a second pass, 1 thread stays fastest: 5.5 s against 5.8 to 7.0 s);
# on an idle 2-core VM, 1 thread 4.9 s and 2 threads 5.3 s; on that VM busy with other work, 1 thread
# 15 s and 2 threads 153 s. One thread is never the slow choice, and it is the only safe one on a busy
# machine.
SMALL_MODEL_THREADS = 1
SMALL_MODELS = ("mlp",)


def default_threads(dataset: str, model: Optional[str]) -> int:
    """The CPU threads a run gets when ``--threads`` is not given.

    ``OMP_NUM_THREADS``, when set (torchrun sets it to 1 for several processes per machine), is torch's
    own setting and is kept. Otherwise the small models of the MNIST-like protocols get
    ``SMALL_MODEL_THREADS`` (or fewer, where fewer CPUs are available), and larger models get torch's
    default (one thread per core).
    """
    if os.environ.get("OMP_NUM_THREADS") or (model or DATASETS[dataset].protocol.model) not in SMALL_MODELS:
        return torch.get_num_threads()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, SMALL_MODEL_THREADS))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="synapse",
        description="Train an image classifier on a sequence of tasks (class-incremental splits) and report "
        "continual-learning metrics. Unset options follow the DER paper's protocol for the dataset "
        "(Buzzega et al. 2020): MNIST-like: mlp, 1 epoch, batch 10; CIFAR: resnet18-reduced, 50 epochs, batch 32.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Needs the 'cli' extra (torchvision, matplotlib, tqdm): pip install -e '.[cli]' in a checkout, "
        "or pip install 'torch-synapse[cli]'.",
    )
    d = Config()
    g = p.add_argument_group("data")
    g.add_argument("--dataset_dir", default=d.dataset_dir, help="where datasets are read from and downloaded to")
    g.add_argument(
        "--dataset",
        default=d.dataset,
        type=_dataset_name,
        metavar="{" + ",".join(DATASETS.names()) + ",folder:PATH}",
        help="MNIST-like: 5 tasks x 2 classes; cifar10: 5 x 2; cifar100: 10 x 10; folder:PATH: your own images in "
        "ImageFolder layout (train/ and test/ with one folder per class, or one folder per class with --test_fraction"
        " held out), read as RGB at --image_size, 5 tasks when the classes allow it, else one class per task, the "
        "CIFAR protocol (TinyImageNet's train/<class>/images/ reads too). The DER paper's other protocols on MNIST or"
        " Fashion-MNIST: perm-* and rot-* are domain-incremental (20 tasks, each of all 10 classes under its own "
        "pixel permutation or rotation; Task-IL does not apply and is reported as null; mlp, 1 epoch, batch 128, lr "
        "0.2); *-360 is the task-free MNIST-360 stream (classes 0-8 in rotating pairs, one pass, no task boundaries: "
        "methods that need them are refused; mlp, batch 16, lr 0.1)",
    )
    g.add_argument(
        "--image_size",
        type=_number(int, 8),
        default=None,
        help="folder: datasets: images are resized (bilinear) to this size when read (default 32)",
    )
    g.add_argument(
        "--test_fraction",
        type=_number(float, 0, 1, low_open=True),
        default=None,
        help="folder: datasets of one tree without split lists: the fraction of each class held out as its test set "
        "(default 0.2)",
    )
    g.add_argument(
        "--split_dir",
        default=None,
        metavar="DIR",
        help="folder: datasets of one tree: the folder holding its split lists, train.txt and test.txt (image paths "
        "relative to the tree, one a line) or CODA-Prompt's imagenet-r_train.yaml and imagenet-r_test.yaml (default: "
        "the tree itself, when it holds them; else --test_fraction is held out)",
    )
    g.add_argument(
        "--classes_per_task",
        type=_number(int, 0, low_open=True),
        default=None,
        help="classes per task (default: the dataset's)",
    )
    g.add_argument(
        "--first_task_classes",
        type=_number(int, 0, low_open=True),
        default=None,
        help="an uneven first task, e.g. 50 for CIFAR-100 as 50 + 5 x 10 with --classes_per_task 10",
    )
    g.add_argument(
        "--class_order_seed",
        type=int,
        default=None,
        help="shuffle which classes form which task with this seed (default: the dataset's label order)",
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
        help="use at most this many training images per task (quick runs; domain-IL: of the images every task "
        "transforms; task-free stream: per class, the stream still visiting every pair)",
    )
    g.add_argument(
        "--max_test_per_task",
        type=_number(int, 0, low_open=True),
        default=None,
        help="evaluate on at most this many test images per task (quick runs; task-free stream: per class)",
    )
    g.add_argument(
        "--data",
        choices=("auto", "memory", "stream"),
        default=d.data,
        help="memory: every task held on the training device as uint8, a batch one gather there; stream: left on "
        "the host (a folder's images in their files) and read batch by batch by DataLoader workers, pinned on a "
        "GPU machine; auto: memory when the data's uint8 size is within --data_budget, else stream. Both give "
        "the same batches, and augmentation runs on the device either way; the run prints which it took",
    )
    g.add_argument(
        "--data_budget",
        type=_number(float, 0),
        default=None,
        metavar="GB",
        help="the most data (GB of uint8 images) --data auto holds on the device (default: a quarter of the GPU's "
        "memory, or of the host's on a CPU)",
    )
    g.add_argument(
        "--num_workers",
        type=_number(int, 0),
        default=d.num_workers,
        help="the streaming path's DataLoader workers (default: 4, at most the CPUs; 0 reads in the training "
        "process); the in-memory path needs none",
    )
    g.add_argument(
        "--evaluate_on",
        choices=("test", "validation"),
        default=d.evaluate_on,
        help="score the accuracy matrix on the test sets, or on the held-out --validation_ratio of each task's "
        "training data (for choosing hyperparameters without touching the test sets)",
    )
    g = p.add_argument_group("training")
    g.add_argument(
        "--model",
        type=_model_name,
        default=None,
        help="mlp, resnet18-reduced, any torchvision classification model, or timm:NAME for any timm model (the "
        "optional timm extra) (default: the protocol's). torchvision and timm models get 3 channels (grey images are "
        "repeated); a model of another family than the dataset's protocol gets its family's lr, batch size, scaling "
        "and init (printed with the configuration as 'defaults')",
    )
    g.add_argument(
        "--pretrained",
        default=None,
        metavar="PATH",
        help="a local weights file (state dict or checkpoint; .safetensors too) loaded into the model by name and "
        "shape; the run reports what was loaded and what was left out (e.g. a new head). Nothing is downloaded",
    )
    g.add_argument(
        "--model_args",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="keyword arguments for a timm or torchvision model's constructor, passed through unchanged (values "
        "read as Python literals: numbers, True/False, strings), e.g. a small ViT: --model timm:vit_tiny_patch16_224 "
        "--model_args patch_size=4 depth=4 embed_dim=64 num_heads=4",
    )
    g.add_argument(
        "--input_size",
        type=_number(int, 0, low_open=True),
        default=None,
        help="feed the model images of this size (bilinear resize on the device; default: the data's size). A timm "
        "model that takes img_size (ViTs) is built for it",
    )
    g.add_argument(
        "--input_channels",
        type=_number(int, 0, low_open=True),
        default=None,
        help="channels the model takes; 1-channel data is repeated to match (default: 3 for torchvision and timm "
        "models, the data's for mlp and resnet18-reduced)",
    )
    g.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random crop (padding 4) and horizontal flip of every training batch, on the device (default: the "
        "dataset's protocol: CIFAR yes, MNIST-like no)",
    )
    g.add_argument(
        "--replay_augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="replay methods store the raw images and re-apply the train augmentation to every replayed minibatch, "
        "as the DER authors' code does (default: on when --augment is); --no-replay_augment stores and replays the "
        "augmented view",
    )
    g.add_argument(
        "--lr",
        type=_number(float, 0, low_open=True, high=None),
        default=None,
        help="the learning rate (default: the protocol's: 0.03 MNIST-like, 0.1 CIFAR)",
    )
    g.add_argument(
        "--optimizer",
        default=d.optimizer,
        choices=list(OPTIMIZERS),
        help="sgd (the DER protocol's: no momentum), adam (L2 weight decay, as torch's) or adamw (decoupled "
        "weight decay), both with betas (0.9, 0.999); its state restarts at each task, as the prompt methods' "
        "authors re-create theirs per task",
    )
    g.add_argument(
        "--lr_schedule",
        default=d.lr_schedule,
        choices=list(LR_SCHEDULES),
        help="the lr within each task: constant, or cosine: --lr times cos(0.495 pi t / (T - 1)) at step t of "
        "the task's T steps (all its epochs), down to 1.6%% of --lr at its last step, restarted at each task "
        "(CODA-Prompt's curve, there per epoch)",
    )
    g.add_argument(
        "--clip_grad_norm",
        # finite: an infinite norm clips nothing, and says so less plainly than leaving the flag out
        type=_number(float, 0, low_open=True, high=math.inf),
        default=d.clip_grad_norm,
        metavar="MAX",
        help="scale the gradients of every parameter the optimizer updates to a total L2 norm of at most MAX, after "
        "the backward pass and before the step (torch.nn.utils.clip_grad_norm_), as L2P's and DualPrompt's authors "
        "do at 1.0 (default: no clipping)",
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
    g.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="standardise inputs per channel (default: the protocol's; MNIST-like: no, pixels in [0, 1] as the DER "
        "authors' code; CIFAR: yes)",
    )
    g.add_argument(
        "--init",
        choices=INITS,
        default=None,
        help="initialisation (default: the protocol's; MNIST-like: xavier, as the DER authors' MLP; CIFAR: default)",
    )
    g.add_argument("--seed", type=int, default=d.seed, help="seed for initialisation, data order and the buffer")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (the method is attached to the compiled module; checkpoints hold the "
        "original's state, so a run resumes compiled or not)",
    )
    g.add_argument(
        "--compile_backend",
        default=d.compile_backend,
        help="the torch.compile backend of --compile (inductor needs a C compiler; eager and aot_eager do not)",
    )
    g.add_argument(
        "--channels_last",
        action="store_true",
        help="the model's weights and its inputs in channels_last memory format (faster convolutions on GPUs)",
    )
    g.add_argument(
        "--bf16",
        action="store_true",
        help="every forward under bf16 autocast (torch.autocast), its outputs float32: losses, gradients' "
        "accumulation and stored logits stay float32",
    )
    g.add_argument(
        "--threads",
        type=_number(int, 0, low_open=True),
        default=None,
        help="CPU threads for torch (default: OMP_NUM_THREADS if set; otherwise "
        f"{SMALL_MODEL_THREADS} for the small MLP of the MNIST-like protocols, whose tiny steps more threads only "
        "slow down, and torch's default, one per core, for larger models); printed with the configuration",
    )
    g = p.add_argument_group("continual learning")
    g.add_argument(
        "--synapse_type",
        default=d.synapse_type,
        choices=catalog.names(),
        help="the method for continual runs (its hyperparameters: the groups below)",
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
        "--unfused",
        action="store_true",
        help="ER family: replay in a separate forward pass instead of inside the model's forward",
    )
    g.add_argument(
        "--method_args",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="the method's hyperparameters by name, as an alternative to their flags below",
    )
    g.add_argument(
        "--weight_decay",
        type=_number(float, 0, high=None),
        default=d.weight_decay,
        help="the optimizer's weight decay (L2 for sgd and adam, decoupled for adamw), e.g. 5e-4 for the DER "
        "authors' LwF",
    )
    g.add_argument(
        "--preset",
        choices=list(presets.PROTOCOLS),
        default=None,
        help="start from the best values known for this protocol (src/synapse/experiments/presets/<method>.json: "
        "the paper's, the authors' configuration or a validation grid, each named): SGD's lr and weight decay, the "
        "batch size, the replay minibatch and the method's hyperparameters, for --synapse_type (or the "
        "--training_type baseline) at --buffer_size; flags given explicitly override them; prints where each "
        "value came from",
    )
    _add_method_flags(p)
    g = p.add_argument_group("output")
    g.add_argument(
        "--output_dir", default=None, help="write results.json, accuracy_matrix.png, epoch_log.csv and checkpoints here"
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest readable checkpoint in --output_dir, or start from scratch when there is "
        "none: one command line for the first start and every requeue",
    )
    g.add_argument(
        "--checkpoint_every",
        type=_checkpoint_every,
        default=DEFAULT_EVERY,
        help="checkpoints inside a task, besides those at task ends and on SIGINT/SIGTERM: every N steps (500), "
        "every so long (30s, 10min, 2h), or 0/off; a SIGKILL loses at most this much training",
    )
    g.add_argument("--quiet", action="store_true", help="print nothing but errors")
    g.add_argument(
        "--log",
        nargs="+",
        choices=BACKENDS,
        default=[],
        help="experiment logging under --output_dir (several allowed): csv (steps.csv beside epoch_log.csv), "
        "tensorboard (event files in tensorboard/), wandb (offline unless WANDB_MODE says otherwise)",
    )
    g.add_argument(
        "--log_interval",
        type=_number(int, 0, low_open=True),
        default=d.log_interval,
        help="steps between logged step scalars (fetched from the device only then)",
    )
    return p


def _hparam_dest(name: str) -> str:
    return f"hp_{name}"


def _add_method_flags(p: argparse.ArgumentParser) -> None:
    """A group per registered method, with a flag per hyperparameter (a name several methods share, such
    as --alpha, is one flag, listed under the first; each group's description names all of its own)."""
    added = set()
    for spec in catalog.specs():
        described = ", ".join(f"--{h.name} (default {h.default!r})" for h in spec.hparams) or "none"
        g = p.add_argument_group(f"{spec.name}: {spec.summary}", f"{spec.paper}. Hyperparameters: {described}.")
        for h in spec.hparams:
            if h.name in added:
                continue
            added.add(h.name)
            users = [s.name for s in catalog.specs() if any(x.name == h.name for x in s.hparams)]
            meaning = "; ".join(
                f"{s.name}: {x.help} (default {x.default!r})"
                for s in catalog.specs()
                for x in s.hparams
                if x.name == h.name
            )
            kwargs: Dict[str, Any] = {"nargs": "?", "const": "true"} if h.type is bool else {}
            g.add_argument(
                f"--{h.name}",
                dest=_hparam_dest(h.name),
                default=None,
                metavar=h.type.__name__.upper() if h.choices is None else "{" + ",".join(map(str, h.choices)) + "}",
                help=meaning if len(users) > 1 else f"{h.help} (default {h.default!r})",
                **kwargs,
            )


def _method_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, preset: Optional[Dict[str, Any]] = None
) -> Dict[str, Any]:
    """The chosen method's hyperparameters from its flags and --method_args (over ``preset``'s values), checked
    against the catalog."""
    spec = catalog.get(args.synapse_type)
    given: Dict[str, Any] = dict(preset or {})
    for item in args.method_args:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--method_args takes KEY=VALUE pairs, got {item!r}")
        given[key] = value
    names = {h.name for s in catalog.specs() for h in s.hparams}
    for name in sorted(names):
        value = getattr(args, _hparam_dest(name))
        if value is None:
            continue
        if name not in {h.name for h in spec.hparams}:
            accepted = ", ".join(f"--{h.name}" for h in spec.hparams) or "none"
            parser.error(f"--{name} is not a hyperparameter of {spec.name} (it takes: {accepted})")
        given[name] = value
    if args.training_type != "continual":
        if given:
            parser.error(f"method hyperparameters ({', '.join(given)}) need --training_type continual")
        return {}
    try:
        return spec.resolve(given)
    except ValueError as e:
        parser.error(f"{spec.name}: {e}")
        raise  # unreachable: parser.error exits


def _model_args(parser: argparse.ArgumentParser, items: Sequence[str]) -> Dict[str, Any]:
    """``--model_args``'s KEY=VALUE pairs as keyword arguments: each value a Python literal where it reads as one
    (``4``, ``0.1``, ``True``, ``(4, 4)``), else the string."""
    kwargs: Dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            parser.error(f"--model_args takes KEY=VALUE pairs with KEY a keyword name, got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[key] = text
    return kwargs


# --preset's run settings and the flags they fill (a preset's other keys are the method's hyperparameters).
_PRESET_FLAGS = {"lr": "lr", "weight_decay": "weight_decay", "batch_size": "batch_size", "mb": "buffer_sample_size"}


def _explicit_flags(argv: Sequence[str]) -> set:
    """The destinations the command line sets explicitly (a flag given at its default value included)."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def _apply_preset(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> Dict[str, Any]:
    """Fill the run settings that ``--preset`` names and the command line leaves unset, print where each value
    came from, and return the preset's method hyperparameters (the method's flags override them later)."""
    protocol = args.preset
    datasets = presets.PROTOCOLS[protocol]
    if args.dataset not in datasets:
        runs = presets.protocol_of(args.dataset)
        instead = f"runs {runs} (use --preset {runs})" if runs else "has no presets"
        wanted = " or ".join(datasets)
        parser.error(f"--preset {protocol} is for --dataset {wanted}, not {args.dataset}, which {instead}")
    continual = args.training_type == "continual"
    method = args.synapse_type if continual else args.training_type
    has_buffer = continual and catalog.get(method).has_buffer
    buffer = args.buffer_size if has_buffer else None
    entry = presets.block(method, protocol) or {}
    try:
        values = presets.values(method, protocol, buffer)
    except KeyError as e:
        parser.error(str(e.args[0]))
    explicit = _explicit_flags(argv)
    given_hp = {item.partition("=")[0] for item in args.method_args} | {
        dest[len("hp_") :] for dest in explicit if dest.startswith("hp_")
    }
    where = f"buffer {buffer}" if buffer is not None else "no buffer"
    lines = [f"preset {protocol} for {method} at {where}: {entry['source']}, {entry['reference']}"]
    if entry.get("note"):
        lines.append(f"  ({entry['note']})")
    hparams: Dict[str, Any] = {}
    for key, value in values.items():
        flag = _PRESET_FLAGS.get(key, key)
        overridden = flag in explicit if key in _PRESET_FLAGS else key in given_hp
        if overridden:
            lines.append(f"  --{flag}: the command line's, not the preset's {value!r}")
        else:
            lines.append(f"  --{flag} {value!r}: preset")
            if key in _PRESET_FLAGS:
                setattr(args, flag, value)
            else:
                hparams[key] = value
    if not args.quiet:
        print("\n".join(lines))
    return hparams


def _checkpoint_every(text: str) -> str:
    try:
        parse_every(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _asks_for_help(argv: Sequence[str]) -> bool:
    """Whether argparse would print the help (``-h``, ``--help`` or an abbreviation such as ``--he``)."""
    return any(a == "-h" or (a.startswith("--h") and "--help".startswith(a)) for a in argv)


def main(argv: Optional[List[str]] = None) -> int:
    """The experiment program. Exit codes: 0 done; 2 a usage, data or checkpoint error; 128 + the signal
    number (130 SIGINT, 143 SIGTERM) when stopped by a signal, during training (a checkpoint was written) or
    before it (nothing to save). Either way the same command with ``--resume`` continues."""
    # First of all: a signal during start-up (argument checks, data loading, the untrained evaluation)
    # ends the run with a clear line instead of a bare kill; training takes the handlers over.
    with _Signals(deferred=False):
        try:
            return _main(argv)
        except StoppedBeforeTraining as e:
            print(
                f"synapse: {e}: nothing to save; the same command with --resume continues from the last checkpoint, "
                "or starts from scratch if there is none",
                file=sys.stderr,
            )
            return 128 + e.signum


# What a run's settings or files can be wrong about once it has started: each ends it with one line, exit 2.
RUN_ERRORS = (DatasetUnavailable, CheckpointError, LoggerUnavailable, ModelArgsError, MethodBuildError, WeightsError)


def _main(argv: Optional[List[str]]) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Before anything else, so that a run never starts and then fails at its first progress bar or plot.
    # The help needs none of the extras and says how to install them, so it is always shown.
    missing = missing_modules()
    if missing and not _asks_for_help(argv):
        print(missing_extras_message(missing), file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and not args.output_dir:
        parser.error("--resume needs --output_dir (the folder holding the checkpoint)")
    if args.log and not args.output_dir:
        parser.error("--log needs --output_dir (every backend writes there)")
    if args.threads is None:
        args.threads = default_threads(args.dataset, args.model)
    preset = _apply_preset(parser, args, argv) if args.preset else None
    method_args = _method_args(parser, args, preset)
    fields = {k: v for k, v in vars(args).items() if not k.startswith("hp_") and k != "preset"}
    cfg = Config(**{**fields, "method_args": method_args, "model_args": _model_args(parser, args.model_args)})
    try:
        validate(cfg)  # the settings' own checks, and the dataset's, before any work
        check_folder_options(cfg.dataset, cfg.image_size, cfg.test_fraction, cfg.split_dir)
        spec = DATASETS[cfg.dataset]
        check_scenario(cfg, spec)
        spec.with_split(cfg.classes_per_task, cfg.first_task_classes, cfg.class_order_seed)
    except ValueError as e:
        parser.error(str(e))
    threads_before = torch.get_num_threads()  # put back at the end, for callers of main() in-process
    try:
        Experiment(cfg).run()
    except RUN_ERRORS as e:
        print(f"synapse: error: {e}", file=sys.stderr)
        return 2
    except StopRequested as e:
        print(f"synapse: {e}; checkpoint written, continue with --resume", file=sys.stderr)
        return 128 + e.signum
    finally:
        from .distributed import shutdown

        shutdown()
        torch.set_num_threads(threads_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
