"""Task-free streams (general continual learning): MNIST-360 over any labelled image set."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor

from ._checks import _check_count, _check_seed
from .geometry import INTERPOLATIONS, rotate


@dataclass(frozen=True)
class TaskFreeStream:
    """A task-free stream over a training set: which item comes at each position, how it is rotated, and
    how positions are grouped into batches. It holds indices, not images: :meth:`batch` gathers and
    rotates them from the images you pass, on their device.

    Attributes:
        indices: ``(L,)`` int64, the training item at each stream position (an item may repeat).
        angles: ``(L,)`` float64 degrees, counter-clockwise, per position; ``None``: no rotation.
        boundaries: batch ``b`` is positions ``boundaries[b]`` to ``boundaries[b + 1]`` (exclusive).
        segments: the classes that each stretch of the stream draws from, in order (documentation).
        info: what results files record about the stream.
    """

    indices: Tensor
    angles: Optional[Tensor]
    boundaries: Tuple[int, ...]
    segments: Tuple[Tuple[int, ...], ...] = ()
    interpolation: str = "nearest"
    info: Dict[str, Any] = None  # type: ignore[assignment]

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def num_batches(self) -> int:
        return len(self.boundaries) - 1

    def to(self, device: Union[str, torch.device]) -> TaskFreeStream:
        """The same stream with its indices and angles on ``device`` (what :meth:`gather` reads)."""
        angles = None if self.angles is None else self.angles.to(device)
        return replace(self, indices=self.indices.to(device), angles=angles)

    def gather(self, positions: Tensor, images: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        """The items at stream ``positions``: ``(inputs, targets)``, rotated on the images' device."""
        idx = self.indices[positions]
        inputs, targets = images[idx], labels[idx]
        if self.angles is not None:
            inputs = rotate(inputs, self.angles[positions], self.interpolation)
        return inputs, targets

    def inputs(self, images: Tensor, labels: Tensor, chunk: int = 4096) -> Tuple[Tensor, Tensor]:
        """The whole stream at once: ``(inputs, targets)`` in stream order, rotated on the images' device in
        batches of ``chunk`` (uint8 MNIST-360: 42 MB). Then batch ``b`` is ``inputs[boundaries[b]:boundaries[b+1]]``
        and a step costs one slice, however small its batch."""
        parts = [
            self.gather(torch.arange(s, min(s + chunk, len(self)), device=self.indices.device), images, labels)
            for s in range(0, len(self), chunk)
        ]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def batch(self, b: int, images: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        """Batch ``b`` of the stream."""
        positions = torch.arange(self.boundaries[b], self.boundaries[b + 1], device=self.indices.device)
        return self.gather(positions, images, labels)

    def batches(self, images: Tensor, labels: Tensor) -> Iterator[Tuple[Tensor, Tensor]]:
        """Every batch, in stream order: one pass, no task boundaries."""
        for b in range(self.num_batches):
            yield self.batch(b, images, labels)


def mnist360(
    labels: Tensor,
    batch_size: int = 16,
    seed: int = 0,
    num_classes: int = 9,
    rounds: int = 3,
    replacement: bool = False,
    blurry: float = 0.0,
    interpolation: str = "nearest",
) -> TaskFreeStream:
    """The MNIST-360 stream of the DER paper (general continual learning), over any labelled image set.

    Built as the authors' code builds it (mammoth ``datasets/mnist_360.py``, ``transforms/rotation.py``):

    * Classes ``0..num_classes-1`` (MNIST-360: digits 0-8; 9 is left out) come in pairs ``(0, 1), (1, 2),
      ..., (8, 0)``, one round of ``num_classes`` pairs, ``rounds`` rounds (3: 27 pairs).
    * Each class's training items, in dataset order, are cut into ``2 * rounds`` chunks of
      ``N_j // (2 * rounds) + 1`` items (the last one shorter); each pair in which the class appears uses
      the next chunk, taken from the end of the list as the authors' ``pop()`` does.
    * Each batch of ``batch_size`` mixes the pair's two classes in proportion to their remaining items:
      ``b0 = min(round(r0 / (r0 + r1) * batch_size), r0)`` (Python's ``round``), ``b1 = min(batch_size - b0,
      r1)``, the first class's items first. The pair ends, and the next begins, when either chunk runs out
      (the other chunk's rest is not used). Batches never straddle two pairs.
    * Rotations change gradually: the ``k``-th item of class ``j`` drawn in the stream is rotated
      counter-clockwise by ``((j - 1) * 60 + k * 360 / N_j) mod 360`` degrees, ``N_j`` being the number of
      training items of class ``j``: over the stream, each class turns once round, starting 60 degrees on
      from the one before it.
    * Within a chunk the items are drawn in a random order (from ``seed``), each once
      (``replacement=False``, the single pass the paper describes). The authors' code draws every item with
      ``next(iter(loader))`` on a shuffled loader, which restarts the loader on each call, so its items are
      drawn uniformly *with* replacement within a chunk; ``replacement=True`` does exactly that.

    Args:
        labels: ``(N,)`` labels of the training set; items of classes ``>= num_classes`` are left out.
        batch_size: items per batch (the DER authors' default is 16; their best for some methods is 1 or 4).
        seed: seeds the order within chunks (and the blur).
        num_classes: how many classes take part (9).
        rounds: how many times the pairs go round (3).
        replacement: draw within chunks with replacement, as the authors' code does.
        blurry: ``0`` (the paper's stream): sharp switches between pairs. ``> 0``: a gradual, "blurry" stream:
            every position is moved by Gaussian noise of this standard deviation (in items) and the stream
            re-sorted, so that near each switch the outgoing pair's items thin out while the incoming pair's
            grow, the class proportions changing smoothly over a few ``blurry`` items. Rotations still follow
            each class's draw order, and batches are then every ``batch_size`` positions.
        interpolation: of the rotations: ``'nearest'`` (the authors') or ``'bilinear'``.

    Returns:
        The stream (positions, angles, batches), on the CPU; ``stream.to(device)`` moves it.

    Raises:
        ValueError: a malformed argument, or a class with fewer items than chunks.

    Example:
        >>> train_y = torch.arange(900) % 10  # the training labels (MNIST's, in practice)
        >>> stream = mnist360(train_y, batch_size=16, seed=0).to(device)
        >>> stream.num_batches
        54

        Training on it (not run as a doctest: it needs the images ``train_x`` and a method):

        >>> for inputs, targets in stream.batches(train_x, train_y):  # doctest: +SKIP
        ...     loss = F.cross_entropy(model(inputs), targets)
        ...     synapse.backward(loss, targets, inputs=inputs); optimizer.step(); optimizer.zero_grad()
    """
    batch_size = _check_count("batch_size", batch_size)
    seed = _check_seed(seed)
    num_classes = _check_count("num_classes", num_classes, 2)
    rounds = _check_count("rounds", rounds)
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if isinstance(blurry, bool) or not isinstance(blurry, (int, float)) or not math.isfinite(blurry) or blurry < 0:
        raise ValueError(f"blurry must be a finite number >= 0 (a standard deviation in items), got {blurry!r}")
    labels = _check_labels(labels)
    chunks_per_class = 2 * rounds
    generator = torch.Generator().manual_seed(seed)
    counts = torch.bincount(labels[labels < num_classes], minlength=num_classes).tolist()
    chunks: List[List[Tensor]] = []
    for j in range(num_classes):
        items = torch.nonzero(labels == j).flatten()  # dataset order
        per_chunk = len(items) // chunks_per_class + 1
        if len(items) <= (chunks_per_class - 1) * per_chunk:
            raise ValueError(
                f"class {j} has {len(items)} items: too few to cut into {chunks_per_class} non-empty chunks of "
                f"{per_chunk} (2 x rounds chunks of N // {chunks_per_class} + 1 items, the last one shorter)"
            )
        chunks.append([items[k * per_chunk : (k + 1) * per_chunk] for k in range(chunks_per_class)])
    pieces: List[Tensor] = []
    boundaries = [0]
    segments: List[Tuple[int, ...]] = []
    for _ in range(rounds):
        for a in range(num_classes):
            pair = (a, (a + 1) % num_classes)
            segments.append(pair)
            drawn = []
            for j in pair:
                chunk = chunks[j].pop()  # the authors take chunks from the end of the list
                order = (
                    torch.randint(len(chunk), (len(chunk),), generator=generator)
                    if replacement
                    else torch.randperm(len(chunk), generator=generator)
                )
                drawn.append(chunk[order])
            remaining, used = [len(drawn[0]), len(drawn[1])], [0, 0]
            while remaining[0] > 0 and remaining[1] > 0:
                b0 = min(int(round(remaining[0] / (remaining[0] + remaining[1]) * batch_size)), remaining[0])
                b1 = min(batch_size - b0, remaining[1])
                pieces += [drawn[0][used[0] : used[0] + b0], drawn[1][used[1] : used[1] + b1]]
                used, remaining = [used[0] + b0, used[1] + b1], [remaining[0] - b0, remaining[1] - b1]
                boundaries.append(boundaries[-1] + b0 + b1)
    indices = torch.cat(pieces)
    if blurry > 0:
        keys = torch.arange(len(indices), dtype=torch.float64) + blurry * torch.randn(
            len(indices), generator=generator, dtype=torch.float64
        )
        indices = indices[torch.argsort(keys, stable=True)]
        boundaries = [*range(0, len(indices), batch_size), len(indices)]
    # The k-th drawn item of class j: ((j - 1) * 60 + k * 360 / N_j) mod 360 degrees.
    stream_labels = labels[indices]
    rank = torch.zeros(len(indices), dtype=torch.float64)
    for j in range(num_classes):
        here = stream_labels == j
        rank[here] = torch.arange(int(here.sum()), dtype=torch.float64)
    first = (stream_labels.to(torch.float64) - 1) * 60.0
    step = 360.0 / torch.tensor(counts, dtype=torch.float64)[stream_labels]
    angles = torch.remainder(first + rank * step, 360.0)
    info = {
        "kind": "task-free",
        "stream": "mnist-360",
        "classes": list(range(num_classes)),
        "rounds": rounds,
        "pairs": len(segments),
        "length": len(indices),
        "batches": len(boundaries) - 1,
        "batch_size": batch_size,
        "seed": seed,
        "replacement": replacement,
        "blurry": blurry,
        "interpolation": interpolation,
    }
    return TaskFreeStream(indices, angles, tuple(boundaries), tuple(segments), interpolation, info)


def mnist360_test_angles(labels: Tensor, num_classes: int = 9) -> Tensor:
    """The rotations of MNIST-360's test items: ``(N,)`` degrees, counter-clockwise.

    As the authors' test loaders (mammoth ``datasets/mnist_360.py``): within each class, in dataset order,
    item ``i`` of the class's ``M_j`` test items is rotated by ``i * 360 / M_j`` degrees, so every class is
    scored all the way round. (The authors' loop redraws a batch of the class at every call, so their test
    items repeat; here each test item is scored once, at its angle.) Every label must be a class of the
    stream.
    """
    labels = _check_labels(labels)
    num_classes = _check_count("num_classes", num_classes, 2)
    if labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}); got {int(labels.max())}: filter the test set first")
    angles = torch.zeros(len(labels), dtype=torch.float64)
    for j in range(num_classes):
        here = labels == j
        n = int(here.sum())
        angles[here] = torch.arange(n, dtype=torch.float64) * (360.0 / max(n, 1))
    return angles


def _check_labels(labels: Any) -> Tensor:
    integer = isinstance(labels, Tensor) and not labels.dtype.is_floating_point and labels.dtype != torch.bool
    if not integer or labels.dim() != 1:
        got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a 1-D integer tensor, got {got}")
    labels = labels.cpu().long()
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError("labels must be non-negative")
    return labels
