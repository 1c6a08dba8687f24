"""Datasets by name, split into tasks with :class:`synapse.TaskDict` and loaded as uint8 tensors.

MNIST, CIFAR-10 and CIFAR-100 come through torchvision's downloaders. Fashion-MNIST is read from
``--dataset_dir``, else from Debian's ``dataset-fashion-mnist`` package, else downloaded.

Besides the class-incremental splits, the DER paper's other MNIST protocols are datasets too, built on
MNIST or Fashion-MNIST with :mod:`synapse.scenarios`: ``perm-*`` and ``rot-*`` (domain-incremental, 20
tasks) and ``*-360`` (task-free, one stream).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from synapse.tasks import TaskDict, TaskSubset

from .models import FAMILY_DEFAULTS, family
from .registry import Registry

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


class DatasetUnavailable(RuntimeError):
    """The dataset is not on disk and could not be downloaded; the message says how to get it."""


@dataclass(frozen=True)
class Protocol:
    """The DER paper's defaults for a dataset (Buzzega et al. 2020, sec. 4 and appendix), as its authors'
    code runs them: the input scaling and the initialisation included."""

    model: str
    num_epochs: int
    batch_size: int
    lr: float
    normalize: bool = True  # standardise per channel; False: ToTensor's [0, 1] pixels only
    init: str = "default"  # "default" (PyTorch's) or "xavier" (Glorot-uniform weights, zero biases)

    def for_model(self, model: Optional[str], pretrained: bool = False) -> Tuple[Protocol, str]:
        """This protocol for ``model`` (None: its own), and where its defaults come from, in words.

        The protocol holds as written for a model of its own family. For another family (a ResNet on an
        MNIST-like dataset, any model with pretrained weights) the learning rate, batch size, scaling
        and initialisation are the family's (:data:`~synapse.experiments.models.FAMILY_DEFAULTS`); the
        epochs stay the dataset's.
        """
        name = model or self.model
        kind = "pretrained" if pretrained else family(name)
        if kind == family(self.model):
            return dataclasses.replace(self, model=name), f"the dataset's protocol (written for {self.model})"
        d = FAMILY_DEFAULTS[kind]
        protocol = Protocol(name, self.num_epochs, d.batch_size, d.lr, d.normalize, d.init)
        return protocol, (
            f"model family {kind!r} ({d.why}): lr {d.lr}, batch {d.batch_size}, "
            f"{'standardised' if d.normalize else '[0, 1]'} inputs, {d.init} init; "
            f"epochs ({self.num_epochs}) from the dataset's protocol (written for {self.model})"
        )


SCENARIO_KINDS = ("domain-il", "task-free")


@dataclass(frozen=True)
class Scenario:
    """How a scenario dataset forms its tasks from its base data (:mod:`synapse.scenarios`).

    ``kind``: ``'domain-il'`` (every task has every class, under its own input transformation) or
    ``'task-free'`` (one stream without boundaries). ``transform``: ``'permuted'`` or ``'rotated'`` for
    domain-IL, ``'mnist-360'`` for the task-free stream.
    """

    kind: str
    transform: str
    num_tasks: int = 1


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    classes_per_task: int
    in_channels: int
    image_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    augment: bool
    protocol: Protocol
    load: Callable[[str], Tuple[Dataset, Dataset]]  # root -> (train, test)
    scenario: Optional[Scenario] = None  # None: a class-incremental split

    @property
    def num_tasks(self) -> int:
        if self.scenario is not None:
            return self.scenario.num_tasks
        return self.num_classes // self.classes_per_task

    def task_classes(self) -> Dict[int, Tuple[int, ...]]:
        """The classes each task is scored on (domain-IL: all of them, every task; task-free: one stream)."""
        if self.scenario is not None:
            return {t: tuple(range(self.num_classes)) for t in range(self.num_tasks)}
        k = self.classes_per_task
        return {t: tuple(range(t * k, (t + 1) * k)) for t in range(self.num_tasks)}

    def split_classes(self) -> Dict[int, Tuple[int, ...]]:
        """How the base data is split when loaded: by task, or (scenarios) one part holding the classes used."""
        if self.scenario is not None:
            return {0: tuple(range(self.num_classes))}
        return self.task_classes()


DATASETS: Registry[DatasetSpec] = Registry("dataset")


class ImageTensors(Dataset):
    """In-memory uint8 images ``(N, C, H, W)`` and int64 labels, torchvision-style (``data``, ``targets``)."""

    def __init__(self, data: Tensor, targets: Tensor) -> None:
        self.data = data
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Tuple[Tensor, int]:
        return self.data[i], int(self.targets[i])


class SplitDataset(TaskDict):
    """A :class:`TaskDict` over any registered dataset's loader."""

    def __init__(self, root: str, spec: DatasetSpec) -> None:
        self._spec = spec
        self._train, self._test = spec.load(root)
        super().__init__(root, spec.split_classes())

    def _train_set(self, root: str) -> Dataset:
        return self._train

    def _test_set(self, root: str) -> Dataset:
        return self._test


def images_of(subset: TaskSubset) -> Tuple[Tensor, Tensor]:
    """A task subset as uint8 ``(N, C, H, W)`` images and int64 labels, gathered in one indexing op."""
    data = getattr(subset.dataset, "data", None)
    if data is None:
        raise TypeError(f"{type(subset.dataset).__name__} has no 'data' array to gather images from")
    images = torch.as_tensor(np.asarray(data)[subset.indices.numpy()])
    if images.dim() == 3:  # (N, H, W): greyscale
        images = images.unsqueeze(1)
    elif images.shape[-1] in (1, 3):  # (N, H, W, C): torchvision's CIFAR layout
        images = images.permute(0, 3, 1, 2)
    return images.contiguous(), subset.targets.clone()


# ---------------------------------------------------------------------------- loaders
def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (MNIST's format), gzipped or not."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx_files(folders: Sequence[str]) -> Optional[Dict[str, str]]:
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for folder in folders:
        found = {}
        for name in names:
            for candidate in (name, name + ".gz"):
                if os.path.isfile(os.path.join(folder, candidate)):
                    found[name] = os.path.join(folder, candidate)
                    break
        if len(found) == len(names):
            return found
    return None


def _idx_pair(files: Dict[str, str]) -> Tuple[Dataset, Dataset]:
    def split(prefix: str) -> ImageTensors:
        images = torch.from_numpy(read_idx(files[f"{prefix}-images-idx3-ubyte"]).copy())
        labels = torch.from_numpy(read_idx(files[f"{prefix}-labels-idx1-ubyte"]).astype(np.int64))
        return ImageTensors(images, labels)

    return split("train"), split("t10k")


def _torchvision(name: str, cls_name: str, root: str, how_to_get: str) -> Tuple[Dataset, Dataset]:
    try:
        import torchvision
    except ImportError as e:  # pragma: no cover - the cli extra installs it
        raise DatasetUnavailable(f"{name} needs torchvision: pip install 'torch-synapse[cli]'") from e
    cls = getattr(torchvision.datasets, cls_name)
    try:
        return cls(root, train=True, download=True), cls(root, train=False, download=True)
    except Exception as e:  # torchvision raises URLError, RuntimeError or OSError when offline
        raise DatasetUnavailable(
            f"{name} is not in {os.path.abspath(root)!r} and could not be downloaded ({type(e).__name__}: {e}). "
            f"{how_to_get}"
        ) from e


def _load_mnist(root: str) -> Tuple[Dataset, Dataset]:
    files = _find_idx_files([os.path.join(root, "MNIST", "raw"), os.path.join(root, "mnist"), root])
    if files:
        return _idx_pair(files)
    return _torchvision(
        "MNIST",
        "MNIST",
        root,
        f"Run once with internet access to download it into --dataset_dir, or place the four IDX files in "
        f"{os.path.join(root, 'MNIST', 'raw')}.",
    )


def _load_fashion_mnist(root: str) -> Tuple[Dataset, Dataset]:
    files = _find_idx_files(
        [os.path.join(root, "FashionMNIST", "raw"), os.path.join(root, "fashion-mnist"), root, DEBIAN_FASHION_MNIST]
    )
    if files:
        return _idx_pair(files)
    return _torchvision(
        "Fashion-MNIST",
        "FashionMNIST",
        root,
        "Install it with 'apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or run once with internet access.",
    )


def _load_cifar(cls_name: str) -> Callable[[str], Tuple[Dataset, Dataset]]:
    def load(root: str) -> Tuple[Dataset, Dataset]:
        return _torchvision(
            cls_name.replace("CIFAR", "CIFAR-"),
            cls_name,
            root,
            "Run once with internet access to download it into --dataset_dir.",
        )

    return load


# DER's protocols: Seq-MNIST (MLP, 1 epoch, batch 10), Seq-CIFAR-10 (ResNet-18, 50 epochs, batch 32).
# Learning rates are the paper's best for plain SGD fine-tuning (appendix, "SGD" rows).
# The DER authors' Seq-MNIST feeds ToTensor() pixels (no normalisation) to an MLP with Xavier init
# (mammoth: datasets/seq_mnist.py, backbone/MNISTMLP.py); their CIFAR-10 normalises per channel.
_MNIST_PROTOCOL = Protocol(model="mlp", num_epochs=1, batch_size=10, lr=0.03, normalize=False, init="xavier")
_CIFAR_PROTOCOL = Protocol(model="resnet18-reduced", num_epochs=50, batch_size=32, lr=0.1)

for _spec in (
    DatasetSpec(
        "mnist",
        10,
        2,
        mean=(0.1307,),
        std=(0.3081,),
        protocol=_MNIST_PROTOCOL,
        load=_load_mnist,
        in_channels=1,
        image_size=28,
        augment=False,
    ),
    DatasetSpec(
        "fashion-mnist",
        10,
        2,
        mean=(0.2860,),
        std=(0.3530,),
        protocol=_MNIST_PROTOCOL,
        load=_load_fashion_mnist,
        in_channels=1,
        image_size=28,
        augment=False,
    ),
    DatasetSpec(
        "cifar10",
        10,
        2,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2615),
        protocol=_CIFAR_PROTOCOL,
        load=_load_cifar("CIFAR10"),
        in_channels=3,
        image_size=32,
        augment=True,
    ),
    DatasetSpec(
        "cifar100",
        100,
        10,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        protocol=_CIFAR_PROTOCOL,
        load=_load_cifar("CIFAR100"),
        in_channels=3,
        image_size=32,
        augment=True,
    ),
):
    DATASETS.register(_spec.name)(_spec)


# The DER paper's other MNIST protocols, as its authors' code runs them (mammoth: datasets/perm_mnist.py,
# rot_mnist.py, mnist_360.py; utils/best_args.py), on MNIST and on Fashion-MNIST: the same MLP, ToTensor()
# pixels and Xavier init as Seq-MNIST. P-MNIST and R-MNIST: 20 tasks, batch 128, 1 epoch, SGD's best lr 0.2.
# MNIST-360: digits 0-8 (9 outputs), one pass over the stream, the dataset's default batch 16 (the best of
# A-GEM-R, DER and DER++), lr 0.1 (SGD's best). A method's best values (batch size included) are in
# benchmarks/protocols.py.
_DOMAIN_PROTOCOL = Protocol(model="mlp", num_epochs=1, batch_size=128, lr=0.2, normalize=False, init="xavier")
_STREAM_PROTOCOL = Protocol(model="mlp", num_epochs=1, batch_size=16, lr=0.1, normalize=False, init="xavier")
_BASES = {
    "mnist": ((0.1307,), (0.3081,), _load_mnist),
    "fashion-mnist": ((0.2860,), (0.3530,), _load_fashion_mnist),
}
for _base, (_mean, _std, _load) in _BASES.items():
    for _prefix, _suffix, _scenario, _protocol, _classes in (
        ("perm-", "", Scenario("domain-il", "permuted", 20), _DOMAIN_PROTOCOL, 10),
        ("rot-", "", Scenario("domain-il", "rotated", 20), _DOMAIN_PROTOCOL, 10),
        ("", "-360", Scenario("task-free", "mnist-360"), _STREAM_PROTOCOL, 9),
    ):
        _spec = DatasetSpec(
            f"{_prefix}{_base}{_suffix}",
            _classes,
            _classes,
            mean=_mean,
            std=_std,
            protocol=_protocol,
            load=_load,
            in_channels=1,
            image_size=28,
            augment=False,
            scenario=_scenario,
        )
        DATASETS.register(_spec.name)(_spec)


def load_tasks(name: str, root: str) -> Tuple[DatasetSpec, List[Tuple[Tensor, Tensor, Tensor, Tensor]], SplitDataset]:
    """``(spec, [(train_x, train_y, test_x, test_y) per task], task_dict)`` for dataset ``name``.

    For a scenario dataset (``spec.scenario``) the list has one entry, the base data restricted to the
    scenario's classes, untransformed: the experiment builds the tasks or the stream from it.
    """
    spec = DATASETS[name]
    tasks = SplitDataset(root, spec)
    tensors = [(*images_of(t.train_set), *images_of(t.test_set)) for t in tasks.values()]
    return spec, tensors, tasks
