"""Batched, on-device image augmentation with per-sample randomness from a generator you pass.

The experiment program augments its training batches with these, and a replay method given a
``replay_transform`` augments every replayed minibatch with one (see :class:`synapse.BufferedSynapse`):
the memory keeps the raw images and each replay draws a fresh view, as the DER authors' code does
(``buffer.get_data(..., transform=...)``).

A transform here is any callable ``images -> images`` on a batch ``(N, C, H, W)``. The ones this module
defines also take a ``generator``: their random draws (a few numbers per image) come from it, on the
generator's device, or on the CPU and then copied to the images' device without blocking; the image work
itself is one batched gather on the images' device, with no host sync. Foreign transforms are accepted as
they are, and draw from torch's global RNG instead. Kornia's draw per image; torchvision's draw once per
call, so that a whole batch gets one crop and one flip: wrap them in :class:`PerImage`.

Example:
    >>> import torch
    >>> from synapse.augment import Compose, RandomCropFlip
    >>> augment = Compose(RandomCropFlip(padding=4))
    >>> images = torch.zeros(8, 3, 32, 32, dtype=torch.uint8)
    >>> augment(images, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([8, 3, 32, 32])
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._device import to_device
from ._watch import user_stacklevel

__all__ = [
    "Compose",
    "PerImage",
    "RandomCropFlip",
    "Transform",
    "apply_transform",
    "check_replay_transform",
    "draws_per_batch",
    "random_crop_flip",
]

# Any callable from a batch of images to a batch of images.
Transform = Callable[[Tensor], Tensor]


def _draw(generator: Optional[torch.Generator], device: torch.device, n: int, padding: int, flip: bool) -> Tuple:
    """Per-image crop offsets ``(2, n)`` and flip flags ``(n,)`` on ``device``, drawn from ``generator``
    (torch's default CPU generator when None). A CPU draw is copied without blocking; the draw order
    (offsets, then flips) is fixed, so a seeded run repeats itself."""
    on = generator.device if generator is not None else torch.device("cpu")
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=on)
    flips = torch.rand(n, generator=generator, device=on) < 0.5 if flip else None
    if on != device:
        offsets = to_device(offsets, device)
        flips = None if flips is None else to_device(flips, device)
    return offsets, flips


def random_crop_flip(
    images: Tensor, generator: Optional[torch.Generator] = None, padding: int = 4, flip: bool = True
) -> Tensor:
    """Random crop after zero-padding, and random horizontal flip, for a whole batch at once.

    Each image gets its own crop offset in ``[0, 2 * padding]`` along both axes and, with ``flip``, a
    flip with probability 1/2: torchvision's ``RandomCrop(size, padding)`` plus
    ``RandomHorizontalFlip()``, per image, as one gather on the images' device.

    Args:
        images: ``(N, C, H, W)``, any dtype (uint8 images stay uint8).
        generator: where the random draws come from (torch's default CPU generator when None).
        padding: zero padding on each side before cropping back to ``H x W``.
        flip: also flip horizontally at random.

    Example:
        >>> x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4)
        >>> random_crop_flip(x, torch.Generator().manual_seed(0), padding=1).shape
        torch.Size([1, 1, 4, 4])
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (N, C, H, W) tensor, got {got}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")
    n, c, h, w = images.shape
    device = images.device
    offsets, flips = _draw(generator, device, n, padding, flip)
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    rows = (offsets[0].unsqueeze(1) + torch.arange(h, device=device)).view(n, 1, h, 1)
    cols = offsets[1].unsqueeze(1) + torch.arange(w, device=device)
    if flips is not None:
        cols = torch.where(flips.unsqueeze(1), cols.flip(1), cols)
    batch = torch.arange(n, device=device).view(n, 1, 1, 1)
    channel = torch.arange(c, device=device).view(1, c, 1, 1)
    return padded[batch, channel, rows, cols.view(n, 1, 1, w)]


class RandomCropFlip:
    """:func:`random_crop_flip` as a transform: the CIFAR protocol's train augmentation (pad 4, crop, flip).

    Args:
        padding: zero padding on each side before cropping back to the input size.
        flip: also flip horizontally with probability 1/2.

    Example:
        >>> augment = RandomCropFlip(padding=4)
        >>> augment(torch.zeros(2, 3, 32, 32), torch.Generator().manual_seed(0)).shape
        torch.Size([2, 3, 32, 32])
    """

    takes_generator = True

    def __init__(self, padding: int = 4, flip: bool = True) -> None:
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be a non-negative int, got {padding!r}")
        self.padding = padding
        self.flip = bool(flip)

    def __call__(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return random_crop_flip(images, generator, self.padding, self.flip)

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip})"


def apply_transform(transform: Transform, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """``transform(images)``, handing ``generator`` to the transforms that take one (``takes_generator``)."""
    if generator is not None and getattr(transform, "takes_generator", False):
        return transform(images, generator)  # type: ignore[call-arg]
    return transform(images)


class Compose:
    """Transforms applied one after the other: this module's, or any callable (kornia, torchvision v2).

    Ours draw from the generator passed to the call; a foreign callable draws from torch's global RNG,
    so a bit-identical resume then needs that RNG restored too (the experiment program checkpoints it).

    Example:
        >>> augment = Compose(RandomCropFlip(padding=4), lambda x: x.flip(2))  # any callable goes
        >>> augment(torch.zeros(2, 1, 8, 8), torch.Generator().manual_seed(0)).shape
        torch.Size([2, 1, 8, 8])
    """

    takes_generator = True

    def __init__(self, *transforms: Transform) -> None:
        for i, t in enumerate(transforms):
            if not callable(t):
                raise TypeError(f"transform {i} must be callable (images -> images), got {type(t).__name__}")
        self.transforms = transforms

    def __call__(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        for t in self.transforms:
            images = apply_transform(t, images, generator)
        return images

    def __repr__(self) -> str:
        return f"Compose({', '.join(map(repr, self.transforms))})"


class PerImage:
    """A transform applied to each image of the batch on its own, for transforms that draw their random
    parameters once per call (torchvision's, v1 and v2): each image then gets its own crop, flip, jitter.

    Given a CPU generator (a replay method passes its own), the transform's draws from torch's global CPU RNG
    are made under a seed drawn from that generator, with the global RNG put back afterwards: a resumed run
    repeats them, and the caller's global RNG is left untouched. One call per image costs more than one
    batched call: prefer :class:`RandomCropFlip` where it does the job.

    Args:
        transform: a callable ``image (C, H, W) -> image (C, H, W)``.

    Example:
        >>> from torchvision.transforms import v2
        >>> augment = PerImage(v2.RandomHorizontalFlip())
        >>> augment(torch.zeros(4, 3, 8, 8), torch.Generator().manual_seed(0)).shape
        torch.Size([4, 3, 8, 8])
    """

    takes_generator = True

    def __init__(self, transform: Callable[[Tensor], Tensor]) -> None:
        if not callable(transform):
            raise TypeError(f"transform must be callable (image -> image), got {type(transform).__name__}")
        self.transform = transform

    def __call__(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        if not isinstance(images, Tensor) or images.dim() != 4:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a (N, C, H, W) tensor, got {got}")
        if generator is None:
            return self._each(images)
        if generator.device.type != "cpu":
            raise ValueError(f"PerImage seeds torch's CPU RNG from a CPU generator, got one on {generator.device}")
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))  # a CPU draw: no device sync
        with torch.random.fork_rng(devices=[]):  # the CPU RNG only, put back on exit
            torch.random.default_generator.manual_seed(seed)
            return self._each(images)

    def _each(self, images: Tensor) -> Tensor:
        return torch.stack([self.transform(image) for image in images])

    def __repr__(self) -> str:
        return f"PerImage({self.transform!r})"


def draws_per_batch(transform: Transform) -> bool:
    """Whether ``transform`` is (or a :class:`Compose` holds) a torchvision transform not wrapped in
    :class:`PerImage`: called on a batch, it gives every image the same random parameters."""
    if isinstance(transform, Compose):
        return any(draws_per_batch(t) for t in transform.transforms)
    return type(transform).__module__.startswith("torchvision.transforms")


def check_replay_transform(transform: Optional[Transform]) -> None:
    """Refuse what cannot be a replay method's ``replay_transform`` (TypeError), and warn once about a
    torchvision transform, which would give a whole replayed minibatch one crop and one flip."""
    if transform is None:
        return
    if isinstance(transform, type):
        raise TypeError(
            f"replay_transform is the class {transform.__name__}, not a transform: pass an instance, "
            f"e.g. {transform.__name__}()"
        )
    if not callable(transform):
        raise TypeError(
            f"replay_transform must be a callable (images -> images) or None, got {type(transform).__name__}"
        )
    if draws_per_batch(transform):
        warnings.warn(
            f"replay_transform ({type(transform).__module__}.{type(transform).__qualname__}) draws its random "
            "parameters once per call (torchvision's transforms do), so every image of a replayed minibatch would "
            "get the same crop and flip: wrap it as synapse.augment.PerImage(transform), or use "
            "synapse.augment.RandomCropFlip",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
