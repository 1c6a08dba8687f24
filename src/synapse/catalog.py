"""One registration per method: its name, class, paper and hyperparameters.

Everything that lists methods reads this catalog: the CLI's ``--synapse_type`` choices and flags, the
checkpoint identity, the contract tests, every benchmark's rows and tables (with the methods' presets in
``synapse/experiments/presets/``) and the README's methods table. A method file registers itself next to its
class, and is found by discovery (every module of each family package is imported)::

    register(MethodSpec("ewc", EWC, family="structure", paper="Kirkpatrick et al. 2017, ...",
                        hparams=(HParam("ewc_lambda", float, 90.0, "penalty strength", low=0.0),)))

Hyperparameter names are the constructor's keyword arguments, so a spec builds its method with no
glue code. The buffer arguments (``buffer_size``, ``buffer_sample_size``, ``buffer_scope``, ``fused``)
are passed to the methods whose constructors take them.
"""

from __future__ import annotations

import importlib
import inspect
import math
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from torch import nn

__all__ = ["HParam", "MethodSpec", "register", "get", "names", "specs", "methods_table", "usage_table"]

FAMILIES = ("rehearsal", "gradient", "structure", "distillation", "pretrained")
# Arguments the experiment program sets from its own flags rather than from method hyperparameters.
RUN_ARGUMENTS = ("buffer_size", "buffer_sample_size", "buffer_scope", "fused", "replay_transform", "reinitialize")


@dataclass(frozen=True)
class HParam:
    """One hyperparameter: a constructor keyword with its type, default and allowed range."""

    name: str
    type: type  # int, float, str or bool
    default: Any
    help: str
    low: Optional[float] = None  # inclusive lower bound (exclusive with low_open)
    low_open: bool = False
    high: Optional[float] = None  # inclusive upper bound
    choices: Optional[Tuple[Any, ...]] = None

    def parse(self, value: Any) -> Any:
        """``value`` (a string from the command line, or already typed) as this parameter's type;
        raises ``ValueError`` naming the parameter when it is not acceptable."""
        if isinstance(value, str) and self.type is not str:
            text = value.strip()
            try:
                if self.type is bool:
                    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError
                    value = text.lower() in ("true", "1", "yes")
                else:
                    value = self.type(text)
            except ValueError:
                raise ValueError(f"{self.name} must be a {self.type.__name__}, got {text!r}") from None
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.type) or (self.type is not bool and isinstance(value, bool)):
            raise ValueError(f"{self.name} must be a {self.type.__name__}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{self.name} must be one of {self.choices}, got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            bad = not math.isfinite(value)
            if self.low is not None:
                bad = bad or (value <= self.low if self.low_open else value < self.low)
            if self.high is not None:
                bad = bad or value > self.high
            if bad:
                raise ValueError(f"{self.name} must be {self.range_text()}, got {value!r}")
        return value

    def range_text(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"<= {self.high:g}")
        return "finite and " + " and ".join(parts) if parts else "finite"


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Args:
        name: the CLI name (``--synapse_type``).
        cls: the class, a :class:`~synapse.Synapse` subclass.
        family: its package: rehearsal, gradient, structure, distillation or pretrained.
        paper: the citation shown in the README and ``--help``.
        hparams: the hyperparameters the CLI exposes, by constructor keyword.
        fixed: keywords every instance gets (``{"method": "der"}`` for ER's DER variant).
        summary: one line for ``--help`` and the README.
        display: its name in benchmark tables (default: the class name).
        order: its position in benchmark tables (they list methods in the order they joined the
            reproduction); methods that leave it unset come after, in catalog order.
        floor: its floor step for ``benchmarks/step_overhead.py``, a :class:`synapse._floor.Floor` subclass:
            ``floor(model, buffer_size, minibatch, item_shape, hparams)`` has ``forward(x)`` and
            ``backward(loss, targets, inputs, logits)``, the method's irreducible work in plain torch.
        toy: the toy model and batches the contract harness runs it on, by name in
            :data:`synapse.testing.TOYS`: ``'mlp'`` (vector inputs) or ``'vit'`` (a tiny random timm ViT, for
            the methods on pretrained backbones).
        harness_hparams: hyperparameters the harness's short runs use beside the defaults, to keep them
            cheap (RanPAC's 10000-wide projection is 64 wide there).
    """

    name: str
    cls: type
    family: str
    paper: str
    hparams: Tuple[HParam, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""
    display: str = ""
    order: int = 1000
    floor: Optional[Callable[..., Any]] = field(default=None, compare=False)
    toy: str = "mlp"
    harness_hparams: Mapping[str, Any] = field(default_factory=dict)

    @property
    def display_name(self) -> str:
        return self.display or self.cls.__name__

    @property
    def regulariser(self) -> bool:
        """A penalty on the weights or outputs with no memory of past data (the structure and distillation
        families): the DER paper's regularisation baselines."""
        return self.family in ("structure", "distillation") and not self.has_buffer

    @property
    def has_buffer(self) -> bool:
        return "buffer_size" in inspect.signature(self.cls).parameters

    @property
    def task_free(self) -> bool:
        """Runs without task boundaries (on a task-free stream): not a method that does its work at task ends
        (``acts_at_task_end``, e.g. EWC's penalty or LwF's teacher), which would be plain fine-tuning there."""
        return not (getattr(self.cls, "needs_task_boundaries", False) or getattr(self.cls, "acts_at_task_end", False))

    def defaults(self) -> Dict[str, Any]:
        return {h.name: h.default for h in self.hparams}

    def resolve(self, given: Mapping[str, Any]) -> Dict[str, Any]:
        """The defaults updated with ``given`` (parsed and checked); raises on an unknown name."""
        known = {h.name: h for h in self.hparams}
        unknown = sorted(set(given) - set(known))
        if unknown:
            accepted = ", ".join(known) or "none"
            raise ValueError(f"{self.name} has no hyperparameter {', '.join(unknown)}; it accepts: {accepted}")
        return {name: known[name].parse(given[name]) if name in given else h.default for name, h in known.items()}

    def create(self, model: nn.Module, hparams: Optional[Mapping[str, Any]] = None, **run_arguments: Any) -> Any:
        """Build the method on ``model``: defaults, then ``hparams``, then the run arguments that the
        constructor takes (the rest, e.g. ``buffer_size`` for a method without a memory, are ignored)."""
        accepted = inspect.signature(self.cls).parameters
        unknown = sorted(set(run_arguments) - set(RUN_ARGUMENTS))
        if unknown:
            raise TypeError(f"unknown run arguments {unknown}; accepted: {RUN_ARGUMENTS}")
        kwargs = {k: v for k, v in run_arguments.items() if k in accepted and v is not None}
        return self.cls(model, **self.fixed, **self.resolve(hparams or {}), **kwargs)


_REGISTRY: Dict[str, MethodSpec] = {}
_loaded = False


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the catalog (once per name)."""
    if spec.family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {spec.family!r}")
    if spec.name in _REGISTRY and _REGISTRY[spec.name] != spec:
        raise ValueError(f"method {spec.name!r} is registered twice")
    names_ = [h.name for h in spec.hparams]
    if len(set(names_)) != len(names_):
        raise ValueError(f"{spec.name}: hyperparameter names repeat: {names_}")
    accepted = inspect.signature(spec.cls).parameters
    missing = [n for n in [*names_, *spec.fixed] if n not in accepted]
    if missing:
        raise ValueError(f"{spec.name}: {spec.cls.__name__} takes no keyword {missing}")
    _REGISTRY[spec.name] = spec
    return spec


def _load() -> None:
    """Import every module of every family package, so that each method file has registered itself: a
    method is its one file, and a family ``__init__`` that forgets to import it cannot drop it."""
    global _loaded
    if not _loaded:
        for family in FAMILIES:
            package = importlib.import_module(f"synapse.{family}")
            for module in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{package.__name__}.{module.name}")
        _loaded = True


def specs() -> List[MethodSpec]:
    """Every registered method: family by family in :data:`FAMILIES` order, each family in its package's
    registration order. (Across families, registration order follows whichever package a program imports
    first; listings, CLI choices and messages should not.)"""
    _load()
    return sorted(_REGISTRY.values(), key=lambda spec: FAMILIES.index(spec.family))


def names() -> List[str]:
    return [s.name for s in specs()]


def get(name: str) -> MethodSpec:
    _load()
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; choose from {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def usage_table() -> str:
    """The README's table of what each method asks of your loop, from the classes' attributes and from each
    method as its defaults build it (on its harness toy model): task ends, predictor, forward mode, logits."""
    from .testing import toy_for  # the harness's toys (a tiny ViT for the prompt methods)

    rows = [
        "| CLI name | `end_task` | Evaluate with | Forward that produced the loss | Outputs |",
        "|---|---|---|---|---|",
    ]
    for spec in specs():
        method = spec.create(toy_for(spec).model(), spec.harness_hparams)
        method.remove_hooks()
        if method.needs_task_data:
            task_end = "**needed, with data**: `end_task(named_batches(loader))`"
        elif method.acts_at_task_end:
            task_end = "**needed**: `end_task()`"
        else:
            task_end = "optional"
        predictor = "`synapse.predict(...)` (its own rule)" if method.has_predictor else "the model (or `predict`)"
        if method.needs_training_forward:
            forward = "train mode, grad enabled"
        else:
            forward = "any" if method.trains_model else "eval mode (nothing trains; BatchNorm stays put)"
        outputs = "raw logits" if method.reads_logits else "logits or log-probabilities"
        rows.append(f"| `{spec.name}` | {task_end} | {predictor} | {forward} | {outputs} |")
    return "\n".join(rows)


def methods_table() -> str:
    """The README's methods table, in markdown: one row per registered method."""
    rows = ["| Family | CLI name | Class | What it does | Paper |", "|---|---|---|---|---|"]
    for spec in specs():
        fixed = "".join(f", {k}={v!r}" for k, v in spec.fixed.items())
        call = f"`{spec.cls.__module__.rsplit('.', 1)[0]}.{spec.cls.__name__}(model{fixed})`"
        rows.append(f"| {spec.family} | `{spec.name}` | {call} | {spec.summary} | {spec.paper} |")
    return "\n".join(rows)
