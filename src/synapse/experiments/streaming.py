"""Data too large for the training device: streamed from the host in batches, or held on the device.

The in-memory path (the default for data that fits) holds every task's images on the training device as
uint8, and a batch is one gather there. The streaming path leaves them on the host (a folder's images in
their files, torchvision's arrays in host memory): ``DataLoader`` workers read each batch, into pinned
memory on a GPU machine, and it is copied to the device without blocking. The workers of one dataset are
started once and serve every epoch and evaluation (:class:`Workers`). Both paths read the same batches
in the same order (the run's shuffled order, cut the same way), and augmentation runs on the device either
way, so a run gives the same results on both. :func:`choose` picks one from the data's size and a memory
budget, and says why.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

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
    """The DataLoader's view of a dataset: a batch of its item indices -> uint8 images."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Tensor:
        return self.__getitems__([i])[0]

    def __getitems__(self, items: List[int]) -> Tensor:  # a whole batch in one read
        return read_images(self.base, np.asarray(items, dtype=np.int64))


def _as_batch(batch: Any) -> Any:
    return batch  # the reader returns whole batches: nothing to collate


class _PassOrder:
    """A persistent loader's batch sampler: the batches of the pass about to start, handed over by
    :meth:`Workers.read` (the run's order, drawn from its own generator, never the loader's)."""

    def __init__(self) -> None:
        self._next: Iterator[List[int]] = iter(())

    def set(self, batches: Iterator[List[int]]) -> None:
        self._next = batches

    def __iter__(self) -> Iterator[List[int]]:
        return self._next  # the same iterator however often the loader asks (its start asks twice)


class Workers:
    """One ``DataLoader`` over ``base``, shared by every :class:`Streamed` set cut from it (a task's training,
    validation and test sets, a joint run's union): with ``workers > 0`` its worker processes start at the
    first pass and serve every later one (``persistent_workers``), instead of starting anew each epoch.

    The loader draws nothing from torch's global RNG (it has its own generator, which only seeds the
    workers, and they draw nothing): the run's global RNG state, checkpointed, is the same on either path.
    One pass at a time: a new pass abandons the previous one, which then refuses to go on.
    """

    def __init__(self, base: Dataset, device: torch.device, workers: int) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.base, self.device, self.workers = base, device, workers
        self._order = _PassOrder()
        self._loader: Optional[DataLoader] = None
        self._pass = 0

    def read(self, batches: Iterable[np.ndarray]) -> Iterator[Tensor]:
        """The uint8 images of each batch of ``base``'s item indices, in order, read ahead by the workers."""
        if self._loader is None:
            self._loader = DataLoader(
                _Reader(self.base),
                batch_sampler=self._order,
                num_workers=self.workers,
                persistent_workers=self.workers > 0,
                pin_memory=self.device.type == "cuda",
                collate_fn=_as_batch,
                generator=torch.Generator().manual_seed(0),
            )
        self._pass += 1
        mine = self._pass
        self._order.set(b.tolist() for b in batches)
        loader = iter(self._loader)  # a persistent loader's workers drop what a previous pass left unread
        for images in loader:
            yield images
            if self._pass != mine:
                raise RuntimeError("another pass over this data started while this one was unfinished")

    def close(self) -> None:
        """End the worker processes now (a later pass starts new ones)."""
        loader, self._loader = self._loader, None
        running = getattr(loader, "_iterator", None)  # a persistent loader's, which holds its workers
        if running is not None:
            # DataLoader has no public way to end persistent workers short of being collected; this is
            # what its own collection calls.
            running._shutdown_workers()
            loader._iterator = None  # type: ignore[union-attr]


class Streamed:
    """A task's images left on the host: ``base``'s items at ``indices``, with their ``labels`` (host int64).

    Indexing with a slice or an index tensor gives the chosen items, still unread (the quick-run limits and
    the validation split); :meth:`batches` reads them. Sets cut from one another share their
    :class:`Workers`.

    Args:
        base: a dataset :func:`~synapse.experiments.datasets.read_images` reads (an in-memory array, or
            image files).
        indices: the items of ``base``, in the set's order.
        labels: their labels.
        device: where the batches go.
        workers: ``DataLoader`` worker processes (0: read in this process), or the :class:`Workers` of
            another set of ``base``.
    """

    def __init__(
        self, base: Dataset, indices: np.ndarray, labels: Tensor, device: torch.device, workers: Union[int, Workers]
    ) -> None:
        if len(indices) != len(labels):
            raise ValueError(f"{len(indices)} indices but {len(labels)} labels")
        if isinstance(workers, Workers) and workers.base is not base:
            raise ValueError("the workers given read another dataset")
        self.base, self.indices, self.labels = base, np.asarray(indices, dtype=np.int64), labels.cpu()
        self.device = device
        self.readers = workers if isinstance(workers, Workers) else Workers(base, device, workers)

    @property
    def workers(self) -> int:
        return self.readers.workers

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, which: Union[slice, Tensor]) -> Streamed:
        pos = np.arange(len(self.indices))[which] if isinstance(which, slice) else which.cpu().numpy()
        return Streamed(self.base, self.indices[pos], self.labels[torch.as_tensor(pos)], self.device, self.readers)

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
        return Streamed(first.base, indices, torch.cat([p.labels for p in parts]), first.device, first.readers)

    def batches(self, index_batches: Iterable[Tensor]) -> Iterator[Tuple[Tensor, Tensor]]:
        """``(images, labels)`` on the device for each batch of positions, read ahead by the workers."""
        asked: Deque[Tensor] = deque()  # the positions the workers were given, in order: their labels

        def items() -> Iterator[np.ndarray]:
            for positions in index_batches:
                asked.append(positions)
                yield self.indices[positions.cpu().numpy()]

        for images in self.readers.read(items()):
            labels = self.labels[asked.popleft()]
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def close(self) -> None:
        """End its workers' processes now (shared with the sets cut from it; a later pass starts new ones)."""
        self.readers.close()


Images = Union[Tensor, Streamed]


def batches(images: Images, labels: Tensor, index_batches: Iterable[Tensor]) -> Iterator[Tuple[Tensor, Tensor]]:
    """``(images[idx], labels[idx])`` for each ``idx``: gathered on the device, or read by a :class:`Streamed`."""
    if isinstance(images, Streamed):
        yield from images.batches(index_batches)
    else:
        for idx in index_batches:
            yield images[idx], labels[idx]


def close(sets: Iterable[Tuple[Images, Tensor]]) -> None:
    """End the worker processes of the streamed sets among ``sets`` (a run's end; held ones need nothing)."""
    for images, _ in sets:
        if isinstance(images, Streamed):
            images.close()


def cat(parts: Sequence[Images]) -> Images:
    """``torch.cat`` of in-memory images, :meth:`Streamed.cat` of streamed ones."""
    return Streamed.cat(parts) if isinstance(parts[0], Streamed) else torch.cat(parts)  # type: ignore[arg-type]


def streamed_tasks(
    tasks: SplitDataset, device: torch.device, workers: int
) -> List[Tuple[Streamed, Tensor, Streamed, Tensor]]:
    """``load_tasks``' list, with every task's images left unread: ``(train, labels, test, labels)`` per task.
    The sets of one dataset (every task's training sets; every test set) share one :class:`Workers`."""
    readers: Dict[int, Workers] = {}

    def unread(part: TaskSubset) -> Streamed:
        shared = readers.setdefault(id(part.dataset), Workers(part.dataset, device, workers))
        return Streamed(part.dataset, part.indices.numpy(), part.targets.clone(), device, shared)

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
