"""One training loop and one evaluation, shared by joint, sequential and continual runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from synapse import Synapse
from synapse.augment import random_crop_flip

from .streaming import Images, Streamed, batches


def shard(indices: Tensor, rank: int, world: int) -> Tensor:
    """This rank's share of ``indices``, padded by wrapping so every rank gets as many (DistributedSampler's rule)."""
    if world == 1:
        return indices
    total = -(-len(indices) // world) * world
    padded = torch.cat([indices, indices[: total - len(indices)]]) if total > len(indices) else indices
    return padded[rank::world]


# An epoch's running (loss sum, correct predictions, items seen), as a mid-epoch checkpoint holds them.
Totals = Tuple[float, int, int]


@dataclass
class EpochResult:
    loss_sum: float
    correct: int
    seen: int
    completed: bool  # False when a stop was requested mid-epoch
    next_batch: int


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    synapse: Optional[Synapse],
    images: Images,
    labels: Tensor,
    order: Tensor,
    batch_size: int,
    start_batch: int,
    augment: bool,
    generator: torch.Generator,
    should_stop: Callable[[int, Callable[[], Totals]], bool],
    on_step: Callable[[], None],
    gather: Optional[Callable[[Tensor], Tuple[Tensor, Tensor]]] = None,
    boundaries: Optional[Sequence[int]] = None,
    log_every: int = 0,
    log_step: Optional[Callable[[Tensor, int], None]] = None,
    totals: Totals = (0.0, 0, 0),
    before_step: Optional[Callable[[int], None]] = None,
    clip_grad_norm: Optional[float] = None,
) -> EpochResult:
    """Train over ``order`` from batch ``start_batch``; stop early (resumably) when ``should_stop``.

    Before each batch, ``should_stop(next_batch, running_totals)`` may write a checkpoint (it calls
    ``running_totals()``, one host sync, only then) and says whether to stop. ``totals`` are the epoch's
    running (loss sum, correct, seen) from a mid-epoch checkpoint: the sums continue in float32 on the
    device, so a resumed epoch reports exactly the loss and accuracy of an uninterrupted one.

    ``images``, ``labels`` and ``order`` live on the model's device, so a batch is one gather there; or
    ``images`` is a :class:`~synapse.experiments.streaming.Streamed` set, whose workers read the batches of
    ``order`` (then on the host) ahead, from ``start_batch``.
    ``gather`` replaces ``images[idx], labels[idx]`` (scenarios transform their batches on the device), and
    ``boundaries`` replaces batches of ``batch_size``: batch ``b`` is ``order[boundaries[b]:boundaries[b + 1]]``
    (a task-free stream's own batches). Every ``log_every`` steps, ``log_step(interval_loss_sum, steps)``
    receives the loss summed over those steps, still on the device: the logger fetches it then, so the
    steps in between make no host sync. ``before_step(batch)`` runs before each batch's step (the lr
    schedule). ``clip_grad_norm``: the gradients of every parameter the optimizer updates are scaled to at
    most this total L2 norm between the backward pass and the step (None: not clipped).
    """
    # A method under which nothing in the model trains (the closed-form ones) runs the forwards in eval mode:
    # BatchNorm then normalises with, and keeps, the statistics predict() uses.
    model.train(getattr(synapse, "trains_model", True))
    device = next(model.parameters()).device
    loss_sum = torch.tensor(totals[0], dtype=torch.float32, device=device)
    correct = torch.tensor(totals[1], dtype=torch.int64, device=device)
    seen = totals[2]
    interval_loss = torch.zeros((), device=device)
    interval_steps = 0
    num_batches = len(boundaries) - 1 if boundaries is not None else -(-len(order) // batch_size)
    batch_index = start_batch

    def running() -> Totals:  # read only when a checkpoint is written: one host sync then
        return float(loss_sum), int(correct), seen

    def index_batches() -> Iterator[Tensor]:
        for b in range(start_batch, num_batches):
            if boundaries is not None:
                yield order[boundaries[b] : boundaries[b + 1]]
            else:
                yield order[b * batch_size : (b + 1) * batch_size]

    stepped = [p for group in optimizer.param_groups for p in group["params"]]
    # Gathered on the device, or read ahead by a streamed set's workers.
    source = batches(images, labels, index_batches()) if gather is None else map(gather, index_batches())
    while batch_index < num_batches:
        if should_stop(batch_index, running):
            break
        if before_step is not None:
            before_step(batch_index)
        inputs, targets = next(source)
        raw = inputs
        if augment:
            inputs = random_crop_flip(inputs, generator)
        outputs = model(inputs)
        loss = F.cross_entropy(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        if synapse is None:
            loss.backward()
        else:
            # A method that re-augments its replay stores the raw view; otherwise the view trained on.
            stored = raw if getattr(synapse, "replay_transform", None) is not None else inputs
            synapse.backward(loss, targets, inputs=stored)
        if clip_grad_norm is not None:
            # Where L2P's and DualPrompt's authors clip: after the backward pass, before the step. The norm
            # stays on the device (no finiteness check, which would read it on the host): no host sync.
            torch.nn.utils.clip_grad_norm_(stepped, clip_grad_norm, error_if_nonfinite=False, foreach=True)
        optimizer.step()
        # Accumulated on the device: one host sync per epoch, not per step.
        loss_sum += loss.detach() * len(targets)
        correct += (outputs.detach().argmax(1) == targets).sum()
        seen += len(targets)
        batch_index += 1
        if log_step is not None and log_every > 0:
            interval_loss += loss.detach()
            interval_steps += 1
            if interval_steps == log_every:
                log_step(interval_loss, interval_steps)
                interval_loss, interval_steps = torch.zeros((), device=device), 0
        on_step()
    return EpochResult(float(loss_sum), int(correct), seen, batch_index >= num_batches, batch_index)


class Evaluation(NamedTuple):
    class_il: List[float]  # accuracy per task, as a fraction
    task_il: List[float]
    samples: List[int]  # test samples scored per task, over all ranks


@torch.no_grad()
def evaluate(
    model: nn.Module,
    test_sets: Sequence[Tuple[Images, Tensor]],
    task_classes: Sequence[Sequence[int]],
    batch_size: int = 512,
    rank: int = 0,
    world: int = 1,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
    predict: Optional[Callable[[Tensor], Tensor]] = None,
) -> Evaluation:
    """Class-IL and Task-IL accuracy (fractions) on each task's test set.

    Class-IL takes the argmax over all classes; Task-IL only over the task's own classes. ``predict``
    replaces ``model(x)`` for methods with their own predictor (scores of shape ``(batch, classes)``). In a
    distributed run each rank scores a shard and the counts are summed, so the result covers the
    whole test set exactly once.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counts = torch.zeros(len(test_sets), 3, dtype=torch.int64, device=device)  # class-il, task-il, total
    for t in progress(range(len(test_sets))):
        images, labels = test_sets[t]
        own = torch.as_tensor(list(task_classes[t]), device=device)
        where = "cpu" if isinstance(images, Streamed) else labels.device  # a streamed set reads on the host
        mine = torch.arange(rank, len(labels), world, device=where)  # each sample once across ranks
        chunks = (mine[start : start + batch_size] for start in range(0, len(mine), batch_size))
        for x, y in batches(images, labels, chunks):
            logits = model(x) if predict is None else predict(x)
            counts[t, 0] += (logits.argmax(1) == y).sum()
            counts[t, 1] += (own[logits.index_select(1, own).argmax(1)] == y).sum()
            counts[t, 2] += len(y)
    if world > 1:
        dist.all_reduce(counts)
    model.train(was_training)
    c = counts.cpu().double()
    total = c[:, 2].clamp_min(1)
    return Evaluation((c[:, 0] / total).tolist(), (c[:, 1] / total).tolist(), counts[:, 2].tolist())
