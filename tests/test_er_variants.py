"""ER's variants are classes (DER, DERpp, CustomER) that the seed's ``ER(model, method=...)`` builds; state
dicts the variants wrote as "ER" before load into the matching variant only."""

import copy
import inspect
import os
import sys

import pytest
import torch
from torch import nn

from synapse._state import StateError
from synapse.rehearsal import ER, MIR
from synapse.rehearsal.er import DER, CustomER, DERpp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures"))
from make_state_v1 import HERE, two_tasks  # noqa: E402

VARIANTS = {"er": ER, "der": DER, "der++": DERpp}


def custom_loss(logits, past_logits, past_targets):
    return (logits - past_logits).pow(2).mean()


@pytest.mark.parametrize("method, cls", [*VARIANTS.items(), ("custom", CustomER)])
def test_er_builds_the_variant_class(method, cls):
    fn = custom_loss if method == "custom" else None
    by_keyword = ER(nn.Linear(4, 3), method=method, custom_loss_fn=fn)
    by_position = ER(nn.Linear(4, 3), 8, 2, 1.0, 1.0, method, fn)
    for syn in (by_keyword, by_position):
        assert type(syn) is cls and isinstance(syn, ER) and syn.method == method
        assert type(copy.deepcopy(syn)) is cls
        assert syn.state_dict()["method"] == cls.__name__


def test_the_seed_constructor_is_unchanged():
    assert type(ER(nn.Linear(4, 3))) is DERpp  # the seed's default method
    assert inspect.signature(ER).parameters["method"].default == "der++"
    assert list(inspect.signature(ER).parameters)[:7] == [
        "model", "buffer_size", "buffer_sample_size", "alpha", "beta", "method", "custom_loss_fn"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="method must be one of"):
        ER(nn.Linear(4, 3), method="der+")


def test_a_variant_refuses_another_method():
    with pytest.raises(ValueError, match=r"DER is ER's method='der' variant, but got method='der\+\+'"):
        DER(nn.Linear(4, 3))  # the signature's default, 'der++'
    assert type(DER(nn.Linear(4, 3), method="der")) is DER

    class MyReplay(ER):
        def __init__(self, model):
            super().__init__(model, method="der")

    with pytest.raises(ValueError, match="MyReplay builds on ER, ER's method='er' variant.*derive from DER$"):
        MyReplay(nn.Linear(4, 3))


def test_a_method_built_on_er_reports_its_own_name():
    assert MIR(nn.Linear(4, 3)).method == "mir"


@pytest.mark.parametrize("written", ["v1", "format 2"])
@pytest.mark.parametrize("source", VARIANTS)
def test_state_saved_as_er_loads_into_its_variant_only(source, written):
    """Each variant's state dict as the code saved it before the variants were classes (method "ER"), in
    the layout before declared state (the fixture) and in today's: it loads into the variant that wrote it,
    and every other variant refuses it, saying why, and stays as it was."""
    if written == "v1":
        state = torch.load(os.path.join(HERE, "state_v1.pt"), weights_only=False)[source]
    else:
        state = two_tasks(source)[1].state_dict()
        state["method"] = "ER"
    assert state["method"] == "ER"
    for target in VARIANTS:
        _, fresh = two_tasks(target, tasks=1, seed=1)
        before = copy.deepcopy(fresh.state_dict())
        if target == source:
            fresh.load_state_dict(copy.deepcopy(state))
            assert fresh.state_dict()["num_steps"] == state["num_steps"]
            continue
        with pytest.raises(StateError, match="another variant of ER|lacks the fields"):
            fresh.load_state_dict(copy.deepcopy(state))
        after = fresh.state_dict()
        assert after["num_steps"] == before["num_steps"]
        for key, value in before["state"]["buffer"]["storage"].items():
            assert torch.equal(after["state"]["buffer"]["storage"][key], value)


def test_a_variant_refuses_another_variants_state():
    state = two_tasks("der++")[1].state_dict()
    _, der = two_tasks("der", tasks=0)
    with pytest.raises(StateError, match="state dict is for DERpp, but this object is DER"):
        der.load_state_dict(state)
