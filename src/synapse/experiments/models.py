"""Models by name: the DER paper's ``mlp`` and ``resnet18-reduced``, any torchvision classifier, and any
timm model as ``timm:NAME`` (with the optional ``timm`` extra).

Every model takes uint8 images ``(N, C, H, W)`` and scales them itself, so the replay buffer keeps
inputs as uint8 (a quarter of float32's memory). The scaling is either ``ToTensor``'s (pixels in
[0, 1], what the DER authors' Seq-MNIST uses) or a per-channel standardisation (their CIFAR one).

**Input adaptation** (in the model, on the device, so the data and the memory stay small uint8):
torchvision and timm models get 3 channels (a grey image is repeated, so RGB weights apply; our own
models take the data's channels unless ``input_channels`` says 3), and any model can be fed at another
size than the data's (``input_size``: bilinear resize after the scaling).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
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
    """``normalize`` then ``backbone``; ``forward(inputs)`` is the signature Synapse's replay uses.

    Args:
        channels: repeat a 1-channel input to this many channels first (0: as it comes).
        size: resize the scaled input to ``size x size`` (bilinear) before the backbone (None: as it comes).
        channels_last: hand the backbone its input in ``channels_last`` memory format (convert the model's
            weights with ``model.to(memory_format=torch.channels_last)`` too).
        autocast: run the backbone under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``) and
            return float32 outputs, so every forward (the training step's, a method's replay and teachers,
            the evaluation) is mixed precision, and the losses and stored logits stay float32.
    """

    def __init__(
        self,
        normalize: Normalize,
        backbone: nn.Module,
        channels: int = 0,
        size: Optional[int] = None,
        channels_last: bool = False,
        autocast: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.normalize = normalize
        self.backbone = backbone
        self.channels = channels
        self.size = size
        self.channels_last = channels_last
        self.autocast = autocast

    def forward(self, inputs: Tensor) -> Tensor:
        if self.channels > inputs.shape[1] == 1:  # shapes only: no host sync
            inputs = inputs.expand(-1, self.channels, -1, -1)
        x = self.normalize(inputs)
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.autocast is None:
            return self.backbone(x)
        with torch.autocast(x.device.type, dtype=self.autocast):
            return self.backbone(x).float()


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


TIMM_PREFIX = "timm:"
# Normalisation of ImageNet-pretrained weights (torchvision's; timm models carry their own in pretrained_cfg).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ModelUnavailable(RuntimeError):
    """The model needs a package that is not installed (timm); the message says how to get it."""


def _torchvision_names() -> List[str]:
    try:
        import torchvision
    except ImportError:
        return []
    return list(torchvision.models.list_models(module=torchvision.models))


def model_names() -> List[str]:
    """Our models plus torchvision's classification models (when torchvision is installed); any timm model
    is ``timm:NAME`` besides (:func:`check_model_name`)."""
    names = MODELS.names()
    return names + [n for n in _torchvision_names() if n not in names]


def _timm() -> Any:
    try:
        import timm
    except ImportError as e:
        raise ModelUnavailable(
            "timm: models need the optional timm package: pip install 'torch-synapse[timm]' (or pip install timm)"
        ) from e
    return timm


def check_model_name(name: str) -> str:
    """``name`` if it names a model this program can build; raises KeyError (unknown) or
    :class:`ModelUnavailable` (``timm:`` without timm installed) otherwise."""
    if name.startswith(TIMM_PREFIX):
        timm = _timm()
        if not timm.is_model(name[len(TIMM_PREFIX) :]):
            raise KeyError(f"unknown timm model {name[len(TIMM_PREFIX) :]!r}; see timm.list_models()")
        return name
    if name not in model_names():
        raise KeyError(
            f"unknown model {name!r}; choose 'mlp', 'resnet18-reduced', a torchvision classification model "
            "(torchvision.models.list_models()) or timm:NAME"
        )
    return name


def family(name: str) -> str:
    """The model's family, which decides the protocol defaults (:data:`FAMILY_DEFAULTS`): ``'mlp'`` or
    ``'cnn'`` (our ResNet and torchvision's models), or ``'timm'``."""
    if name.startswith(TIMM_PREFIX):
        return "timm"
    return "mlp" if name == "mlp" else "cnn"


@dataclass(frozen=True)
class FamilyDefaults:
    """Training defaults a model family brings when the dataset's protocol was written for another family."""

    lr: float
    batch_size: int
    normalize: bool
    init: str
    why: str


FAMILY_DEFAULTS: Dict[str, FamilyDefaults] = {
    "mlp": FamilyDefaults(0.03, 10, False, "xavier", "the DER paper's Seq-MNIST MLP"),
    "cnn": FamilyDefaults(0.1, 32, True, "default", "the DER paper's Seq-CIFAR ResNet-18"),
    "timm": FamilyDefaults(0.01, 32, True, "default", "SGD from scratch on a timm model, a lower step than a ResNet's"),
    "pretrained": FamilyDefaults(0.01, 32, True, "default", "fine-tuning pretrained weights: a small step"),
}


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


def reinitializer(init: str) -> Optional[Callable[[nn.Module], None]]:
    """How a method that trains a model from scratch (GDumb's retraining) re-initialises it to match the
    program's ``init``: for ``'xavier'``, every submodule's ``reset_parameters()``, then
    :func:`xavier_init_` (the network as :func:`create_model` built it); ``None`` for ``'default'`` (the
    methods' own, PyTorch's defaults).

    Example:
        >>> fn = reinitializer("xavier")
        >>> layer = nn.Linear(4, 2)
        >>> fn(layer)
        >>> bool((layer.bias == 0).all())
        True
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "default":
        return None

    def reinitialize(model: nn.Module) -> None:
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
        xavier_init_(model)

    return reinitialize


class ModelArgsError(ValueError):
    """``model_args`` the model cannot take; the message names them."""


class WeightsError(ValueError):
    """Pretrained weights that cannot be used (unreadable, or for another architecture); the message names the
    file."""


class WeightsMissing(WeightsError, FileNotFoundError):
    """No file at the pretrained weights' path (nothing is downloaded)."""


def _timm_backbone(name: str, num_classes: int, size: int, channels: int, kwargs: Mapping[str, Any]) -> nn.Module:
    """A timm model without downloaded weights; those that take ``img_size`` (ViTs) are built for ``size``.
    ``kwargs`` go to ``timm.create_model`` unchanged (e.g. a ViT's ``depth``, ``embed_dim``, ``patch_size``)."""
    timm = _timm()
    try:
        return timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=channels, img_size=size, **kwargs
        )
    except TypeError as e:
        if "img_size" not in str(e):  # another keyword the model does not take: the user's to fix
            raise ModelArgsError(f"timm:{name} does not take model_args {dict(kwargs)}: {e}") from None
    try:  # a model without a fixed input size (CNNs) takes no img_size
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=channels, **kwargs)
    except TypeError as e:
        raise ModelArgsError(f"timm:{name} does not take model_args {dict(kwargs)}: {e}") from None


# What create_model sets itself: model_args may not name these.
RESERVED_MODEL_ARGS = ("pretrained", "num_classes", "in_chans", "img_size")


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
    input_size: Optional[int] = None,
    input_channels: Optional[int] = None,
    pretrained: Optional[str] = None,
    model_args: Optional[Mapping[str, Any]] = None,
    channels_last: bool = False,
    autocast: Optional[torch.dtype] = None,
    log: Optional[Callable[[str], None]] = None,
) -> nn.Module:
    """Build model ``name`` for uint8 images of the given shape, input scaling and adaptation included.

    Args:
        name: ``'mlp'``, ``'resnet18-reduced'``, a torchvision classification model, or ``'timm:NAME'``.
        normalize: standardise with ``mean``/``std``; otherwise pixels are only scaled to [0, 1]. With
            ``pretrained`` weights the statistics are the weights' (ImageNet's, or a timm model's own).
        init: ``'default'`` (PyTorch's) or ``'xavier'`` (:func:`xavier_init_`), before any weights load.
        input_size: feed the model ``input_size x input_size`` images (bilinear resize on the device);
            None: the data's size. A timm model that takes ``img_size`` (ViTs) is built for it.
        input_channels: the channels the model takes, grey images repeated to match (None: 3 for torchvision
            and timm models, the data's for ours). Only 1-channel data can be adapted.
        pretrained: a local weights file (state dict, or a checkpoint holding one under ``state_dict`` or
            ``model``; ``.safetensors`` too) loaded into the backbone by name and shape (:func:`load_pretrained`).
        model_args: keyword arguments for the model's constructor, passed through unchanged (timm's
            ``create_model`` or torchvision's ``get_model``), e.g. ``{"depth": 4, "patch_size": 4}`` for a
            small ViT; not for our own models, nor the keywords set here (:data:`RESERVED_MODEL_ARGS`).
        channels_last: the weights and the backbone's inputs in ``channels_last`` memory format.
        autocast: the backbone's forward under ``torch.autocast`` with this dtype (:class:`Classifier`).
        log: receives the report of what was loaded and what was left out.

    Example:
        >>> model = create_model("resnet18-reduced", 1, 28, 10, (0.5,), (0.25,), input_size=32)
        >>> model(torch.zeros(2, 1, 28, 28, dtype=torch.uint8)).shape
        torch.Size([2, 10])
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1):
        raise ValueError(f"input_size must be a positive int or None, got {input_size!r}")
    if pretrained is not None and not os.path.isfile(pretrained):
        raise WeightsMissing(f"pretrained weights {pretrained!r}: no such file (weights are never downloaded)")
    check_model_name(name)
    kwargs = dict(model_args or {})
    if kwargs and name in MODELS:
        raise ModelArgsError(f"model_args are for timm and torchvision models; {name} takes none, got {kwargs}")
    reserved = sorted(set(kwargs) & set(RESERVED_MODEL_ARGS))
    if reserved:
        raise ModelArgsError(
            f"model_args may not set {', '.join(reserved)}: the data and the program set them (use "
            "--input_size, --input_channels, --pretrained)"
        )
    size = input_size or image_size
    channels = input_channels or (in_channels if name in MODELS else 3)
    if channels != in_channels and in_channels != 1:
        raise ValueError(f"{name} takes {channels}-channel images: only 1-channel data is adapted, not {in_channels}")
    if name in MODELS:
        backbone = MODELS[name](channels, size, num_classes)
    elif name.startswith(TIMM_PREFIX):
        backbone = _timm_backbone(name[len(TIMM_PREFIX) :], num_classes, size, channels, kwargs)
    else:
        import torchvision

        if channels != 3:
            raise ValueError(f"torchvision's {name} takes 3-channel images, not input_channels={channels}")
        try:
            backbone = torchvision.models.get_model(name, num_classes=num_classes, **kwargs)
        except TypeError as e:
            raise ModelArgsError(f"torchvision's {name} does not take model_args {kwargs}: {e}") from None
    if init == "xavier":
        xavier_init_(backbone)
    if pretrained is not None:
        report = load_pretrained(backbone, pretrained)
        mean, std = weights_statistics(backbone)
        report.normalization = (tuple(mean), tuple(std))
        if log is not None:
            log(str(report))
    elif not normalize:
        mean, std = (0.0,) * in_channels, (1.0,) * in_channels
    repeat = channels if channels != in_channels else 0
    size_in = input_size if input_size != image_size else None
    model = Classifier(Normalize(mean, std), backbone, repeat, size_in, channels_last, autocast)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def weights_statistics(backbone: nn.Module) -> Tuple[Sequence[float], Sequence[float]]:
    """The input normalisation pretrained weights expect: a timm model's own, else ImageNet's."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    if "mean" in cfg and "std" in cfg:
        return tuple(cfg["mean"]), tuple(cfg["std"])
    return IMAGENET_MEAN, IMAGENET_STD


@dataclass
class LoadReport:
    """What :func:`load_pretrained` took from a weights file; ``str()`` is the report the program prints."""

    path: str
    loaded: List[str] = field(default_factory=list)
    left_out: List[str] = field(default_factory=list)  # the model's tensors kept at initialisation, and why
    unused: List[str] = field(default_factory=list)  # the file's tensors the model has no place for
    total: int = 0
    normalization: Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]] = None

    def __str__(self) -> str:
        lines = [f"pretrained weights {self.path}: loaded {len(self.loaded)} of the model's {self.total} tensors"]
        if self.left_out:
            lines.append(f"  left at initialisation ({len(self.left_out)}): " + "; ".join(self.left_out))
        if self.unused:
            shown = ", ".join(self.unused[:8]) + (f", ... ({len(self.unused)} in all)" if len(self.unused) > 8 else "")
            lines.append(f"  in the file, not in the model: {shown}")
        if self.normalization is not None:
            lines.append(
                f"  inputs normalised as the weights expect: mean {self.normalization[0]}, std {self.normalization[1]}"
            )
        return "\n".join(lines)


def _load_file(path: str) -> Any:
    """What weights file ``path`` holds: a safetensors file's tensors, or a torch file read safely."""
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ModelUnavailable(f"{path} is a safetensors file: pip install safetensors") from e
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_weights(path: str) -> Dict[str, Tensor]:
    try:
        state = _load_file(path)
    except ModelUnavailable:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the reader raises, say which file and what is expected
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise WeightsError(
            f"pretrained weights {path} cannot be read ({type(e).__name__}: {message}): expected a state dict "
            "saved with torch.save(model.state_dict(), path) (a whole pickled model is not read, for safety) or a "
            ".safetensors file"
        ) from e
    for key in ("state_dict", "model", "model_state_dict"):  # a training checkpoint holding the weights
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(
            f"pretrained weights {path} hold no state dict of tensors (nor one under 'state_dict' or 'model')"
        )
    return dict(state)


def _strip_prefixes(state: Dict[str, Tensor], own: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Keys as the backbone names them: without DDP's ``module.``, torch.compile's ``_orig_mod.`` or this
    program's ``backbone.`` (a model saved by it), where every key carries one."""
    for prefix in ("module.", "_orig_mod.", "backbone."):
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in own):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_pretrained(backbone: nn.Module, path: str) -> LoadReport:
    """Load the tensors of weights file ``path`` whose name and shape match ``backbone``'s; report the rest.

    A timm model's own checkpoint filter runs first (it resizes position embeddings to the model's input
    size, for example). A new head (another number of classes) is left at its initialisation and listed.
    Raises WeightsError when the file cannot be read, or nothing matches: the file is for another architecture.
    """
    own = backbone.state_dict()
    state = _strip_prefixes(_read_weights(path), own)
    filter_fn = getattr(sys.modules.get(type(backbone).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None and type(backbone).__module__.startswith("timm."):
        try:
            state = filter_fn(state, backbone)
        except Exception:  # noqa: BLE001 - a filter that does not fit: match the raw tensors instead
            pass
    report = LoadReport(path, total=len(own))
    matched: Dict[str, Tensor] = {}
    for name, tensor in own.items():
        if name not in state:
            report.left_out.append(f"{name} (not in the file)")
        elif state[name].shape != tensor.shape:
            report.left_out.append(f"{name} (model {tuple(tensor.shape)}, file {tuple(state[name].shape)})")
        else:
            matched[name] = state[name]
    report.loaded = list(matched)
    report.unused = [k for k in state if k not in own]
    if not matched:
        raise WeightsError(
            f"no tensor of {path} matches the model by name and shape: it holds weights for another architecture "
            f"(its first keys: {', '.join(list(state)[:4])}; the model's: {', '.join(list(own)[:4])})"
        )
    backbone.load_state_dict(matched, strict=False)
    return report
