"""Declared state (synapse._state), over the whole catalog: a method's own state dict loads into a fresh
object, and a state dict that does not fit -- one tensor a row longer or of another dtype, a key missing
or one too many -- raises a clear error and leaves the object exactly as it was. State dicts written by
the code before declared state (tests/fixtures/state_v1.pt) still load."""

import copy
import os
import sys

import pytest
import torch

from synapse import catalog
from synapse._state import AtMost, StateError, Stateful

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures"))
from make_state_v1 import HERE, tiny_model, two_tasks  # noqa: E402  (the schedule the fixture was written with)

NAMES = [spec.name for spec in catalog.specs()]
# Dicts of named tensors whose names follow the data (a memory's fields), not a declaration.
FIELD_MAPS = ("storage", "items")


def state_equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def leaves(tree, path=()):
    """``(path, value)`` of every tensor in a nested state."""
    if isinstance(tree, torch.Tensor):
        yield path, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from leaves(v, (*path, k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from leaves(v, (*path, i))


def records(tree, path=()):
    """``(path, dict)`` of every dict in a nested state whose keys are declared (not a memory's fields)."""
    if isinstance(tree, dict):
        if not path or path[-1] not in FIELD_MAPS:
            yield path, tree
        for k, v in tree.items():
            yield from records(v, (*path, k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from records(v, (*path, i))


def set_in(state, path, fn):
    """Apply ``fn`` to the entry at ``path``, rebuilding tuples on the way."""
    if not path:
        return fn(state)
    key, rest = path[0], path[1:]
    if isinstance(state, tuple):
        return tuple(set_in(v, rest, fn) if i == key else v for i, v in enumerate(state))
    if isinstance(state, list):
        return [set_in(v, rest, fn) if i == key else v for i, v in enumerate(state)]
    return {k: set_in(v, rest, fn) if k == key else v for k, v in state.items()}


def a_row_longer(t):
    return t.reshape(1) if t.dim() == 0 else torch.cat([t, t[:1]])


def another_dtype(t):
    return t.to(
        {torch.float32: torch.float64, torch.int64: torch.int32, torch.bool: torch.uint8}.get(t.dtype, torch.int16)
    )


@pytest.fixture(scope="module")
def trained():
    """Per method: the state dict after two tiny tasks, and a target trained on one task (so that a partial
    load would show) with its state dict before any load."""
    cache = {}

    def get(name):
        if name not in cache:
            _, method = two_tasks(name)
            _, target = two_tasks(name, tasks=1, seed=1)
            cache[name] = method.state_dict(), target, copy.deepcopy(target.state_dict())
        return cache[name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_own_state_loads_into_a_fresh_object(name, trained):
    state, _, _ = trained(name)
    _, fresh = two_tasks(name, tasks=0, seed=2)
    fresh.load_state_dict(copy.deepcopy(state))
    assert state_equal(fresh.state_dict(), state)


@pytest.mark.parametrize("name", NAMES)
def test_a_state_that_does_not_fit_changes_nothing(name, trained):
    state, target, before = trained(name)
    bad = []
    for path, tensor in leaves(state["state"]):
        bad.append((f"{path} a row longer", set_in(state, ("state", *path), a_row_longer)))
        if not any(k in FIELD_MAPS for k in path):  # a memory's fields keep the dtype of what was stored
            bad.append((f"{path} as {another_dtype(tensor).dtype}", set_in(state, ("state", *path), another_dtype)))
    for path, record in records(state["state"]):
        for key in record:
            if not path and key == "format":
                continue  # without it the state is read as the layout before declared state (tested below)
            bad.append(
                (
                    f"{path} without {key!r}",
                    set_in(state, ("state", *path), lambda r, k=key: {kk: v for kk, v in r.items() if kk != k}),
                )
            )
        bad.append((f"{path} with an extra key", set_in(state, ("state", *path), lambda r: {**r, "extra": 0})))
    assert len(bad) > 4
    accepted = []
    for what, bad_state in bad:
        try:
            target.load_state_dict(bad_state)
        except ValueError as error:  # StateError is a ValueError
            assert isinstance(error, StateError), (what, error)
            assert str(error), what
        else:
            accepted.append(what)
            target.load_state_dict(copy.deepcopy(before))
            continue
        assert state_equal(target.state_dict(), before), f"{name}: a rejected load ({what}) changed the state"
    assert not accepted, f"{name} accepted states that do not fit: {accepted}"


def as_old_layout(tree):
    """A class-balanced memory's state as the old layout saved it: the unused uniforms only."""
    if isinstance(tree, dict):
        tree = {k: as_old_layout(v) for k, v in tree.items()}
        if "uniform_pos" in tree:
            tree["uniforms"] = tree["uniforms"][tree.pop("uniform_pos") :]
    return tree


# The methods that existed before declared state (the pretrained family came after: it has no old layout).
OLD_NAMES = [name for name in NAMES if catalog.get(name).family != "pretrained"]


@pytest.mark.parametrize("name", OLD_NAMES)
def test_state_written_before_declared_state_loads(name):
    """State dicts as the code before declared state wrote them (tests/fixtures/make_state_v1.py) load, and
    today's state dict holds the same values (plus the format, the class width some now save, and the input
    names, which the old layout kept only for methods with a memory)."""
    old = torch.load(os.path.join(HERE, "state_v1.pt"), weights_only=False)[name]
    assert "format" not in old["state"]
    _, fresh = two_tasks(name, tasks=0, seed=2)
    fresh.load_state_dict(copy.deepcopy(old))
    new = fresh.state_dict()
    assert new["state"].pop("format") == 2
    added = set(new["state"]) - set(old["state"])
    assert added <= {"num_classes", "input_names"}, added
    for key in added:
        new["state"].pop(key)
    if old["method"] == "ER":  # ER's variants all saved as "ER" until they became classes (DER, DERpp)
        assert new["method"] == type(fresh).__name__
        new["method"] = "ER"
    assert state_equal(as_old_layout(new), old)
    # an old-layout state that does not fit is refused, saying why
    broken = copy.deepcopy(old)
    broken["state"].pop(next(iter(broken["state"])))
    with pytest.raises(StateError, match="written before declared state"):
        fresh.load_state_dict(broken)


def test_unknown_format_is_refused():
    state = two_tasks("er", tasks=1)[1].state_dict()
    state["state"]["format"] = 3
    with pytest.raises(StateError, match="format 3"):
        two_tasks("er", tasks=0)[1].load_state_dict(state)


class _Toy(Stateful):
    def __init__(self):
        self.width = 3
        self.flags = torch.zeros(3, dtype=torch.bool)
        self.old = torch.zeros(2, dtype=torch.bool)
        self.a = torch.zeros(2, 4)
        self.b = torch.zeros(2)
        self.add_value("width", int, optional=True)
        self.add_state("flags", dtype=torch.bool, shape=("width",))
        self.add_state("old", dtype=torch.bool, shape=(AtMost("width"),))
        self.add_state("a", dtype=torch.float32, shape=("rows", ...))
        self.add_state("b", dtype=torch.float32, shape=("rows",))


def test_declared_shapes():
    toy = _Toy()
    good = toy._declared_state()
    toy._prepare_state({**good, "width": 4, "flags": torch.ones(4, dtype=torch.bool)}, None)()
    assert toy.width == 4 and toy.flags.all()
    cases = {
        "dim 0 is 5, expected 4": {"flags": torch.ones(5, dtype=torch.bool)},  # follows the int 'width'
        "at most 4": {"old": torch.ones(5, dtype=torch.bool)},
        "expected 2 \\(rows, as in": {"b": torch.zeros(3)},  # a symbol: every tensor naming it agrees
        "sized by 'width', which is None": {"width": None},  # a None int sizes nothing
    }
    for message, change in cases.items():
        with pytest.raises(StateError, match=message):
            toy._prepare_state({**toy._declared_state(), **change}, None)
    toy._prepare_state({**toy._declared_state(), "a": torch.zeros(2, 4, 5)}, None)  # ... leaves the rest free


def test_storage_fields_follow_the_inputs():
    """A memory's fields are named by the data, so they are checked against the method's inputs."""
    state = two_tasks("er", tasks=1)[1].state_dict()
    del state["state"]["buffer"]["storage"]["targets"]
    target = two_tasks("er", tasks=1, seed=1)[1]
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(StateError, match="targets"):
        target.load_state_dict(state)
    assert state_equal(target.state_dict(), before)


def test_a_memory_present_on_one_side_only_is_refused():
    """BiC's held-out memories exist or not by its arguments: a state without them does not fit one with."""
    _, bic = two_tasks("bic", tasks=1)
    state = bic.state_dict()
    before = copy.deepcopy(state)
    for key in ("held_out", "val_memory"):
        with pytest.raises(StateError, match=f"'{key}'\\] is None, but this object has one"):
            bic.load_state_dict({**state, "state": {**state["state"], key: None}})
    # the same training memory (40 less the 4 held out), no held-out ones
    without = catalog.get("bic").create(tiny_model(), {"val_fraction": 0.0}, buffer_size=36, buffer_sample_size=8)
    with pytest.raises(StateError, match="this object has none there"):
        without.load_state_dict(state)
    assert state_equal(bic.state_dict(), before)
