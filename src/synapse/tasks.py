"""Split a torchvision-style classification dataset into tasks of disjoint classes."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, Iterator, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["Task", "TaskDict", "TaskSubset", "dataset_targets"]

Transform = Callable[[Any], Any]


def dataset_targets(dataset: Dataset) -> Tensor:
    """All labels of ``dataset`` as an int64 tensor.

    Uses the ``targets`` attribute of torchvision-style datasets; otherwise reads ``dataset[i][1]`` for
    every item (slow, but it works for any map-style dataset of ``(input, label)`` pairs).
    """
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]
    return torch.as_tensor(targets, dtype=torch.int64).reshape(-1)


class TaskSubset(Dataset):
    """The items of ``dataset`` at ``indices``, with the task's own transforms applied on access."""

    def __init__(
        self,
        dataset: Dataset,
        indices: Tensor,
        targets: Tensor,
        transform: Optional[Transform] = None,
        target_transform: Optional[Transform] = None,
    ) -> None:
        self.dataset = dataset
        self.indices = indices
        self.targets = targets
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Tuple[Any, Any]:
        x, y = self.dataset[int(self.indices[i])]
        if self.transform is not None:
            x = self.transform(x)
        if self.target_transform is not None:
            y = self.target_transform(y)
        return x, y


@dataclass(frozen=True)
class Task:
    """One task: its key, its train and test subsets, and the classes it covers."""

    key: Hashable
    train_set: TaskSubset
    test_set: TaskSubset
    targets: Tuple[int, ...]


class TaskDict(Mapping[Hashable, Task], ABC):
    """An ordered mapping ``key -> Task`` that splits one dataset by class.

    Subclasses say where the data comes from through ``_train_set`` and ``_test_set``, in either of two
    forms: methods that take ``root`` (the form used throughout this package), or properties that take
    no argument and may read ``self.root`` (the form of Synapse's first documentation, so that code
    written from it keeps working). Each is read exactly once, while the instance is built, after
    ``root`` and the split's mappings are stored on the instance. Samples whose class belongs to no task
    are left out, so a subset of the classes is a valid experiment; a class listed under two tasks is an
    error. The split is vectorised: one lookup table maps every label to its task at once.

    Args:
        root: where the dataset lives; passed to ``_train_set``/``_test_set`` methods, and stored as
            ``self.root`` for the property form.
        key_to_targets: ``{task key: classes of that task}``, in task order.
        key_to_transform: optional ``{task key: input transform}`` for tasks that need one.
        key_to_target_transform: optional ``{task key: target transform}``.

    Raises:
        ValueError: the split is malformed (no tasks, a task without classes, a class in two tasks, a
            transform for a key that is not a task).
        TypeError: ``_train_set`` or ``_test_set`` gives something that is not a map-style dataset.

    Example:
        The method form, which receives ``root`` (the torchvision lines read or download a dataset, so
        they are not run as doctests):

        >>> class SplitFashionMNIST(TaskDict):
        ...     def _train_set(self, root):
        ...         return torchvision.datasets.FashionMNIST(root, train=True)
        ...     def _test_set(self, root):
        ...         return torchvision.datasets.FashionMNIST(root, train=False)
        >>> tasks = SplitFashionMNIST("data", {t: (2 * t, 2 * t + 1) for t in range(5)})  # doctest: +SKIP
        >>> x, y = tasks[0].train_set[0]  # doctest: +SKIP

        The property form, which reads ``self.root``:

        >>> class CIFAR10TaskDict(TaskDict):
        ...     @property
        ...     def _train_set(self):
        ...         return self._create_dataset(train=True)
        ...     @property
        ...     def _test_set(self):
        ...         return self._create_dataset(train=False)
        ...     def _create_dataset(self, train):
        ...         return torchvision.datasets.CIFAR10(self.root, train=train, download=True)
        >>> tasks = CIFAR10TaskDict(  # doctest: +SKIP
        ...     root="datasets", key_to_targets={"1": [0, 1], "2": [2, 3], "3": [4, 5]}
        ... )

        Any map-style dataset of ``(input, label)`` pairs works, e.g. tensors of your own:

        >>> from torch.utils.data import TensorDataset
        >>> class RandomSplit(TaskDict):
        ...     def _train_set(self, root):
        ...         return TensorDataset(torch.randn(40, 8), torch.arange(40) % 4)
        ...     def _test_set(self, root):
        ...         return TensorDataset(torch.randn(20, 8), torch.arange(20) % 4)
        >>> tasks = RandomSplit("unused", {0: (0, 1), 1: (2, 3)})
        >>> tasks
        RandomSplit(0: (0, 1), 1: (2, 3))
        >>> len(tasks[1].train_set), tasks[1].targets
        (20, (2, 3))
        >>> x, y = tasks[1].train_set[0]
        >>> int(y)
        2
    """

    def __init__(
        self,
        root: str,
        key_to_targets: Mapping[Any, Sequence[int]],
        key_to_transform: Optional[Mapping[Any, Transform]] = None,
        key_to_target_transform: Optional[Mapping[Any, Transform]] = None,
    ) -> None:
        classes = _check_split(key_to_targets, key_to_transform, key_to_target_transform)
        # Stored before the datasets are read: the property form builds its dataset from these.
        self.root = root
        self.key_to_targets: Dict[Hashable, Tuple[int, ...]] = classes
        self.key_to_transform: Dict[Hashable, Transform] = dict(key_to_transform or {})
        self.key_to_target_transform: Dict[Hashable, Transform] = dict(key_to_target_transform or {})
        train, test = self._read_dataset("_train_set"), self._read_dataset("_test_set")
        train_split = _split_by_class(dataset_targets(train), classes)
        test_split = _split_by_class(dataset_targets(test), classes)
        self._tasks: Dict[Hashable, Task] = {}
        for key, task_classes in classes.items():
            transform, target_transform = self.key_to_transform.get(key), self.key_to_target_transform.get(key)
            subsets = [
                TaskSubset(ds, idx, tgt, transform, target_transform)
                for ds, (idx, tgt) in ((train, train_split[key]), (test, test_split[key]))
            ]
            self._tasks[key] = Task(key, subsets[0], subsets[1], task_classes)

    def _read_dataset(self, name: str) -> Dataset:
        """The dataset that ``_train_set`` or ``_test_set`` (``name``) describes, in either form.

        A method is called with ``self.root`` (or with nothing, if it takes no argument); a property, or
        any other attribute, is read as it is. Whatever comes back must be a map-style dataset.
        """
        source = getattr(self, name)  # the property form is evaluated here, once
        if inspect.ismethod(source) or inspect.isfunction(source):
            takes_root = any(
                p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
                for p in inspect.signature(source).parameters.values()
            )
            source = source(self.root) if takes_root else source()
        if not (hasattr(source, "__getitem__") and hasattr(source, "__len__")):
            raise TypeError(
                f"{type(self).__name__}.{name} gave {type(source).__name__}, not a dataset: define "
                f"'{name}(self, root)' or a property '{name}' that returns a map-style dataset "
                "(with __len__ and __getitem__ giving (input, label) pairs)"
            )
        return source

    @abstractmethod
    def _train_set(self, root: str) -> Dataset:
        """The full training set (labels via ``targets`` or ``dataset[i][1]``); may be a property instead."""

    @abstractmethod
    def _test_set(self, root: str) -> Dataset:
        """The full test set; may be a property instead."""

    def __getitem__(self, key: Hashable) -> Task:
        return self._tasks[key]

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)

    def __repr__(self) -> str:
        parts = ", ".join(f"{k!r}: {t.targets}" for k, t in self._tasks.items())
        return f"{type(self).__name__}({parts})"


def _check_split(
    key_to_targets: Mapping[Any, Sequence[int]],
    key_to_transform: Optional[Mapping[Any, Transform]],
    key_to_target_transform: Optional[Mapping[Any, Transform]],
) -> Dict[Hashable, Tuple[int, ...]]:
    if not isinstance(key_to_targets, Mapping) or not key_to_targets:
        raise ValueError(f"key_to_targets must be a non-empty mapping of task -> classes, got {key_to_targets!r}")
    owner: Dict[int, Hashable] = {}
    classes: Dict[Hashable, Tuple[int, ...]] = {}
    for key, targets in key_to_targets.items():
        if isinstance(targets, (str, bytes)) or not isinstance(targets, Sequence) or not targets:
            raise ValueError(f"task {key!r} must list at least one class, got {targets!r}")
        for c in targets:
            if isinstance(c, bool) or not isinstance(c, int) or c < 0:
                raise ValueError(f"task {key!r} has class {c!r}; classes are non-negative ints")
            if c in owner:
                raise ValueError(f"class {c} is assigned to both task {owner[c]!r} and task {key!r}")
            owner[c] = key
        classes[key] = tuple(targets)
    for name, mapping in (("key_to_transform", key_to_transform), ("key_to_target_transform", key_to_target_transform)):
        unknown = set(mapping or {}) - set(classes)
        if unknown:
            raise ValueError(f"{name} has keys {sorted(map(repr, unknown))} that are not tasks of key_to_targets")
    return classes


def _split_by_class(
    labels: Tensor, classes: Mapping[Hashable, Tuple[int, ...]]
) -> Dict[Hashable, Tuple[Tensor, Tensor]]:
    """``{task: (indices, labels)}`` of the samples whose label belongs to each task."""
    num_labels = int(max(labels.max().item() if labels.numel() else 0, *(max(c) for c in classes.values()))) + 1
    task_of_class = torch.full((num_labels,), -1, dtype=torch.int64)
    for position, task_classes in enumerate(classes.values()):
        task_of_class[list(task_classes)] = position
    task_of_sample = task_of_class[labels]
    # One stable sort groups the samples by task, keeping the dataset's order within each task.
    order = torch.argsort(task_of_sample, stable=True)
    counts = torch.bincount(task_of_sample + 1, minlength=len(classes) + 1).tolist()
    groups = torch.split(order, counts)[1:]  # group 0 holds the samples of no task
    return {key: (idx, labels[idx]) for key, idx in zip(classes, groups)}
