"""Models by name: the DER paper's ``mlp`` and ``resnet18-reduced``, plus any torchvision classifier.

Every model takes uint8 images ``(N, C, H, W)`` and scales them itself, so the replay buffer keeps
inputs as uint8 (a quarter of float32's memory). The scaling is either ``ToTensor``'s (pixels in
[0, 1], what the DER authors' Seq-MNIST uses) or a per-channel standardisation (their CIFAR one).
"""

from __future__ import annotations

from typing import Callable, List, Sequence

import torch
from torch import Tensor, nn

from .registry import Registry

INITS = ("default", "xavier")

ModelFactory = Callable[[int, int, int], nn.Module]  # (in_channels, image_size, num_classes)
MODELS: Registry[ModelFactory] = Registry("model")


class Normalize(nn.Module):
    """uint8 images -> float, scaled to [0, 1] and standardised per channel (``mean=0, std=1``: [0, 1] only)."""

    mean: Tensor
    scale: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255.0, persistent=False)
        self.register_buffer("scale", 1.0 / (torch.tensor(std).view(1, -1, 1, 1) * 255.0), persistent=False)

    def forward(self, inputs: Tensor) -> Tensor:
        return (inputs.float() - self.mean) * self.scale


class Classifier(nn.Module):
    """``normalize`` then ``backbone``; ``forward(inputs)`` is the signature Synapse's replay uses."""

    def __init__(self, normalize: Normalize, backbone: nn.Module) -> None:
        super().__init__()
        self.normalize = normalize
        self.backbone = backbone

    def forward(self, inputs: Tensor) -> Tensor:
        return self.backbone(self.normalize(inputs))


@MODELS.register("mlp")
def mlp(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """DER's MNIST network: two hidden layers of 100 ReLU units, one head over all classes."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, 100),
        nn.ReLU(),
        nn.Linear(100, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@MODELS.register("resnet18-reduced")
def resnet18_reduced(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """ResNet-18 for 32x32 inputs as in DER: 3x3 stem, no max-pool, 64 initial filters."""
    layers: List[nn.Module] = [nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    in_planes = 64
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)]
        in_planes = planes
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def model_names() -> List[str]:
    """Our models plus torchvision's classification models (when torchvision is installed)."""
    names = MODELS.names()
    try:
        import torchvision

        names += [n for n in torchvision.models.list_models(module=torchvision.models) if n not in names]
    except ImportError:
        pass
    return names


def xavier_init_(model: nn.Module) -> nn.Module:
    """Glorot-uniform weights and zero biases for every ``nn.Linear``: ``U(-a, a)`` with
    ``a = sqrt(6 / (fan_in + fan_out))`` (Glorot & Bengio 2010). The DER authors' MNIST network is
    initialised this way; other layers keep PyTorch's default."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


def create_model(
    name: str,
    in_channels: int,
    image_size: int,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    normalize: bool = True,
    init: str = "default",
) -> nn.Module:
    """Build model ``name`` for uint8 images of the given shape, input scaling included.

    Args:
        normalize: standardise with ``mean``/``std``; otherwise pixels are only scaled to [0, 1].
        init: ``'default'`` (PyTorch's) or ``'xavier'`` (:func:`xavier_init_`).
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if not normalize:
        mean, std = (0.0,) * in_channels, (1.0,) * in_channels
    if name in MODELS:
        backbone = MODELS[name](in_channels, image_size, num_classes)
    else:
        import torchvision

        if name not in torchvision.models.list_models(module=torchvision.models):
            raise KeyError(f"unknown model {name!r}; choose from {', '.join(model_names())}")
        backbone = torchvision.models.get_model(name, num_classes=num_classes)
        if in_channels != 3:
            # torchvision's classifiers expect RGB: repeat grey channels rather than edit their stems.
            backbone = nn.Sequential(_RepeatChannels(3 // in_channels), backbone)
    if init == "xavier":
        xavier_init_(backbone)
    return Classifier(Normalize(mean, std), backbone)


class _RepeatChannels(nn.Module):
    def __init__(self, times: int) -> None:
        super().__init__()
        self.times = times

    def forward(self, x: Tensor) -> Tensor:
        return x.repeat(1, self.times, 1, 1)
