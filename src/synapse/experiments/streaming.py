"""Data too large for the training device: streamed from the host in batches, or held on the device.

The in-memory path (the default for data that fits) holds every task's images on the training device as
uint8, and a batch is one gather there. The streaming path leaves them on the host (a folder's images in
their files, torchvision's arrays in host memory): ``DataLoader`` workers read each batch, into pinned
memory on a GPU machine, and it is copied to the device without blocking. Both paths read the same batches
in the same order (the run's shuffled order, cut the same way), and augmentation runs on the device either
way, so a run gives the same results on both. :func:`choose` picks one from the data's size and a memory
budget, and says why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from synapse.tasks import TaskSubset

from .datasets import DatasetSpec, SplitDataset, read_images

DATA_PATHS = ("auto", "memory", "stream")
# Streaming's default workers: enough to keep a GPU fed with decoded images, never more than the CPUs.
DEFAULT_WORKERS = 4


class _Reader(Dataset):
    """The DataLoader's view of a :class:`Streamed` set: a batch of positions -> ``(uint8 images, labels)``."""

    def __init__(self, base: Dataset, indices: np.ndarray, labels: Tensor) -> None:
        self.base, self.indices, self.labels = base, indices, labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor]:
        images, labels = self.__getitems__([i])
        return images[0], labels[0]

    def __getitems__(self, positions: List[int]) -> Tuple[Tensor, Tensor]:  # a whole batch in one read
        return read_images(self.base, self.indices[positions]), self.labels[positions]


def _as_batch(batch: Any) -> Any:
    return batch  # the reader returns whole batches: nothing to collate


class Streamed:
    """A task's images left on the host: ``base``'s items at ``indices``, with their ``labels`` (host int64).

    Indexing with a slice or an index tensor gives the chosen items, still unread (the quick-run limits and
    the validation split); :meth:`batches` reads them.

    Args:
        base: a dataset :func:`~synapse.experiments.datasets.read_images` reads (an in-memory array, or
            image files).
        indices: the items of ``base``, in the set's order.
        labels: their labels.
        device: where the batches go.
        workers: ``DataLoader`` worker processes (0: read in this process).
    """

    def __init__(self, base: Dataset, indices: np.ndarray, labels: Tensor, device: torch.device, workers: int) -> None:
        if len(indices) != len(labels):
            raise ValueError(f"{len(indices)} indices but {len(labels)} labels")
        self.base, self.indices, self.labels = base, np.asarray(indices, dtype=np.int64), labels.cpu()
        self.device, self.workers = device, workers

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, which: Union[slice, Tensor]) -> Streamed:
        pos = np.arange(len(self.indices))[which] if isinstance(which, slice) else which.cpu().numpy()
        return Streamed(self.base, self.indices[pos], self.labels[torch.as_tensor(pos)], self.device, self.workers)

    def to(self, device: torch.device) -> Streamed:
        """Itself: its batches are moved to its device as they are read (a tensor's ``.to`` for the callers)."""
        return self

    @staticmethod
    def cat(parts: Sequence[Streamed]) -> Streamed:
        """The parts one after another (tasks of one dataset, e.g. a joint run's)."""
        first = parts[0]
        if any(p.base is not first.base for p in parts):
            raise ValueError("only sets of one dataset can be joined")
        indices = np.concatenate([p.indices for p in parts])
        return Streamed(first.base, indices, torch.cat([p.labels for p in parts]), first.device, first.workers)

    def batches(self, index_batches: Iterable[Tensor]) -> Iterator[Tuple[Tensor, Tensor]]:
        """``(images, labels)`` on the device for each batch of positions, read ahead by the workers."""
        loader = DataLoader(
            _Reader(self.base, self.indices, self.labels),
            batch_sampler=[b.tolist() for b in index_batches],
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            collate_fn=_as_batch,
        )
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


Images = Union[Tensor, Streamed]


def batches(images: Images, labels: Tensor, index_batches: Iterable[Tensor]) -> Iterator[Tuple[Tensor, Tensor]]:
    """``(images[idx], labels[idx])`` for each ``idx``: gathered on the device, or read by a :class:`Streamed`."""
    if isinstance(images, Streamed):
        yield from images.batches(index_batches)
    else:
        for idx in index_batches:
            yield images[idx], labels[idx]


def cat(parts: Sequence[Images]) -> Images:
    """``torch.cat`` of in-memory images, :meth:`Streamed.cat` of streamed ones."""
    return Streamed.cat(parts) if isinstance(parts[0], Streamed) else torch.cat(parts)  # type: ignore[arg-type]


def streamed_tasks(
    tasks: SplitDataset, device: torch.device, workers: int
) -> List[Tuple[Streamed, Tensor, Streamed, Tensor]]:
    """``load_tasks``' list, with every task's images left unread: ``(train, labels, test, labels)`` per task."""

    def unread(part: TaskSubset) -> Streamed:
        return Streamed(part.dataset, part.indices.numpy(), part.targets.clone(), device, workers)

    return [
        (unread(t.train_set), t.train_set.targets.clone(), unread(t.test_set), t.test_set.targets.clone())
        for t in tasks.values()
    ]


@dataclass(frozen=True)
class DataPath:
    """Which path a run's data takes, and why, in words (printed at the start of the run)."""

    stream: bool
    why: str


def default_budget(device: torch.device) -> Tuple[int, str]:
    """Bytes of data the in-memory path may hold: a quarter of the GPU's memory, or of the host's on a CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4, f"a quarter of {device}'s memory"
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // 4, "a quarter of the host's memory"


def data_bytes(spec: DatasetSpec, tasks: SplitDataset, max_train: Optional[int], max_test: Optional[int]) -> int:
    """The uint8 bytes the in-memory path would hold: every task's train and test images, within the limits."""
    count = 0
    for task in tasks.values():
        for part, limit in ((task.train_set, max_train), (task.test_set, max_test)):
            count += len(part) if limit is None else min(len(part), limit)
    return count * spec.in_channels * spec.image_size**2


def choose(
    data: str,
    budget_gb: Optional[float],
    spec: DatasetSpec,
    tasks: SplitDataset,
    device: torch.device,
    max_train: Optional[int] = None,
    max_test: Optional[int] = None,
) -> DataPath:
    """The path for ``data`` (``'auto'``, ``'memory'`` or ``'stream'``): ``'auto'`` holds the data on the
    device when its uint8 size is within the budget (``budget_gb``, else :func:`default_budget`), and
    streams it otherwise. Scenario datasets (MNIST-sized, transformed on the device) are always held."""
    if data not in DATA_PATHS:
        raise ValueError(f"data must be one of {DATA_PATHS}, got {data!r}")
    size = data_bytes(spec, tasks, max_train, max_test)
    if spec.scenario is not None:
        if data == "stream":
            raise ValueError(f"{spec.name} is a {spec.scenario.kind} scenario, built on the device: it cannot stream")
        return DataPath(False, f"held in {device} memory ({size / 1e9:.3g} GB; a scenario is built there)")
    if budget_gb is None:
        budget, source = default_budget(device)
    else:
        budget, source = int(budget_gb * 1e9), "--data_budget"
    fits = size <= budget
    stream = data == "stream" or (data == "auto" and not fits)
    reason = (
        "as asked (--data " + data + ")"
        if data != "auto"
        else f"{'within' if fits else 'over'} the budget of {budget / 1e9:.3g} GB ({source})"
    )
    where = "streamed from the host by a DataLoader" if stream else f"held in {device} memory"
    return DataPath(stream, f"{where}: {size / 1e9:.3g} GB of uint8 images, {reason}")
