"""The harness every catalog method runs through, and the papers' losses written out independently.

Like ``torch.testing`` this module is part of the library (pure torch), so that a method written outside
Synapse, or a ``custom`` loss, can be held to the same contract as the built-in ones. Each check takes a
:class:`~synapse.catalog.MethodSpec` and raises ``AssertionError`` naming what broke:

* :func:`check_resume`: a run resumed from ``state_dict()`` (at a task end and in mid-task) continues
  bit-identically, into a freshly built object on a freshly seeded model;
* :func:`check_rejected_calls`: bad arguments to ``backward`` and ``end_task`` raise and leave the state
  dict and the gradients exactly as they were, and the object still trains;
* :func:`check_bad_hyperparameters`: every out-of-range value the catalog's typed ranges describe
  (:func:`bad_values`) is refused by the constructor with a message naming the argument, before the
  model is touched;
* :func:`check_reference_loss`: each step's gradient equals the gradient of the paper's loss, computed
  on a copy of the model taken before the step, on the rows the method replayed
  (the ``last_replay`` attribute of a method with a memory).

The reference losses (:data:`REFERENCE_LOSSES`, by catalog name) are written from the papers' equations
with plain ``torch.nn.functional`` calls, not from the methods' code; the benchmarks' cross-checks use
the same ones.

Example:
    >>> from synapse import catalog, testing
    >>> spec = catalog.get("der++")
    >>> testing.check_resume(spec)
    >>> testing.check_reference_loss(spec, steps=6)
"""

from __future__ import annotations

import copy
import inspect
import math
from functools import partial
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .catalog import HParam, MethodSpec

__all__ = [
    "ReferenceStep",
    "REFERENCE_LOSSES",
    "er_loss",
    "der_loss",
    "derpp_loss",
    "er_ace_loss",
    "lwf_loss",
    "Toy",
    "TOYS",
    "toy_model",
    "toy_batches",
    "toy_vit",
    "toy_images",
    "toy_for",
    "experiment_model",
    "cli_model_args",
    "optimized_parameters",
    "train",
    "state_equal",
    "bad_values",
    "check_resume",
    "check_rejected_calls",
    "check_bad_hyperparameters",
    "check_reference_loss",
]

Batch = Tuple[Tensor, Tensor]  # (inputs, targets)
TASK_LENGTH = 4  # steps per task in the harness's runs
FEATURES, CLASSES = 20, 10
RUN_ARGUMENTS = {"buffer_size": 16, "buffer_sample_size": 8}


# ---------------------------------------------------------------------------------------------- the runs
def toy_model(features: int = FEATURES, classes: int = CLASSES) -> nn.Module:
    """A small MLP, ``forward(input)`` (so the harness passes ``input=x``), with a linear head last."""
    return nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, classes))


def toy_batches(n: int, batch: int = 8, seed: int = 0, features: int = FEATURES, classes: int = CLASSES) -> List[Batch]:
    """``n`` random ``(inputs, targets)`` batches, the same for the same ``seed``."""
    return _random_batches(n, (features,), batch, seed, classes)


IMAGE_SIZE = 16
TINY_VIT = "vit_tiny_patch16_224"
TINY_VIT_ARGS: Dict[str, Any] = {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def toy_vit(classes: int = CLASSES) -> nn.Module:
    """A tiny randomly initialised timm ViT (16x16 images in 2x2 patches of 8, 2 blocks of width 32),
    ``forward(x)``: what the methods on pretrained backbones run on in tests. Needs ``timm``."""
    try:
        import timm  # optional: only the pretrained family's harness runs need it
    except ImportError:
        raise ImportError("the 'vit' toy model needs timm: pip install 'torch-synapse[timm]'") from None
    return timm.create_model(TINY_VIT, pretrained=False, img_size=IMAGE_SIZE, num_classes=classes, **TINY_VIT_ARGS)


def toy_images(n: int, batch: int = 8, seed: int = 0, classes: int = CLASSES) -> List[Batch]:
    """``n`` random ``(images, targets)`` batches for :func:`toy_vit`, the same for the same ``seed``."""
    return _random_batches(n, (3, IMAGE_SIZE, IMAGE_SIZE), batch, seed, classes)


def _random_batches(n: int, shape: Tuple[int, ...], batch: int, seed: int, classes: int) -> List[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g)) for _ in range(n)
    ]


def experiment_model(spec: MethodSpec) -> Dict[str, Any]:
    """The experiment program's model settings (``Config`` fields) for a short test run of ``spec``: none (the
    dataset's default model) for most methods; :func:`toy_vit`'s tiny timm ViT for those that need a ViT."""
    if not getattr(spec.cls, "requires_vit", False):
        return {}
    return {"model": f"timm:{TINY_VIT}", "input_size": IMAGE_SIZE, "model_args": dict(TINY_VIT_ARGS)}


def cli_model_args(spec: MethodSpec) -> List[str]:
    """:func:`experiment_model` as the experiment program's flags."""
    fields = experiment_model(spec)
    if not fields:
        return []
    kwargs = [f"{k}={v}" for k, v in fields["model_args"].items()]
    return ["--model", fields["model"], "--input_size", str(fields["input_size"]), "--model_args", *kwargs]


class Toy(NamedTuple):
    """A toy model and its batches, as the harness runs a method (:attr:`MethodSpec.toy` names one)."""

    model: Callable[[], nn.Module]  # built under torch's global seed
    batches: Callable[[int], List[Batch]]  # n -> n batches (8 rows, 10 classes, seed 0)
    input_name: str  # the model's forward parameter: backward(loss, y, **{input_name: x})


TOYS: Dict[str, Toy] = {"mlp": Toy(toy_model, toy_batches, "input"), "vit": Toy(toy_vit, toy_images, "x")}


def toy_for(spec: MethodSpec) -> Toy:
    """The toy that ``spec`` names (``'mlp'`` unless the catalog entry says otherwise)."""
    if spec.toy not in TOYS:
        raise KeyError(f"{spec.name}: unknown toy {spec.toy!r}; the harness has {sorted(TOYS)}")
    return TOYS[spec.toy]


def _task_data(data: Sequence[Batch], input_name: str = "input") -> List[Tuple[Tensor, Dict[str, Tensor]]]:
    return [(y, {input_name: x}) for x, y in data]


def optimized_parameters(model: nn.Module, method: Any) -> List[nn.Parameter]:
    """What the harness's optimizer steps: the model's parameters, then those the method keeps outside it
    (:meth:`~synapse.Synapse.own_parameters`: prompts and keys)."""
    return [*model.parameters(), *method.own_parameters()]


def train(
    model: nn.Module,
    method: Any,
    data: Sequence[Batch],
    start: int = 0,
    optimizer: Optional[torch.optim.Optimizer] = None,
    lr: float = 0.05,
    task_length: int = TASK_LENGTH,
    input_name: str = "input",
) -> torch.optim.Optimizer:
    """Steps ``start, start + 1, ...`` of ``data`` with SGD; a task ends (with its data) every ``task_length``
    steps. The inputs go to ``backward`` as ``input_name`` (the toy's). Returns the optimizer, to continue
    or to save."""
    optimizer = optimizer or torch.optim.SGD(optimized_parameters(model, method), lr=lr)
    for i, (x, y) in enumerate(data[start:], start):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        method.backward(loss, y, **{input_name: x})
        optimizer.step()
        if (i + 1) % task_length == 0:
            method.end_task(_task_data(data[i + 1 - task_length : i + 1], input_name))
    return optimizer


def state_equal(a: Any, b: Any) -> bool:
    """Whether two state dicts (nested dicts, lists, tensors, numbers) are equal, tensors bit for bit."""
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _diff(a: Any, b: Any, path: str = "") -> str:
    """The first place two state dicts differ, for the failure message."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if a.keys() != b.keys():
            return f"{path or '/'}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        return next((d for k in a for d in [_diff(a[k], b[k], f"{path}/{k}")] if d), "")
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return next((d for i, (x, y) in enumerate(zip(a, b)) for d in [_diff(x, y, f"{path}/{i}")] if d), "")
    return "" if state_equal(a, b) else f"{path or '/'} differs"


def _build(spec: MethodSpec, model: nn.Module, hparams: Optional[Mapping[str, Any]], **run: Any) -> Any:
    return spec.create(model, {**spec.harness_hparams, **(hparams or {})}, **{**RUN_ARGUMENTS, **run})


# ------------------------------------------------------------------------------------------------ resume
def check_resume(
    spec: MethodSpec,
    hparams: Optional[Mapping[str, Any]] = None,
    resume_at: Sequence[int] = (TASK_LENGTH, TASK_LENGTH + 3),
    steps: int = 2 * TASK_LENGTH + 2,
    **run_arguments: Any,
) -> None:
    """A run saved after each step in ``resume_at`` (the default: right after the first task end, and in
    mid-task after it) and resumed by a new object on a model built under another seed ends bit-identical
    to the uninterrupted run: parameters and the method's state dict.

    Args:
        spec: the method.
        hparams: hyperparameters besides the defaults.
        resume_at: the steps after which the run is saved.
        steps: the run's length (a task ends every ``TASK_LENGTH`` steps).
        **run_arguments: e.g. ``fused=False`` (see :meth:`~synapse.catalog.MethodSpec.create`).
    """
    toy = toy_for(spec)
    data = toy.batches(steps)
    torch.manual_seed(1)
    model = toy.model()
    method = _build(spec, model, hparams, **run_arguments)
    run = partial(train, input_name=toy.input_name)
    saved, optimizer, done = [], None, 0
    for at in sorted(resume_at):
        optimizer = run(model, method, data[:at], start=done, optimizer=optimizer)
        saved.append((at, copy.deepcopy((model.state_dict(), optimizer.state_dict(), method.state_dict()))))
        done = at
    run(model, method, data, start=done, optimizer=optimizer)
    for at, (weights, optimizer_state, method_state) in saved:
        torch.manual_seed(99)  # another process: another initialisation and seeds, all overwritten by the loads
        resumed = toy.model()
        resumed.load_state_dict(weights)
        method2 = _build(spec, resumed, hparams, **run_arguments)
        method2.load_state_dict(method_state)
        optimizer2 = torch.optim.SGD(optimized_parameters(resumed, method2), lr=0.05)
        optimizer2.load_state_dict(optimizer_state)
        run(resumed, method2, data, start=at, optimizer=optimizer2)
        where = f"{spec.name} resumed after step {at}"
        for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
            assert torch.equal(a, b), f"{where}: parameter {name} differs from the uninterrupted run"
        first, second = method.state_dict(), method2.state_dict()
        assert state_equal(first, second), f"{where}: the state dict differs from the uninterrupted run's at " + _diff(
            first, second
        )


# ------------------------------------------------------------------------------------------- rejections
def _grads(model: nn.Module) -> List[Optional[Tensor]]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _expect_refusal(call: Callable[[], Any], what: str) -> str:
    try:
        call()
    except (TypeError, ValueError) as error:
        return str(error)
    raise AssertionError(f"{what} was accepted")


def check_rejected_calls(spec: MethodSpec, hparams: Optional[Mapping[str, Any]] = None, **run_arguments: Any) -> None:
    """Bad arguments to ``backward`` and ``end_task`` raise ``TypeError``/``ValueError`` with a message that
    says what is wrong, and change neither the state dict nor any ``.grad``; afterwards the same object
    still trains. The calls: targets that are float, 2-d or of another batch size; a loss that is not a
    scalar or has no graph; no model inputs; for a method with a memory, inputs of another shape, dtype or
    name than those stored; ``end_task`` given a tensor, or no data when the method ``needs_task_data``."""
    toy = toy_for(spec)
    data = toy.batches(TASK_LENGTH + 2)
    model = toy.model()
    method = _build(spec, model, hparams, **run_arguments)
    train(model, method, data, input_name=toy.input_name)  # past a task end: memories, teachers and importances exist
    x, y = data[0]
    key = toy.input_name
    out = model(x)  # a fused replay draws here: the snapshot comes after it
    before = copy.deepcopy(method.state_dict())
    model.zero_grad()
    grads = _grads(model)
    loss, per_row = F.cross_entropy(out, y), F.cross_entropy(out, y, reduction="none")
    bad_calls: List[Tuple[str, str, Callable[[], Any]]] = [
        ("float targets", "integer", lambda: method.backward(loss, y.float(), **{key: x})),
        ("2-d targets", "1-d", lambda: method.backward(loss, y[:, None], **{key: x})),
        ("targets of another batch size", "batch size", lambda: method.backward(loss, y[:4], **{key: x})),
        ("a loss that is not a scalar", "scalar", lambda: method.backward(per_row, y, **{key: x})),
        ("a loss without a graph", "require grad", lambda: method.backward(loss.detach(), y, **{key: x})),
        ("no model inputs", "keyword", lambda: method.backward(loss, y)),
        ("end_task(a tensor)", "data", lambda: method.end_task(torch.zeros(3))),
    ]
    if spec.has_buffer:  # what it stores fixes the inputs' names, shapes and dtypes
        bad_calls += [
            ("inputs of another shape", "shape", lambda: method.backward(loss, y, **{key: x[:, : x.shape[1] // 2]})),
            ("inputs of another dtype", "dtype", lambda: method.backward(loss, y, **{key: x.double()})),
            ("inputs under another name", "", lambda: method.backward(loss, y, **{key + "_other": x})),
        ]
    if type(method).needs_task_data:
        bad_calls.append(("end_task() without data", "data", lambda: method.end_task()))
    for what, says, call in bad_calls:
        message = _expect_refusal(call, f"{spec.name}: {what}")
        assert says in message, f"{spec.name}: {what} was refused, but the message does not say {says!r}: {message}"
        after = method.state_dict()
        assert state_equal(after, before), f"{spec.name}: rejected {what} changed {_diff(before, after)}"
        for (name, p), g in zip(model.named_parameters(), grads):
            same = (p.grad is None and g is None) or (p.grad is not None and g is not None and torch.equal(p.grad, g))
            assert same, f"{spec.name}: rejected {what} changed the gradient of {name}"
    method.backward(F.cross_entropy(model(x), y), y, **{key: x})  # the same object still trains


# ---------------------------------------------------------------------------------- bad hyperparameters
def bad_values(hparam: HParam) -> List[Tuple[Any, str]]:
    """``(value, why)`` pairs that ``hparam``'s declared type and range exclude: the wrong type, each side
    of its bounds, non-finite numbers and a value outside its choices."""
    cases: List[Tuple[Any, str]] = []
    if hparam.type is bool:
        return [("yes", "a string for a bool"), (2, "an int for a bool")]
    if hparam.type is str:
        cases.append((0, "a number for a string"))
    else:
        cases.append(("1", "a string for a number"))
    if hparam.type is int:
        cases += [(1.5, "a float for an int"), (True, "a bool for an int")]
    if hparam.type is float:
        cases += [(math.nan, "nan"), (math.inf, "inf")]
    if hparam.low is not None:
        low = hparam.type(hparam.low)
        cases.append((low if hparam.low_open else low - 1, f"below the lower bound {hparam.low:g}"))
    if hparam.high is not None:
        cases.append((hparam.type(hparam.high) + 1, f"above the upper bound {hparam.high:g}"))
    if hparam.choices is not None:
        cases.append(("not-a-choice", f"not one of {hparam.choices}"))
    return cases


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


# The memory's arguments, which the catalog leaves to the run (``MethodSpec.create``'s run arguments).
MEMORY_ARGUMENTS = (
    HParam("buffer_size", int, 40, "items kept", low=1),
    HParam("buffer_sample_size", int, 8, "items per replay minibatch", low=1),
    HParam("buffer_scope", str, "rank", "whose budget buffer_size is", choices=("rank", "global")),
)


def check_bad_hyperparameters(spec: MethodSpec) -> None:
    """The constructor refuses each of :func:`bad_values` of every hyperparameter the catalog declares (and
    of the memory's arguments, :data:`MEMORY_ARGUMENTS`, where the constructor takes them), passed
    directly rather than through the CLI's parser, with a ``TypeError``/``ValueError`` that names the
    argument, and leaves everything as it was: no hooks added, parameters untouched, no seed drawn from
    torch's generator."""
    accepted = inspect.signature(spec.cls).parameters
    run = {k: v for k, v in RUN_ARGUMENTS.items() if k in accepted}
    for hparam in (*spec.hparams, *(h for h in MEMORY_ARGUMENTS if h.name in accepted)):
        for value, why in bad_values(hparam):
            model = toy_for(spec).model()
            weights = copy.deepcopy(model.state_dict())
            hooks = _hooks(model)
            kwargs = {**spec.fixed, **spec.resolve(spec.harness_hparams), **run, hparam.name: value}
            what = f"{spec.name}({hparam.name}={value!r}), {why},"
            rng = torch.get_rng_state()
            message = _expect_refusal(partial(spec.cls, model, **kwargs), what)
            assert hparam.name in message, f"{what} was refused without naming {hparam.name!r}: {message}"
            assert torch.equal(torch.get_rng_state(), rng), f"{what} was refused after drawing a seed"
            assert _hooks(model) == hooks, f"{what} was refused after hooking the model"
            assert state_equal(model.state_dict(), weights), f"{what} was refused after changing the model"


# ------------------------------------------------------------------------------------- reference losses
class ReferenceStep(NamedTuple):
    """What a reference loss sees of one training step."""

    inputs: Tensor  # the incoming batch
    targets: Tensor
    replay: Optional[Dict[str, Tensor]]  # the rows the method replayed this step (its last_replay), or None
    hparams: Dict[str, Any]  # the method's resolved hyperparameters
    seen: Tensor  # every label of the run so far, this batch's included
    task_seen: Tensor  # the labels since the last task end, this batch's included
    model_at_task_end: Optional[nn.Module] = None  # a copy of the model taken at the last task end, or None
    seen_at_task_end: Optional[Tensor] = None  # every label seen before the last task end, or None


def _replayed_inputs(replay: Mapping[str, Tensor]) -> Tensor:
    (inputs,) = [v for k, v in replay.items() if k.startswith("input:")]  # the harness's models take one input
    return inputs


def er_loss(model: nn.Module, step: ReferenceStep) -> Tensor:
    """ER (Chaudhry et al. 2019): ``CE(f(x), y) + alpha * CE(f(x'), y')`` on the replayed rows."""
    loss = F.cross_entropy(model(step.inputs), step.targets)
    if step.replay is None:
        return loss
    alpha = step.hparams.get("alpha", 1.0)
    return loss + alpha * F.cross_entropy(model(_replayed_inputs(step.replay)), step.replay["targets"])


def der_loss(model: nn.Module, step: ReferenceStep) -> Tensor:
    """DER (Buzzega et al. 2020, eq. 4): ``CE(f(x), y) + alpha * MSE(f(x'), z')`` with ``z'`` the stored logits."""
    return derpp_loss(model, step, second_minibatch=False)


def derpp_loss(model: nn.Module, step: ReferenceStep, second_minibatch: bool = True) -> Tensor:
    """DER++ (Buzzega et al. 2020, eq. 6): ``CE(f(x), y) + alpha * MSE(f(x'), z') + beta * CE(f(x''), y'')``,
    ``(x', z')`` the first replayed minibatch and ``(x'', y'')`` the second, mean reductions as the
    authors' code."""
    loss = F.cross_entropy(model(step.inputs), step.targets)
    if step.replay is None:
        return loss
    inputs, logits = _replayed_inputs(step.replay), step.replay["logits"]
    k = inputs.shape[0] // (2 if second_minibatch else 1)
    out = model(inputs[:k])
    loss = loss + step.hparams["alpha"] * F.mse_loss(out, logits[:k].to(out.dtype))
    if second_minibatch:
        loss = loss + step.hparams["beta"] * F.cross_entropy(model(inputs[k:]), step.replay["targets"][k:])
    return loss


def er_ace_loss(model: nn.Module, step: ReferenceStep) -> Tensor:
    """ER-ACE (Caccia et al. 2022), as its authors' code: the incoming batch's cross-entropy with the softmax
    over only the columns ``C`` (this batch's labels, or this task's with ``mask='task'``, and every class
    from the largest label seen upward), plus ``alpha * CE(f(x'), y')`` on the replayed rows."""
    logits = model(step.inputs)
    if step.hparams.get("current_loss", "method") == "user":
        loss = F.cross_entropy(logits, step.targets)
    else:
        labels = step.task_seen if step.hparams.get("mask", "batch") == "task" else step.targets
        largest = int(step.seen.max())
        columns = sorted(set(labels.tolist()) | set(range(largest, logits.shape[1])))
        position = {c: i for i, c in enumerate(columns)}
        remapped = torch.tensor([position[int(t)] for t in step.targets])
        loss = F.cross_entropy(logits[:, columns], remapped)
    if step.replay is None:
        return loss
    return loss + step.hparams.get("alpha", 1.0) * F.cross_entropy(
        model(_replayed_inputs(step.replay)), step.replay["targets"]
    )


def lwf_loss(model: nn.Module, step: ReferenceStep) -> Tensor:
    """LwF (Li & Hoiem 2016, eq. 2): ``CE(f(x), y) + alpha * L_old``, ``L_old`` the cross-entropy between the
    model at the last task end (the teacher) and the model, both softened by ``T`` and normalised over the
    classes seen before that task end only: ``-(1/B) sum_b sum_{j in O} p_bj log q_bj``."""
    logits = model(step.inputs)
    loss = F.cross_entropy(logits, step.targets)
    if step.model_at_task_end is None or step.seen_at_task_end is None:
        return loss
    old = sorted(set(step.seen_at_task_end.tolist()))
    temperature = step.hparams.get("temperature", 2.0)
    with torch.no_grad():
        p = torch.softmax(step.model_at_task_end(step.inputs)[:, old] / temperature, dim=1)
    log_q = torch.log_softmax(logits[:, old] / temperature, dim=1)
    return loss + step.hparams.get("alpha", 1.0) * -(p * log_q).sum(1).mean()


ReferenceLoss = Callable[[nn.Module, ReferenceStep], Tensor]
# The paper's loss of each method whose step is one loss on the incoming batch and the replayed rows
# (MIR's is ER's, on the rows its retrieval chose).
REFERENCE_LOSSES: Dict[str, ReferenceLoss] = {
    "er": er_loss,
    "der": der_loss,
    "der++": derpp_loss,
    "er-ace": er_ace_loss,
    "mir": er_loss,
    "lwf": lwf_loss,
}


def check_reference_loss(
    spec: MethodSpec,
    reference: Optional[ReferenceLoss] = None,
    hparams: Optional[Mapping[str, Any]] = None,
    steps: int = 2 * TASK_LENGTH,
    rtol: float = 1e-5,
    atol: float = 1e-7,
    **run_arguments: Any,
) -> None:
    """Along a class-incremental run (through the memory's filling and a task end), each step's gradient
    equals the gradient of ``reference`` (default: :data:`REFERENCE_LOSSES`) on a copy of the model taken
    before the step, given the rows the method replayed. A slip in which rows feed which term, in a term's
    weight or in a class mask fails.

    Args:
        spec: the method.
        reference: ``reference(model, step) -> loss``, the paper's loss (:class:`ReferenceStep`).
        hparams: hyperparameters besides the defaults.
        steps: the run's length; a task ends every ``TASK_LENGTH`` steps.
        rtol, atol: the tolerance of the comparison (float rounding only).
        **run_arguments: e.g. ``fused=False``.
    """
    if reference is None and spec.name not in REFERENCE_LOSSES:
        raise ValueError(f"no reference loss for {spec.name!r} in REFERENCE_LOSSES: pass reference=")
    reference = reference or REFERENCE_LOSSES[spec.name]
    resolved = {**spec.fixed, **spec.resolve({**spec.harness_hparams, **(hparams or {})})}
    toy = toy_for(spec)
    model = toy.model()
    method = _build(spec, model, hparams, **{"buffer_size": 24, "buffer_sample_size": 6, **run_arguments})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    # Class-incremental: each task has half the classes, so that masks over old, seen or present classes bite.
    half = CLASSES // 2
    data = [(x, y % half + half * (i // TASK_LENGTH % 2)) for i, (x, y) in enumerate(toy.batches(steps))]
    seen: List[Tensor] = []
    task_start, replayed = 0, 0
    at_task_end: Optional[nn.Module] = None
    for i, (x, y) in enumerate(data):
        before = copy.deepcopy(model)  # a deep copy of a hooked model is a plain model
        last = getattr(method, "last_replay", None)
        optimizer.zero_grad()
        method.backward(F.cross_entropy(model(x), y), y, **{toy.input_name: x})
        replay = getattr(method, "last_replay", None)
        replay = None if replay is last else replay
        replayed += replay is not None
        seen.append(y)
        earlier = torch.cat(seen[:task_start]) if task_start else None
        step = ReferenceStep(
            x, y, replay, resolved, torch.cat(seen), torch.cat(seen[task_start:]), at_task_end, earlier
        )
        expected = torch.autograd.grad(reference(before, step), list(before.parameters()), allow_unused=True)
        for (name, p), g in zip(model.named_parameters(), expected):
            got = p.grad if p.grad is not None else torch.zeros_like(p)
            want = g if g is not None else torch.zeros_like(p)
            assert torch.allclose(got, want, rtol=rtol, atol=atol), (
                f"{spec.name}, step {i}: the gradient of {name} is not the reference loss's "
                f"(largest difference {float((got - want).abs().max()):.3g})"
            )
        optimizer.step()
        if (i + 1) % TASK_LENGTH == 0:
            method.end_task(_task_data(data[i + 1 - TASK_LENGTH : i + 1], toy.input_name))
            task_start, at_task_end = len(seen), copy.deepcopy(model)
    # A memoryless method's reference differs from the plain loss after the first task end.
    checked = replayed if spec.has_buffer else steps - TASK_LENGTH
    assert checked >= steps // 2, f"{spec.name} replayed at only {replayed} of {steps} steps: nothing was checked"
