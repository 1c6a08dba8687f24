"""Batched image rotation on the images' device, and the pixel maps it induces."""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import SizeLike, _check_images, _size

INTERPOLATIONS = ("nearest", "bilinear")


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


