"""Argument checks shared by the scenarios."""

from __future__ import annotations

from typing import Any, Tuple, Union

from torch import Tensor

SizeLike = Union[int, Tuple[int, int]]


def _check_images(images: Tensor, name: str = "images") -> None:
    if not isinstance(images, Tensor) or images.dim() not in (3, 4):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a tensor of shape (N, C, H, W) or (N, H, W), got {shape}")



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


