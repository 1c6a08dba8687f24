"""Domain-incremental scenarios: one dataset, a fixed input transformation per task (P-MNIST, R-MNIST)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._checks import SizeLike, _check_count, _check_images, _check_seed, _size
from .geometry import INTERPOLATIONS, rotate, rotation_index_map


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

