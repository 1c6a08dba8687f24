"""The contract every registered method keeps, run against the whole catalog (no hand-kept lists).

A method added to the catalog is picked up here automatically: bit-identical resume, a rejected input
that changes nothing, a task-end pass in the documented form, a short learning check, and the
catalog's own promises (hyperparameters parse, the README lists the method).
"""

import inspect
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import mlp
from synapse import Synapse, catalog, named_batches, testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = catalog.names()


def build(name, model):
    spec = catalog.get(name)
    return spec.create(model, spec.harness_hparams, buffer_size=40, buffer_sample_size=8)


def _variants():
    """Each method at its defaults, then once per other choice of each of its hyperparameters with choices
    (``buffer_policy``, ``mask``, ``current_loss``, ``mode``, ...), and unfused where it fuses replay."""
    for spec in catalog.specs():
        yield pytest.param(spec, {}, {}, id=spec.name)
        for h in spec.hparams:
            for choice in h.choices or ():
                if choice != h.default:
                    yield pytest.param(spec, {h.name: choice}, {}, id=f"{spec.name}-{h.name}={choice}")
        if "fused" in inspect.signature(spec.cls).parameters:
            yield pytest.param(spec, {}, {"fused": False}, id=f"{spec.name}-unfused")
    # Paths the defaults do not reach within the harness's few steps.
    yield pytest.param(catalog.get("si"), {"checkpoint_per_steps": 7}, {}, id="si-checkpoint_per_steps=7")


VARIANTS = list(_variants())


@pytest.mark.parametrize("spec, hparams, run", VARIANTS)
def test_resume_is_bit_identical(spec, hparams, run):
    testing.check_resume(spec, hparams, **run)


@pytest.mark.parametrize("spec, hparams, run", VARIANTS)
def test_a_rejected_call_changes_nothing(spec, hparams, run):
    testing.check_rejected_calls(spec, hparams, **run)


@pytest.mark.parametrize("spec", catalog.specs(), ids=NAMES)
def test_out_of_range_hyperparameters_are_refused_before_the_model_is_touched(spec):
    testing.check_bad_hyperparameters(spec)


def _tuned(spec):
    """Other values than the defaults for its weights (alpha = 1 would hide a missing weight)."""
    return {h.name: round(h.default * 0.7 + 0.05, 4) for h in spec.hparams if h.type is float and h.high is None}


REFERENCED = [p for p in VARIANTS if p.values[0].name in testing.REFERENCE_LOSSES] + [
    pytest.param(spec, _tuned(spec), {}, id=f"{spec.name}-tuned")
    for spec in catalog.specs()
    if spec.name in testing.REFERENCE_LOSSES
]


@pytest.mark.parametrize("spec, hparams, run", REFERENCED)
def test_every_step_is_the_papers_loss_on_the_rows_it_replayed(spec, hparams, run):
    testing.check_reference_loss(spec, hparams=hparams, **run)


@pytest.mark.parametrize("name", NAMES)
def test_task_end_accepts_a_loader_through_named_batches(name):
    spec = catalog.get(name)
    toy = testing.toy_for(spec)
    model = toy.model()
    syn = spec.create(model, spec.harness_hparams, **testing.RUN_ARGUMENTS)
    data = toy.batches(testing.TASK_LENGTH - 1)  # no task end yet
    testing.train(model, syn, data, input_name=toy.input_name)
    syn.end_task(named_batches(data, toy.input_name))
    assert syn.num_tasks_ended == 1


def _runs_on_an_mlp(name):
    try:
        build(name, mlp()).remove_hooks()
    except TypeError:  # "prompts need a timm VisionTransformer"
        return False
    return True


@pytest.mark.parametrize("name", NAMES)
def test_learns_the_current_task(name):
    # Four fixed batches of a 2-class problem whose classes are separable: any method must fit it, by the
    # end of the task (GDumb learns only then, from its memory).
    # Methods that need a ViT (the prompt methods) run on the harness's tiny one, the others on an MLP.
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (4, 8), generator=g)
    vit = catalog.get(name).family == "pretrained" and not _runs_on_an_mlp(name)
    shape, key = ((3, testing.IMAGE_SIZE, testing.IMAGE_SIZE), "x") if vit else ((1, 28, 28), "input")
    x = torch.randn(4, 8, *shape, generator=g) * 0.1 + y.view(4, 8, 1, 1, 1).float() * 2 - 1
    torch.manual_seed(0)
    model = testing.toy_vit() if vit else mlp()
    syn = build(name, model)
    opt = torch.optim.SGD(testing.optimized_parameters(model, syn), lr=0.05)

    # A method that masks the logits of classes outside the task (L2P, DualPrompt, CODA-Prompt: ``train_mask``)
    # fits the task's two classes and leaves the other columns as they were: its loss is measured over those two.
    columns = 2 if getattr(syn, "train_mask", False) else None

    def task_loss():
        with torch.no_grad():
            return sum(F.cross_entropy(model(x[i])[:, :columns], y[i]).item() for i in range(4))

    before = task_loss()
    for i in range(24):
        xb, yb = x[i % 4], y[i % 4]
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        syn.backward(loss, yb, **{key: xb})
        opt.step()
    syn.end_task([(y[i], {key: x[i]}) for i in range(4)])
    # A method with its own prediction rule (SimpleCIL's and RanPAC's closed-form classifiers, CODA-Prompt's
    # head masked to the classes seen) is judged by its predictions.
    if type(syn).predict is not Synapse.predict:
        accuracy = sum((syn.predict(**{key: x[i]}).argmax(1) == y[i]).sum().item() for i in range(4)) / y.numel()
        assert accuracy > 0.9
        return
    assert task_loss() < 0.5 * before


@pytest.mark.parametrize("spec", catalog.specs(), ids=NAMES)
def test_catalog_entry_is_complete(spec):
    assert spec.paper and spec.summary and spec.family in catalog.FAMILIES
    assert spec.cls.__doc__ and spec.paper.split(",")[0].split()[0] in spec.cls.__doc__  # the paper is cited
    defaults = spec.resolve({})
    for h in spec.hparams:
        assert h.parse(str(h.default)) == defaults[h.name]  # the CLI's text form round-trips
    with pytest.raises(ValueError, match="no hyperparameter"):
        spec.resolve({"not_a_parameter": 1})


def test_readme_methods_table_lists_the_catalog():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    start, end = readme.index("<!-- methods:start -->"), readme.index("<!-- methods:end -->")
    from synapse.catalog import methods_table

    assert readme[start:end].split("\n", 1)[1].strip() == methods_table().strip()
