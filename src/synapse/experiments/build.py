"""Building a run's parts from its settings: the model (DDP-wrapped under torchrun), the optimizer and the
continual-learning method."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

import synapse
from synapse import catalog
from synapse.augment import RandomCropFlip

from .config import ADAM_BETAS, OPTIMIZERS, Config
from .datasets import DatasetSpec
from .distributed import World
from .models import create_model, reinitializer
from .schedule import remember_base_lr


def build_model(
    cfg: Config,
    spec: DatasetSpec,
    device: torch.device,
    world: World,
    log: Callable[[str], None],
    wrap: bool = True,
) -> nn.Module:
    """The configured model for the dataset's inputs and classes, on ``device``; DDP-wrapped when the run
    has more than one process (and ``wrap``: :func:`wrap_for_world` does it later); ``torch.compile``d with
    ``--compile``; ``channels_last`` and bf16 autocast inside its forward
    (:class:`~synapse.experiments.models.Classifier`)."""
    assert cfg.model is not None
    model: nn.Module = create_model(
        cfg.model,
        spec.in_channels,
        spec.image_size,
        spec.num_classes,
        spec.mean,
        spec.std,
        normalize=bool(cfg.normalize),
        init=cfg.init or "default",
        input_size=cfg.input_size,
        input_channels=cfg.input_channels,
        pretrained=cfg.pretrained,
        model_args=cfg.model_args,
        channels_last=cfg.channels_last,
        autocast=torch.bfloat16 if cfg.bf16 else None,
        log=log,
    ).to(device)
    return wrap_for_world(cfg, model, device, world) if wrap else model


def wrap_for_world(cfg: Config, model: nn.Module, device: torch.device, world: World) -> nn.Module:
    """``model`` DDP-wrapped when the run has more than one process, and compiled with ``--compile``."""
    if world.size > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        # The method is attached to the compiled module (its replay hooks run eagerly around the compiled
        # graph); checkpoints hold the original module's state, so a run resumes compiled or not.
        model = torch.compile(model, backend=cfg.compile_backend)  # type: ignore[assignment]
    return model


def build_optimizer(cfg: Config, model: nn.Module, method: Optional[synapse.Synapse] = None) -> torch.optim.Optimizer:
    """``cfg.optimizer`` at ``--lr`` with ``--weight_decay``: plain SGD (the DER protocol's), Adam (L2, as
    torch's) or AdamW (decoupled), both with betas (0.9, 0.999). Over the method's parameter groups where it
    has them (SLCA's slow learner: the backbone at a fraction of ``--lr``), else over the model's parameters
    and those the method keeps outside the model (L2P's prompts and keys). Each group's lr is also recorded
    as its ``initial_lr``, the base of ``--lr_schedule``."""
    groups = getattr(method, "param_groups", None)
    own = method.own_parameters() if method is not None else []
    params = groups(cfg.lr) if callable(groups) else [*model.parameters(), *own]
    extra = {} if cfg.optimizer == "sgd" else {"betas": ADAM_BETAS}
    optimizer = OPTIMIZERS[cfg.optimizer](params, lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)
    return remember_base_lr(optimizer)


def describe_optimizer(cfg: Config) -> str:
    """One line for the run's log: the optimizer, its settings, the lr schedule and the gradient clipping."""
    settings = "no momentum" if cfg.optimizer == "sgd" else f"betas {ADAM_BETAS}"
    schedule = (
        "constant"
        if cfg.lr_schedule == "constant"
        else "cosine over each task's steps, from lr to 1.6% of it (CODA-Prompt's curve)"
    )
    clip = (
        "no gradient clipping"
        if cfg.clip_grad_norm is None
        else f"gradients clipped to total L2 norm {cfg.clip_grad_norm}"
    )
    return (
        f"{cfg.optimizer} ({settings}, weight decay {cfg.weight_decay}) at lr {cfg.lr}, schedule {schedule}; "
        f"{clip}; its state restarts at each task"
    )


class MethodBuildError(ValueError):
    """The method refused the model with the run's settings (a ViT too shallow for its prompt layers, say);
    the message says which, and where the settings are."""


def build_method(cfg: Config, model: nn.Module) -> Optional[synapse.Synapse]:
    """The catalog's method for a continual run (``cfg.method_args`` already resolved); None otherwise."""
    if cfg.training_type != "continual":
        return None
    try:
        return catalog.get(cfg.synapse_type).create(
            model,
            cfg.method_args,
            buffer_size=cfg.buffer_size,
            buffer_sample_size=cfg.buffer_sample_size,
            buffer_scope=cfg.buffer_scope,
            fused=not cfg.unfused,
            # The train augmentation re-applied to replayed items, as the DER authors' code does.
            replay_transform=RandomCropFlip() if cfg.replay_augment else None,
            # A method that retrains from scratch (GDumb) starts from the network as the program builds it (the
            # DER authors' port builds a fresh backbone: their MNIST MLP is Xavier-initialised).
            reinitialize=reinitializer(cfg.init or "default"),
        )
    except ValueError as e:
        settings = ", ".join(f"{k}={v!r}" for k, v in cfg.method_args.items())
        raise MethodBuildError(
            f"{cfg.synapse_type} cannot be built on {cfg.model} with {settings or 'its defaults'}: {e}. Its "
            f"settings have flags of their own (`--synapse_type {cfg.synapse_type} --help` lists them)"
        ) from e
