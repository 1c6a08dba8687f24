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
import hashlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from synapse.tasks import TaskDict, TaskSubset, dataset_targets

from .models import FAMILY_DEFAULTS, family
from .registry import Registry

if TYPE_CHECKING:
    from .split_lists import Split

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
    first_task_classes: Optional[int] = None  # an uneven first task (e.g. CIFAR-100 as 50 + 5 x 10)
    class_order: Optional[Tuple[int, ...]] = None  # class_order[i]: the dataset's label that becomes class i
    test_split: str = ""  # a folder dataset's: where its test set comes from, in words (printed by the run)

    @property
    def num_tasks(self) -> int:
        if self.scenario is not None:
            return self.scenario.num_tasks
        first = self.first_task_classes or self.classes_per_task
        return 1 + (self.num_classes - first) // self.classes_per_task

    def task_classes(self) -> Dict[int, Tuple[int, ...]]:
        """The classes each task is scored on (domain-IL: all of them, every task; task-free: one stream)."""
        if self.scenario is not None:
            return {t: tuple(range(self.num_classes)) for t in range(self.num_tasks)}
        k, first = self.classes_per_task, self.first_task_classes or self.classes_per_task
        return {t: tuple(range(first + (t - 1) * k if t else 0, first + t * k)) for t in range(self.num_tasks)}

    def with_split(
        self,
        classes_per_task: Optional[int] = None,
        first_task_classes: Optional[int] = None,
        class_order_seed: Optional[int] = None,
    ) -> DatasetSpec:
        """This dataset split another way: ``classes_per_task``, an uneven first task, and a class order
        drawn from ``class_order_seed`` (the labels are renumbered in that order, so task ``t`` still holds
        consecutive classes). None keeps the dataset's own. Raises ValueError for a split that does not fit."""
        if (classes_per_task, first_task_classes, class_order_seed) == (None, None, None):
            return self
        if self.scenario is not None:
            raise ValueError(f"{self.name} is a {self.scenario.kind} scenario: its tasks are not split by class")
        k = self.classes_per_task if classes_per_task is None else classes_per_task
        first = k if first_task_classes is None else first_task_classes
        if k < 1 or first < 1 or first > self.num_classes:
            raise ValueError(
                f"{self.name} has {self.num_classes} classes: tasks of {k} and a first task of {first} classes "
                f"need classes_per_task and first_task_classes from 1 to {self.num_classes}"
            )
        if (self.num_classes - first) % k:
            raise ValueError(
                f"{self.num_classes} classes cannot be split into a first task of {first} and tasks of {k} classes: "
                f"{self.num_classes} - first_task_classes must be a multiple of classes_per_task"
            )
        order = self.class_order
        if class_order_seed is not None:
            generator = torch.Generator().manual_seed(class_order_seed)
            order = tuple(torch.randperm(self.num_classes, generator=generator).tolist())
        return dataclasses.replace(
            self, classes_per_task=k, first_task_classes=None if first == k else first, class_order=order
        )

    def split_classes(self) -> Dict[int, Tuple[int, ...]]:
        """How the base data is split when loaded: by task, or (scenarios) one part holding the classes used."""
        if self.scenario is not None:
            return {0: tuple(range(self.num_classes))}
        return self.task_classes()


FOLDER_PREFIX = "folder:"


class DatasetRegistry(Registry[DatasetSpec]):
    """The registered datasets, plus ``folder:PATH`` for any image folder (:func:`folder_spec`)."""

    def __getitem__(self, name: str) -> DatasetSpec:
        if isinstance(name, str) and name.startswith(FOLDER_PREFIX):
            return folder_spec(name[len(FOLDER_PREFIX) :], read_split=False)
        return super().__getitem__(name)

    def __contains__(self, name: object) -> bool:
        return (isinstance(name, str) and name.startswith(FOLDER_PREFIX)) or super().__contains__(name)


DATASETS: DatasetRegistry = DatasetRegistry("dataset")


class ImageTensors(Dataset):
    """In-memory uint8 images ``(N, C, H, W)`` and int64 labels, torchvision-style (``data``, ``targets``)."""

    def __init__(self, data: Tensor, targets: Tensor) -> None:
        self.data = data
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Tuple[Tensor, int]:
        return self.data[i], int(self.targets[i])


class FileImages(Dataset):
    """Image files and their int64 labels, read lazily: each as RGB, resized to ``size`` squared (bilinear).
    A folder dataset's train or test part; its images are read when a task is loaded into memory, or batch by
    batch by the streaming path's workers."""

    def __init__(self, files: Sequence[str], targets: Tensor, size: int) -> None:
        self.files = list(files)
        self.targets = targets
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tuple[Tensor, int]:
        return _read_images([self.files[i]], self.size)[0], int(self.targets[i])


class SplitDataset(TaskDict):
    """A :class:`TaskDict` over any registered dataset's loader."""

    def __init__(self, root: str, spec: DatasetSpec) -> None:
        self._spec = spec
        self._train, self._test = spec.load(root)
        if spec.class_order is not None:  # renumbered: class i is the dataset's label class_order[i]
            self._train, self._test = _relabel(self._train, spec.class_order), _relabel(self._test, spec.class_order)
        super().__init__(root, spec.split_classes())

    def _train_set(self, root: str) -> Dataset:
        return self._train

    def _test_set(self, root: str) -> Dataset:
        return self._test

    def files_fingerprint(self) -> Optional[str]:
        """A short sha256 of a folder dataset's files and labels, train and test: what may change on disk between
        a run and its resume (a new image also moves the seeded hold-out); None for an in-memory dataset."""
        if not isinstance(self._train, FileImages) or not isinstance(self._test, FileImages):
            return None
        digest = hashlib.sha256()
        for part in (self._train, self._test):
            for file, label in zip(part.files, part.targets.tolist()):
                digest.update(f"{label}\t{file}\n".encode())
            digest.update(b"--\n")
        return digest.hexdigest()[:16]


def _relabel(dataset: Dataset, order: Sequence[int]) -> Dataset:
    """``dataset``'s images with label ``order[i]`` renumbered ``i``."""
    new_label = torch.empty(len(order), dtype=torch.int64)
    new_label[torch.as_tensor(order)] = torch.arange(len(order))
    if isinstance(dataset, FileImages):
        return FileImages(dataset.files, new_label[dataset.targets], dataset.size)
    data = getattr(dataset, "data", None)
    if data is None:
        raise TypeError(f"{type(dataset).__name__} has no 'data' array: a class order cannot be applied to it")
    return ImageTensors(data, new_label[dataset_targets(dataset)])


def read_images(dataset: Dataset, indices: np.ndarray) -> Tensor:
    """The items ``indices`` of ``dataset`` as uint8 ``(N, C, H, W)``: gathered from its ``data`` array in one
    indexing op, or (:class:`FileImages`) read from their files."""
    if isinstance(dataset, FileImages):
        return _read_images([dataset.files[i] for i in indices], dataset.size)
    data = getattr(dataset, "data", None)
    if data is None:
        raise TypeError(f"{type(dataset).__name__} has no 'data' array to gather images from")
    images = torch.as_tensor(np.asarray(data)[indices])
    if images.dim() == 3:  # (N, H, W): greyscale
        images = images.unsqueeze(1)
    elif images.shape[-1] in (1, 3):  # (N, H, W, C): torchvision's CIFAR layout
        images = images.permute(0, 3, 1, 2)
    return images.contiguous()


def images_of(subset: TaskSubset) -> Tuple[Tensor, Tensor]:
    """A task subset as uint8 ``(N, C, H, W)`` images and int64 labels."""
    return read_images(subset.dataset, subset.indices.numpy()), subset.targets.clone()


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


def check_folder_options(
    name: str, image_size: Optional[int], test_fraction: Optional[float], split_dir: Optional[str]
) -> None:
    """Raise ValueError when options that only a ``folder:`` dataset takes are given for another one."""
    if not name.startswith(FOLDER_PREFIX) and (image_size, test_fraction, split_dir) != (None, None, None):
        raise ValueError(
            f"image_size, test_fraction and split_dir apply to folder: datasets, not {name!r} (to feed a model "
            "another size, use input_size)"
        )


def load_split(
    name: str,
    root: str,
    *,
    image_size: Optional[int] = None,
    test_fraction: Optional[float] = None,
    split_dir: Optional[str] = None,
    classes_per_task: Optional[int] = None,
    first_task_classes: Optional[int] = None,
    class_order_seed: Optional[int] = None,
) -> Tuple[DatasetSpec, SplitDataset]:
    """``(spec, task_dict)`` for dataset ``name``, split into tasks, with no image read yet (a folder's files
    are only listed; torchvision's datasets are read whole, as they come).

    ``image_size``, ``test_fraction`` and ``split_dir`` apply to ``folder:`` datasets (:func:`folder_spec`);
    the split options to any class-incremental one (:meth:`DatasetSpec.with_split`).
    """
    check_folder_options(name, image_size, test_fraction, split_dir)
    if name.startswith(FOLDER_PREFIX):
        spec = folder_spec(name[len(FOLDER_PREFIX) :], image_size or 32, test_fraction, split_dir)
    else:
        spec = DATASETS[name]
    spec = spec.with_split(classes_per_task, first_task_classes, class_order_seed)
    return spec, SplitDataset(root, spec)


def read_tasks(tasks: SplitDataset) -> List[Tuple[Tensor, Tensor, Tensor, Tensor]]:
    """``[(train_x, train_y, test_x, test_y) per task]``: every task's images read into memory as uint8."""
    return [(*images_of(t.train_set), *images_of(t.test_set)) for t in tasks.values()]


def load_tasks(
    name: str, root: str, **options: Any
) -> Tuple[DatasetSpec, List[Tuple[Tensor, Tensor, Tensor, Tensor]], SplitDataset]:
    """``(spec, [(train_x, train_y, test_x, test_y) per task], task_dict)`` for dataset ``name``: :func:`load_split`
    (which takes the ``options``), then every image read into memory (:func:`read_tasks`).

    For a scenario dataset (``spec.scenario``) the list has one entry, the base data restricted to the
    scenario's classes, untransformed: the experiment builds the tasks or the stream from it.
    """
    spec, tasks = load_split(name, root, **options)
    return spec, read_tasks(tasks), tasks


# ---------------------------------------------------------------------------- image folders
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
# Natural images: standardised with ImageNet's statistics (a folder's own are unknown until it is read).
_FOLDER_MEAN, _FOLDER_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# Folders an archiver or OS leaves beside the data (a macOS zip's resource forks): never a class.
_NOT_DATA = ("__MACOSX",)


def _class_folders(path: str) -> List[str]:
    return sorted(
        d
        for d in os.listdir(path)
        if not d.startswith(".") and d not in _NOT_DATA and os.path.isdir(os.path.join(path, d))
    )


def _image_files(folder: str) -> List[str]:
    """The images under ``folder``, at any depth (TinyImageNet's train/<class>/images/ too), sorted. Linked
    folders are followed, each real folder once; a link to ``folder`` itself or above it is not (it would
    loop, or reach other classes' images)."""
    root = os.path.realpath(folder)
    found, seen = [], {root}
    for parent, dirs, files in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(d for d in dirs if not d.startswith(".") and d not in _NOT_DATA):
            real = os.path.realpath(os.path.join(parent, d))
            if real not in seen and os.path.commonpath([real, root]) != real:
                seen.add(real)
                keep.append(d)
        dirs[:] = keep
        # Hidden files are no images (macOS's ._name.png resource forks among them).
        found += [os.path.join(parent, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS) and f[0] != "."]
    return sorted(found)


ANNOTATIONS = "val_annotations.txt"  # TinyImageNet's val/: one images/ folder, labels in this file


def _held_out_part(path: str, classes: List[str]) -> Optional[str]:
    """The labelled held-out folder beside ``train/``: ``test/`` or ``val/`` with the same class folders, or
    TinyImageNet's ``val/`` with its annotation file; None when there is none (hold a fraction out)."""
    for part in ("test", "val"):
        folder = os.path.join(path, part)
        if os.path.isdir(folder) and (
            _class_folders(folder) == classes or os.path.isfile(os.path.join(folder, ANNOTATIONS))
        ):
            return part
    return None


def _class_differences(path: str, classes: List[str]) -> str:
    """Which class folders ``train/`` and each of ``test/``/``val/`` do not share ('' where none is there)."""
    notes = []
    for part in ("test", "val"):
        folder = os.path.join(path, part)
        if not os.path.isdir(folder):
            continue
        theirs = set(_class_folders(folder))
        sides = (("train/", set(classes) - theirs), (f"{part}/", theirs - set(classes)))
        differences = [f"only in {where}: {_some(names)}" for where, names in sides if names]
        if differences:
            notes.append(f"{part}/ differs ({'; '.join(differences)})")
    return "; " + "; ".join(notes) if notes else ""


def _some(names: Set[str]) -> str:
    shown = sorted(names)
    return ", ".join(shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")


def _folder_layout(path: str) -> Tuple[List[str], Optional[str]]:
    """The class names, and the held-out part (``test``/``val``) when ``path`` holds ``train/`` beside it;
    else (None) ``path`` is one tree of class folders."""
    if not os.path.isdir(path):
        raise DatasetUnavailable(f"folder dataset {path!r} is not a directory")
    if os.path.isdir(os.path.join(path, "train")):
        classes = _class_folders(os.path.join(path, "train"))
        held_out = _held_out_part(path, classes)
        if held_out is None:
            raise DatasetUnavailable(
                f"{path}: beside train/ there must be test/ (or val/) with the same class folders, or TinyImageNet's "
                f"val/ with {ANNOTATIONS}{_class_differences(path, classes)}"
            )
    else:
        classes, held_out = _class_folders(path), None
    if len(classes) < 2:
        raise DatasetUnavailable(
            f"{path} holds {len(classes)} class folder(s): expected train/ and test/ with one folder per class, "
            "or one folder per class"
        )
    return classes, held_out


def _annotated(folder: str, classes: List[str]) -> Dict[str, List[str]]:
    """``{class: files}`` from TinyImageNet's ``val_annotations.txt`` (file name, class, box, tab-separated).
    A listed file that is missing, or a class that is not a ``train/`` folder, is refused with its line."""
    index: Dict[str, List[str]] = {c: [] for c in classes}
    listing = os.path.join(folder, ANNOTATIONS)
    with open(listing, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if not line.strip():
                continue
            if len(fields) < 2 or fields[1] not in index:
                raise DatasetUnavailable(f"{listing}, line {number}: {line.strip()!r} names no class of train/")
            file = os.path.join(folder, "images", fields[0])
            if not os.path.isfile(file):
                raise DatasetUnavailable(f"{listing}, line {number}: no file {file}")
            index[fields[1]].append(file)
    return {c: sorted(files) for c, files in index.items()}


def folder_spec(
    path: str,
    image_size: int = 32,
    test_fraction: Optional[float] = None,
    split_dir: Optional[str] = None,
    *,
    read_split: bool = True,
) -> DatasetSpec:
    """A dataset of the images under ``path``, in ImageFolder layout: ``train/`` and ``test/`` (or ``val/``)
    with one folder per class, or one folder per class. One tree is split by the list files in ``split_dir``
    or beside it (:mod:`~synapse.experiments.split_lists`), else ``test_fraction`` (default 0.2) of every
    class is held out (the same items for every run: a fixed seed). TinyImageNet reads as it is: images at any depth
    below their class folder (``train/<wnid>/images/``), and ``val/`` labelled by ``val_annotations.txt``.
    Images are read as RGB and resized to ``image_size`` squared
    (bilinear) when loaded; the CIFAR protocol applies (augmentation included). Classes are numbered in
    the folders' sorted order, split into 5 tasks when their number allows it (else one class per task).
    ``read_split=False`` checks the layout only and leaves the split to the load (the registry's spec: its
    protocol and classes, with no list files read).

    Example:
        >>> spec = folder_spec("my_images", image_size=64)  # doctest: +SKIP
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int of at least 8, got {image_size!r}")
    if test_fraction is not None and not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    classes, held_out = _folder_layout(path)
    def split_now() -> Tuple[Optional[Split], str]:
        return _test_split(path, classes, held_out, test_fraction, split_dir)

    split, test_split = split_now() if read_split else (None, "")
    k = len(classes)
    return DatasetSpec(
        f"{FOLDER_PREFIX}{path}",
        k,
        k // 5 if k % 5 == 0 else 1,
        in_channels=3,
        image_size=image_size,
        mean=_FOLDER_MEAN,
        std=_FOLDER_STD,
        augment=True,
        protocol=_CIFAR_PROTOCOL,
        load=lambda root: _load_folder(path, image_size, test_fraction or 0.2, split if read_split else split_now()[0]),
        test_split=test_split,
    )


def _test_split(
    path: str, classes: List[str], held_out: Optional[str], test_fraction: Optional[float], split_dir: Optional[str]
) -> Tuple[Optional[Split], str]:
    """A folder's split lists (:class:`~synapse.experiments.split_lists.Split`, checked) or None, and where its
    test set comes from, in words."""
    from .split_lists import find_split  # it imports this module (DatasetUnavailable)

    if held_out is not None:
        if split_dir is not None or test_fraction is not None:
            raise DatasetUnavailable(
                f"{path} holds train/ and {held_out}/: that is its split, so split_dir and test_fraction do not apply"
            )
        annotated = os.path.isfile(os.path.join(path, held_out, ANNOTATIONS))
        return None, f"the images in {held_out}/" + (f", labelled by {ANNOTATIONS}" if annotated else "")
    split = find_split(path, classes, split_dir)
    if split is None:
        fraction = 0.2 if test_fraction is None else test_fraction
        return None, f"{fraction:g} of every class held out, the same items every run (no split lists in {path})"
    if test_fraction is not None:
        raise DatasetUnavailable(f"test_fraction does not apply: the test set is given by {split.why}")
    return split, split.why


def _read_images(files: Sequence[str], size: int) -> Tensor:
    """uint8 ``(N, 3, size, size)``: every file as RGB, resized (bilinear). 16-bit greyscale images are scaled
    to 8 bits (``convert("RGB")`` alone would clip them at 255); a file that cannot be read is named."""
    from PIL import Image

    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as opened:
                image: Image.Image = opened
                if image.mode.startswith("I;16"):
                    image = Image.fromarray((np.asarray(image, dtype=np.uint32) // 257).astype(np.uint8))
                out[i] = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
            raise DatasetUnavailable(f"cannot read image {f}: {e} (remove or replace the file)") from e
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _load_folder(path: str, size: int, test_fraction: float, split: Optional[Split]) -> Tuple[Dataset, Dataset]:
    """The train and test parts of a folder: ``split``'s lists (a checked
    :class:`~synapse.experiments.split_lists.Split`), else its layout's."""
    classes, held_out = _folder_layout(path)
    parts = (
        {"train": split.train, "test": split.test}
        if split is not None
        else _listed(path, classes, held_out, test_fraction)
    )
    for part, what in (("train", "training"), ("test", "test")):
        present = set(parts[part][1])
        empty = [c for i, c in enumerate(classes) if i not in present]
        if empty:  # a task without test images would score 0% and pull the averages down, silently
            listed = "in the split list" if split is not None else f"({', '.join(IMAGE_EXTENSIONS)})"
            held = "" if part == "train" or split is not None or held_out else " (a class needs 2 images or more)"
            raise DatasetUnavailable(f"{path}: no {what} images {listed} for class folder(s) {empty}{held}")
    train, test = (
        FileImages(files, torch.tensor(labels, dtype=torch.int64), size)
        for files, labels in (_in_turns(*parts["train"]), _in_turns(*parts["test"]))
    )
    return train, test


def _in_turns(files: List[str], labels: List[int]) -> Tuple[List[str], List[int]]:
    """The items one class after another in turns (each class's own order kept), so that a task's first
    ``n`` items (``--max_train_per_task``) hold its classes alike rather than its first class alone."""
    counts: Dict[int, int] = {}
    turn = []
    for label in labels:
        turn.append(counts.get(label, 0))
        counts[label] = turn[-1] + 1
    order = sorted(range(len(files)), key=lambda i: (turn[i], labels[i]))
    return [files[i] for i in order], [labels[i] for i in order]


def _listed(
    path: str, classes: List[str], held_out: Optional[str], test_fraction: float
) -> Dict[str, Tuple[List[str], List[int]]]:
    """The files and labels of each part, from the layout: ``train/`` and ``held_out/``, or one tree of which
    ``test_fraction`` of every class is held out."""
    parts: Dict[str, Tuple[List[str], List[int]]] = {"train": ([], []), "test": ([], [])}
    generator = torch.Generator().manual_seed(0)  # the held-out items never change between runs
    annotated = None
    if held_out is not None and os.path.isfile(os.path.join(path, held_out, ANNOTATIONS)):
        annotated = _annotated(os.path.join(path, held_out), classes)
    for label, name in enumerate(classes):
        if held_out is not None:
            for part, files in (
                ("train", _image_files(os.path.join(path, "train", name))),
                ("test", annotated[name] if annotated else _image_files(os.path.join(path, held_out, name))),
            ):
                parts[part][0].extend(files)
                parts[part][1].extend([label] * len(files))
            continue
        files = _image_files(os.path.join(path, name))
        held = max(1, round(test_fraction * len(files))) if len(files) > 1 else 0
        order = torch.randperm(len(files), generator=generator).tolist()
        for part, chosen in (("test", order[:held]), ("train", order[held:])):
            parts[part][0].extend(files[i] for i in sorted(chosen))
            parts[part][1].extend([label] * len(chosen))
    return parts
