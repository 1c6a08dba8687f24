"""Domain-incremental and task-free scenarios on image tensors, for the training loop you already have.

:class:`~synapse.TaskDict` splits a dataset by class (class-incremental). The DER paper (Buzzega et al.
2020) also runs two other kinds of experiment, and this module builds both from one dataset of image
tensors, batched and on the training device (no per-sample transform in a Python loop):

* **Domain-incremental** (:class:`Permuted`, :class:`Rotated`): every task holds the whole dataset under a
  fixed input transformation of its own; the labels do not change, so Class-IL and Domain-IL coincide and
  Task-IL does not apply. P-MNIST and R-MNIST are these on MNIST.
* **Task-free** (general continual learning, :func:`mnist360`): one stream, seen once, with no task
  boundaries; MNIST-360 is this on MNIST.

Transformations move pixels, so they work on any dtype; on uint8 images with nearest-neighbour sampling
(the default, as the DER authors' code) the result is exact uint8 pixels, and a replay buffer can keep them.

Example:
    Twenty permuted tasks in your own loop (``x``: uint8 images ``(N, 1, 28, 28)`` on the device)::

        from synapse.scenarios import Permuted

        scenario = Permuted(num_tasks=20, seed=0)
        for task in range(scenario.num_tasks):
            for inputs, targets in scenario.batches(x, y, task, batch_size=128):
                loss = F.cross_entropy(model(inputs), targets)
                optimizer.zero_grad()
                synapse.backward(loss, targets, inputs=inputs)
                optimizer.step()
            synapse.end_task()
            accuracy = [evaluate(model, scenario.transform(test_x, t), test_y) for t in range(task + 1)]
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DomainIncremental",
    "Permuted",
    "Rotated",
    "TaskFreeStream",
    "mnist360",
    "mnist360_test_angles",
    "rotate",
    "rotation_index_map",
    "scenario",
    "SCENARIOS",
]

INTERPOLATIONS = ("nearest", "bilinear")
SizeLike = Union[int, Tuple[int, int]]


# ---------------------------------------------------------------------------- rotation, batched
def _theta(degrees: Tensor, height: int, width: int) -> Tensor:
    """``(N, 2, 3)`` matrices for ``F.affine_grid`` that rotate images counter-clockwise by ``degrees``
    about their centre (positive angles turn the picture counter-clockwise, as torchvision and PIL do).

    An output pixel at centred pixel coordinates ``(x, y)`` (``y`` pointing down) reads the input at
    ``(x cos a - y sin a, x sin a + y cos a)``; ``affine_grid`` works in coordinates normalised by half the
    width and half the height, hence the aspect ratios.
    """
    rad = degrees.to(torch.float64) * (math.pi / 180.0)
    c, s = torch.cos(rad), torch.sin(rad)
    zero = torch.zeros_like(c)
    theta = torch.stack(
        [torch.stack([c, -s * (height / width), zero], -1), torch.stack([s * (width / height), c, zero], -1)], -2
    )
    return theta.to(torch.float32)


def _check_images(images: Tensor, name: str = "images") -> None:
    if not isinstance(images, Tensor) or images.dim() not in (3, 4):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a tensor of shape (N, C, H, W) or (N, H, W), got {shape}")


def rotate(images: Tensor, degrees: Union[float, Tensor], interpolation: str = "nearest", fill: float = 0.0) -> Tensor:
    """Rotate a batch of images counter-clockwise about their centres, on their device.

    The same convention as ``torchvision.transforms.functional.rotate`` with ``expand=False``: the output
    keeps the input's size, and what comes from outside the input is ``fill``. Integer images stay integer:
    nearest-neighbour sampling copies pixels exactly; bilinear rounds to the nearest integer.

    Args:
        images: ``(N, C, H, W)`` or ``(N, H, W)``, any real dtype.
        degrees: one angle for the whole batch, or one per image (a tensor of shape ``(N,)``).
        interpolation: ``'nearest'`` (the default of torchvision's ``rotate``, used by the DER authors'
            rotated MNIST protocols) or ``'bilinear'``.
        fill: the value of pixels that come from outside the image.

    Returns:
        The rotated images, with the input's shape, dtype and device.
    """
    _check_images(images)
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    squeeze = images.dim() == 3
    x = images.unsqueeze(1) if squeeze else images
    n, c, h, w = x.shape
    angles = torch.as_tensor(degrees, dtype=torch.float64)
    if angles.dim() == 0:
        angles = angles.expand(n)
    if angles.shape != (n,):
        raise ValueError(f"degrees must be a number or a tensor of shape ({n},), got shape {tuple(angles.shape)}")
    if angles.device.type == "cpu" and not bool(torch.isfinite(angles).all()):  # no host sync for device angles
        raise ValueError("degrees must be finite")
    if n == 0:
        return images.clone()
    grid = F.affine_grid(_theta(angles, h, w).to(x.device), [n, c, h, w], align_corners=False)
    work = x.to(torch.float32) if not x.is_floating_point() else x
    out = F.grid_sample(work, grid.to(work.dtype), mode=interpolation, padding_mode="zeros", align_corners=False)
    if fill != 0:
        inside = F.grid_sample(
            torch.ones_like(work[:, :1]), grid.to(work.dtype), mode=interpolation, align_corners=False
        )
        out = out + fill * (1 - inside)
    if not images.is_floating_point():
        info = torch.iinfo(images.dtype)
        out = out.round_().clamp_(info.min, info.max)
    out = out.to(images.dtype)
    return out.squeeze(1) if squeeze else out


def rotation_index_map(degrees: Union[Sequence[float], Tensor], image_size: SizeLike) -> Tensor:
    """Nearest-neighbour rotation as a pixel map: ``(T, H*W)`` int64 source indices, ``H*W`` for outside.

    Row ``t`` says, for every output pixel, which input pixel :func:`rotate` (nearest) copies for angle
    ``degrees[t]``; ``H*W`` marks pixels that come from outside the image (they take the fill value). A
    fixed rotation is then one gather, as cheap as a permutation, and equal to :func:`rotate` exactly.
    """
    h, w = _size(image_size)
    angles = torch.as_tensor(degrees, dtype=torch.float64).reshape(-1)
    # An image of its own pixel numbers, 1..H*W (exact in float32); 0 is what comes from outside.
    numbers = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, 1, h, w).expand(len(angles), 1, h, w)
    sampled = rotate(numbers, angles, "nearest").reshape(len(angles), h * w).round().long()
    return torch.where(sampled == 0, torch.full_like(sampled, h * w), sampled - 1)


def _size(image_size: SizeLike) -> Tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"image_size must be a positive int or a pair (H, W) of them, got {image_size!r}")
    return size[0], size[1]


def _check_count(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return seed


# ---------------------------------------------------------------------------- domain-incremental
class DomainIncremental(ABC):
    """A domain-incremental scenario: one dataset, a fixed input transformation per task, the same labels.

    Subclasses define :meth:`transform`. Everything runs on the inputs' device, batched.

    Args:
        num_tasks: how many tasks (transformations).
        image_size: ``H`` or ``(H, W)`` of the images the scenario transforms.
    """

    kind = "domain-il"

    def __init__(self, num_tasks: int, image_size: SizeLike) -> None:
        self.num_tasks = _check_count("num_tasks", num_tasks)
        self.image_size = _size(image_size)

    @abstractmethod
    def transform(self, inputs: Tensor, task: Union[int, Tensor]) -> Tensor:
        """``inputs`` (``(N, C, H, W)`` or ``(N, H, W)``) as task ``task`` sees them; ``task`` is one task
        index for the whole batch or a tensor ``(N,)`` of task indices, one per image."""

    def describe(self) -> Dict[str, Any]:
        """What results files record about the scenario."""
        return {"kind": self.kind, "transform": type(self).__name__.lower(), "num_tasks": self.num_tasks}

    def __len__(self) -> int:
        return self.num_tasks

    def batches(
        self,
        inputs: Tensor,
        targets: Tensor,
        task: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        generator: Optional[torch.Generator] = None,
    ) -> Iterator[Tuple[Tensor, Tensor]]:
        """Task ``task``'s batches of ``(inputs, targets)``: a random order per call (``generator``: a CPU
        generator, for reproducible orders), each batch gathered and transformed on the inputs' device."""
        _check_images(inputs, "inputs")
        self._check_task(task)
        _check_count("batch_size", batch_size)
        if len(targets) != len(inputs):
            raise ValueError(f"inputs and targets differ in length: {len(inputs)} and {len(targets)}")
        order = torch.randperm(len(inputs), generator=generator) if shuffle else torch.arange(len(inputs))
        order = order.to(inputs.device)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield self.transform(inputs[idx], task), targets[idx]

    def _check_task(self, task: Union[int, Tensor]) -> None:
        if isinstance(task, Tensor):
            if task.dtype.is_floating_point or task.dtype == torch.bool or task.dim() != 1:
                raise ValueError(f"task must be an int or a 1-D integer tensor, got {task.dtype} {tuple(task.shape)}")
            if task.numel() and (int(task.min()) < 0 or int(task.max()) >= self.num_tasks):
                raise ValueError(f"task indices must be in [0, {self.num_tasks}), got {task.min()}..{task.max()}")
        elif isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be an int in [0, {self.num_tasks}), got {task!r}")

    def _check_inputs(self, inputs: Tensor) -> None:
        _check_images(inputs, "inputs")
        if tuple(inputs.shape[-2:]) != self.image_size:
            raise ValueError(
                f"inputs are {tuple(inputs.shape[-2:])} images, but this scenario was built for {self.image_size}"
            )


class _PixelMap(DomainIncremental):
    """A transformation that moves pixels: output pixel ``p`` of task ``t`` is input pixel ``index[t, p]``, or
    ``fill`` where the index is ``H*W``. One gather per batch; the maps are copied to each device once."""

    def __init__(self, num_tasks: int, image_size: SizeLike, index: Tensor, fill: float = 0.0) -> None:
        super().__init__(num_tasks, image_size)
        self.index = index  # (num_tasks, H*W) int64, on the CPU
        self.fill = fill
        self._on_device: Dict[torch.device, Tensor] = {}

    def _index(self, device: torch.device) -> Tensor:
        if device not in self._on_device:
            self._on_device[device] = self.index.to(device)
        return self._on_device[device]

    def transform(self, inputs: Tensor, task: Union[int, Tensor]) -> Tensor:
        self._check_inputs(inputs)
        self._check_task(task)
        h, w = self.image_size
        flat = inputs.reshape(*inputs.shape[:-2], h * w)
        # One extra pixel holding the fill value, for the indices that point outside the image.
        padded = torch.cat([flat, flat.new_full((*flat.shape[:-1], 1), self.fill)], -1)
        index = self._index(inputs.device)
        if isinstance(task, Tensor):
            rows = index[task.to(inputs.device)]  # (N, H*W)
            rows = rows.view(len(rows), *([1] * (flat.dim() - 2)), h * w).expand(*flat.shape)
            out = padded.gather(-1, rows)
        else:
            out = padded.index_select(-1, index[task])
        return out.reshape(inputs.shape)


class Permuted(_PixelMap):
    """Permuted images (P-MNIST): a fixed random permutation of the pixel positions per task.

    Follows the DER authors' protocol (mammoth ``datasets/perm_mnist.py``): **every task is permuted,
    the first one included** (there is no identity task); ``first_identity=True`` keeps task 0 unpermuted
    instead, as some other papers do. A permutation moves whole pixels (all channels alike). The
    permutations come from one generator seeded with ``seed``, drawn in task order, so task ``t``'s
    permutation depends only on ``seed`` and ``t``; they are all distinct (a repeat is drawn again).

    Args:
        num_tasks: how many tasks; at most the number of distinct permutations, ``(H*W)!``.
        seed: seeds the permutations.
        image_size: ``H`` or ``(H, W)`` (28 for MNIST-like data).
        first_identity: task 0 sees the images unpermuted.

    Raises:
        ValueError: ``num_tasks`` exceeds the permutations there are, or an argument is malformed.

    Example:
        >>> scenario = Permuted(num_tasks=20, seed=0)
        >>> x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)  # MNIST-like images
        >>> x2 = scenario.transform(x, 2)  # x: (N, 1, 28, 28) on any device
        >>> x2.shape
        torch.Size([4, 1, 28, 28])
    """

    def __init__(self, num_tasks: int, seed: int = 0, image_size: SizeLike = 28, first_identity: bool = False) -> None:
        num_tasks = _check_count("num_tasks", num_tasks)
        seed = _check_seed(seed)
        h, w = _size(image_size)
        pixels = h * w
        available = math.factorial(pixels) if pixels <= 20 else None  # 21! > 2**64: never a limit in practice
        if available is not None and num_tasks > available:
            raise ValueError(
                f"num_tasks={num_tasks} is more than the {available} distinct permutations of a {h}x{w} image "
                f"({pixels}! of them): every task needs its own permutation"
            )
        generator = torch.Generator().manual_seed(seed)
        perms: List[Tensor] = []
        seen = set()
        if first_identity:
            perms.append(torch.arange(pixels))
            seen.add(tuple(range(pixels)))
        while len(perms) < num_tasks:
            perm = torch.randperm(pixels, generator=generator)
            key = tuple(perm.tolist())
            if key not in seen:  # distinct tasks; repeats only happen for tiny images
                seen.add(key)
                perms.append(perm)
        super().__init__(num_tasks, (h, w), torch.stack(perms))
        self.seed = seed
        self.first_identity = first_identity

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), "seed": self.seed, "first_task_identity": self.first_identity}


class Rotated(_PixelMap):
    """Rotated images (R-MNIST): a fixed rotation angle per task.

    Follows the DER authors' protocol (mammoth ``datasets/rot_mnist.py`` and ``transforms/rotation.py``):
    each task's angle is drawn uniformly from ``[0, 180)`` degrees, **the first task included**, and the
    image is rotated counter-clockwise about its centre with nearest-neighbour sampling and zero fill
    (torchvision's ``rotate`` defaults, which the authors call on PIL images). The angles come from one
    generator seeded with ``seed``, in task order; pass ``angles`` to choose them yourself.

    With nearest sampling a fixed rotation is a pixel map (:func:`rotation_index_map`), applied by one
    gather; bilinear rotations go through ``grid_sample`` per batch.

    Args:
        num_tasks: how many tasks.
        seed: seeds the angles.
        degrees: ``(low, high)``: angles are uniform in ``[low, high)``; ``high - low`` at most 360.
        angles: the angle of every task instead (``num_tasks`` finite numbers); excludes ``degrees``.
        image_size: ``H`` or ``(H, W)``.
        interpolation: ``'nearest'`` (default, the authors') or ``'bilinear'``.
        fill: the value of pixels rotated in from outside the image.

    Example:
        >>> scenario = Rotated(num_tasks=20, seed=0)
        >>> scenario.angles[:3]  # degrees, counter-clockwise
        tensor([174.6095, 127.4076,  82.6889], dtype=torch.float64)
    """

    def __init__(
        self,
        num_tasks: int,
        seed: int = 0,
        degrees: Optional[Tuple[float, float]] = None,
        angles: Optional[Sequence[float]] = None,
        image_size: SizeLike = 28,
        interpolation: str = "nearest",
        fill: float = 0.0,
    ) -> None:
        num_tasks = _check_count("num_tasks", num_tasks)
        seed = _check_seed(seed)
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        if angles is not None and degrees is not None:
            raise ValueError("give either degrees (a range to draw angles from) or angles (one per task), not both")
        low, high = _check_range(degrees if degrees is not None else (0.0, 180.0))
        if angles is not None:
            drawn = torch.as_tensor(list(angles), dtype=torch.float64)
            if drawn.shape != (num_tasks,) or not bool(torch.isfinite(drawn).all()):
                raise ValueError(f"angles must be {num_tasks} finite numbers (one per task), got {list(angles)!r}")
        else:
            generator = torch.Generator().manual_seed(seed)
            drawn = low + (high - low) * torch.rand(num_tasks, generator=generator, dtype=torch.float64)
        size = _size(image_size)
        super().__init__(num_tasks, size, rotation_index_map(drawn, size), fill)
        self.angles = drawn
        self.seed = seed
        self.degrees = (low, high)
        self.interpolation = interpolation

    def transform(self, inputs: Tensor, task: Union[int, Tensor]) -> Tensor:
        if self.interpolation == "nearest":
            return super().transform(inputs, task)
        self._check_inputs(inputs)
        self._check_task(task)
        angles = self.angles[task.cpu()] if isinstance(task, Tensor) else float(self.angles[task])
        return rotate(inputs, angles, self.interpolation, self.fill)

    def describe(self) -> Dict[str, Any]:
        return {
            **super().describe(),
            "seed": self.seed,
            "degrees": list(self.degrees),
            "angles": [round(a, 4) for a in self.angles.tolist()],
            "interpolation": self.interpolation,
        }


def _check_range(degrees: Any) -> Tuple[float, float]:
    try:
        low, high = (float(d) for d in degrees)
    except (TypeError, ValueError):
        raise ValueError(f"degrees must be a pair (low, high) of numbers, got {degrees!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)) or not low < high or high - low > 360:
        raise ValueError(
            f"degrees must be a rotation range (low, high) with low < high, both finite and high - low <= 360, "
            f"got {degrees!r}"
        )
    return low, high


SCENARIOS = {"permuted": Permuted, "rotated": Rotated}


def scenario(name: str, num_tasks: int, **kwargs: Any) -> DomainIncremental:
    """A domain-incremental scenario by name: ``'permuted'`` or ``'rotated'`` (keyword arguments go to its
    class)."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    return SCENARIOS[name](num_tasks, **kwargs)  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------- task-free streams
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
