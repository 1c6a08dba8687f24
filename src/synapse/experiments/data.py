"""Data preparation: each task's train, validation and test sets on the training device, from a dataset's
tensors; for scenario datasets, the per-task transformation (domain-IL) or the task-free stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from synapse.scenarios import DomainIncremental, TaskFreeStream, mnist360, mnist360_test_angles, rotate, scenario

from .config import Config
from .datasets import DatasetSpec
from .streaming import Images

Pair = Tuple[Images, Tensor]  # images held on the device, or a streamed set of them; their labels


@dataclass
class TaskData:
    """Per task: ``(inputs, labels)`` to train on, to validate on, and to score. ``domain``/``stream``: the
    scenario that made them, if any (a domain-IL transformation, or the task-free stream)."""

    train_sets: List[Pair] = field(default_factory=list)
    val_sets: List[Pair] = field(default_factory=list)
    test_sets: List[Pair] = field(default_factory=list)
    domain: Optional[DomainIncremental] = None
    stream: Optional[TaskFreeStream] = None


def prepare(
    cfg: Config, spec: DatasetSpec, tensors: Sequence[Tuple[Any, ...]], device: torch.device, gen: torch.Generator
) -> TaskData:
    """The run's task data from ``read_tasks``' tensors, or ``streamed_tasks``' unread sets (which take the
    same limits and split, and stay on the host): quick-run limits, the validation split (drawn from
    ``gen``), every set moved to ``device``; with ``evaluate_on='validation'`` the validation sets stand in
    for the test sets (tuning never reads the test sets)."""
    data = TaskData()
    if spec.scenario is None:
        for train_x, train_y, test_x, test_y in tensors:
            train_x, train_y = _limit(train_x, train_y, cfg.max_train_per_task)
            tx, ty, vx, vy = _split_validation(train_x, train_y, cfg.validation_ratio, gen)
            # Each task is held on the training device once (uint8: CIFAR-100's train set is 150 MB).
            data.train_sets.append((tx.to(device), ty.to(device)))
            data.val_sets.append((vx.to(device), vy.to(device)))
            test_x, test_y = _limit(test_x, test_y, cfg.max_test_per_task)
            data.test_sets.append((test_x.to(device), test_y.to(device)))
    elif spec.scenario.kind == "domain-il":
        _domain_data(data, cfg, spec, device, gen, *tensors[0])
    else:
        _stream_data(data, cfg, spec, device, *tensors[0])
    if cfg.evaluate_on == "validation":
        data.test_sets = data.val_sets
    return data


def _domain_data(
    data: TaskData,
    cfg: Config,
    spec: DatasetSpec,
    device: torch.device,
    gen: torch.Generator,
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
) -> None:
    """Domain-IL: every task is the same images under the task's transformation. The training images are
    held once and transformed batch by batch on the device; the test (and validation) sets of every task
    are transformed once, up front, since every evaluation reads them all."""
    assert spec.scenario is not None
    domain = data.domain = scenario(
        spec.scenario.transform, spec.scenario.num_tasks, seed=cfg.seed, image_size=spec.image_size
    )
    train_x, train_y = _limit(train_x, train_y, cfg.max_train_per_task)
    tx, ty, vx, vy = _split_validation(train_x, train_y, cfg.validation_ratio, gen)
    tx, ty, vx, vy = (t.to(device) for t in (tx, ty, vx, vy))
    test_x, test_y = (t.to(device) for t in _limit(test_x, test_y, cfg.max_test_per_task))
    for t in range(domain.num_tasks):
        data.train_sets.append((tx, ty))  # the same tensors: no copy per task
        data.val_sets.append((domain.transform(vx, t), vy))
        data.test_sets.append((domain.transform(test_x, t), test_y))


def _stream_data(
    data: TaskData,
    cfg: Config,
    spec: DatasetSpec,
    device: torch.device,
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
) -> None:
    """Task-free: the MNIST-360 stream over the training images, and one test set of every class rotated
    all the way round. The stream's inputs are rotated once, up front, in batches on the device (each
    position is seen once, and a step then costs one gather, however small the batch). Quick-run limits
    apply per class."""
    train_x, train_y = _limit_per_class(train_x, train_y, cfg.max_train_per_task)
    test_x, test_y = _limit_per_class(test_x, test_y, cfg.max_test_per_task)
    k = spec.num_classes
    stream = data.stream = mnist360(train_y, batch_size=cfg.batch_size or 1, seed=cfg.seed, num_classes=k).to(device)
    data.train_sets.append(stream.inputs(train_x.to(device), train_y.to(device)))
    data.val_sets.append((train_x[:0].to(device), train_y[:0].to(device)))
    angles = mnist360_test_angles(test_y, k).to(device)
    data.test_sets.append((rotate(test_x.to(device), angles), test_y.to(device)))


def _limit(x: Tensor, y: Tensor, n: Optional[int]) -> Tuple[Tensor, Tensor]:
    return (x, y) if n is None else (x[:n], y[:n])


def _limit_per_class(x: Tensor, y: Tensor, n: Optional[int]) -> Tuple[Tensor, Tensor]:
    """The first ``n`` items of every class, in dataset order (the task-free stream's quick-run limit)."""
    if n is None:
        return x, y
    keep = torch.cat([torch.nonzero(y == c).flatten()[:n] for c in torch.unique(y)]).sort().values
    return x[keep], y[keep]


def _split_validation(x: Tensor, y: Tensor, ratio: float, gen: torch.Generator) -> Tuple[Tensor, ...]:
    if ratio <= 0:
        return x, y, x[:0], y[:0]
    perm = torch.randperm(len(y), generator=gen)
    n_val = int(round(ratio * len(y)))
    val, train = perm[:n_val], perm[n_val:]
    return x[train], y[train], x[val], y[val]
