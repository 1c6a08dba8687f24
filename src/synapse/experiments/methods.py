"""Synapse methods by name, built from the CLI's flags."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from torch import nn

from synapse import Synapse
from synapse.gradient import AGEM
from synapse.rehearsal import ER
from synapse.structure import SI

from .registry import Registry

MethodFactory = Callable[[nn.Module, Mapping[str, Any]], Synapse]
METHODS: Registry[MethodFactory] = Registry("synapse type")


def _replay(method: str) -> MethodFactory:
    def build(model: nn.Module, cfg: Mapping[str, Any]) -> Synapse:
        return ER(
            model,
            cfg["buffer_size"],
            cfg["buffer_sample_size"],
            alpha=cfg["alpha"],
            beta=cfg["beta"],
            method=method,
            fused=not cfg.get("unfused", False),
            buffer_scope=cfg.get("buffer_scope", "rank"),
        )

    return build


for _name in ("er", "der", "der++"):
    METHODS.register(_name)(_replay(_name))


@METHODS.register("agem")
def _agem(model: nn.Module, cfg: Mapping[str, Any]) -> Synapse:
    return AGEM(model, cfg["buffer_size"], cfg["buffer_sample_size"], buffer_scope=cfg.get("buffer_scope", "rank"))


@METHODS.register("si")
def _si(model: nn.Module, cfg: Mapping[str, Any]) -> Synapse:
    # The run calls end_task() at every boundary; checkpoint_per_steps stays as a task-free fallback.
    return SI(model, model_lr=cfg["lr"], alpha=cfg["alpha"], xi=cfg["xi"])
