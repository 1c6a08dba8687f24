"""Declared state: an object declares each persistent value once, and its ``state_dict()`` and a strict,
all-or-nothing ``load_state_dict()`` follow from the declarations (the way torchmetrics' ``add_state``
works, and ``torch.optim``'s one ``state`` per optimizer).

Loading checks every key, type, dtype and shape of the whole state -- nested memories and frozen teachers
included -- and builds every new value aside; only then does it assign them. A state that does not fit
raises :class:`StateError` and changes nothing.

Shapes are declared per dimension: an ``int`` is exact; a ``str`` names either a declared ``int`` value
of the same object (the tensor's dimension must equal it) or a symbol that every tensor naming it must
agree on; :class:`AtMost` bounds a dimension that may have been smaller when it was taken (a teacher's
head); ``None`` is free, and a trailing ``...`` leaves the remaining dimensions free. A shape that grows
legitimately (a memory not yet full, new classes) is thereby declared, not tolerated by a lenient load.

Example:
    >>> class Counter(Stateful):
    ...     def __init__(self):
    ...         self.total = torch.zeros(3)
    ...         self.steps = 0
    ...         self.add_state("total", dtype=torch.float32, shape=(3,))
    ...         self.add_value("steps", int)
    >>> c = Counter()
    >>> c.load_state_dict({"total": torch.ones(3), "steps": 5})
    >>> c.steps, c.total
    (5, tensor([1., 1., 1.]))
    >>> c.load_state_dict({"total": torch.ones(4), "steps": 6})
    Traceback (most recent call last):
    ...
    synapse._state.StateError: state['total'] has shape (4,): dim 0 is 4, expected 3
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["AtMost", "StateError", "Stateful", "both_or_neither", "int_list", "numpy_generator", "torch_generator"]

Dim = Any  # int | str | AtMost | None, or a last ... (see the module docstring)


class StateError(ValueError):
    """A state dict that does not fit the object it is loaded into; the object was left unchanged."""


@dataclass(frozen=True)
class AtMost:
    """A dimension of at most ``bound`` (an ``int``, or a name as in a shape)."""

    bound: Union[int, str]


@dataclass
class _Field:
    name: str
    get: Callable[[], Any]
    check: Callable[[Any, _Context, str], Any]  # (saved value, context, path) -> the value to assign
    set: Optional[Callable[[Any], None]]  # None: checked only (a value derived from the others)
    optional: bool
    is_value: bool  # plain values are checked first: their ints size the tensors


class _Context:
    """What one load shares: the target device, the loaded ``int`` values and the symbols bound so far."""

    def __init__(self, device: Optional[torch.device]) -> None:
        self.device = device
        self.ints: Dict[str, int] = {}
        self.nones: set = set()  # int values saved as None: no tensor may be sized by them
        self.symbols: Dict[str, Tuple[int, str]] = {}  # symbol -> (size, the path that fixed it)

    def tensor(
        self, value: Any, dtype: Optional[torch.dtype], shape: Sequence[Dim], path: str, host: bool = False
    ) -> Tensor:
        """``value`` checked to be a tensor of ``dtype`` (None: any) and ``shape``; a copy on the device."""
        return _checked_tensor(value, dtype, shape, self, path, host)

    def check_shape(self, value: Tensor, shape: Sequence[Dim], path: str) -> None:
        dims = list(shape)
        free_tail = bool(dims) and dims[-1] is Ellipsis
        if free_tail:
            dims.pop()
        if value.dim() < len(dims) if free_tail else value.dim() != len(dims):
            raise StateError(f"{path} has shape {tuple(value.shape)}, expected {_show(shape)}")
        for i, (size, dim) in enumerate(zip(value.shape, dims)):
            if dim is None:
                continue
            if isinstance(dim, AtMost):
                bound = self._size(dim.bound, size, path)
                if size > bound:
                    raise StateError(f"{path} has {size} entries in dim {i}, at most {bound} expected ({dim.bound})")
                continue
            expected = self._size(dim, size, path)  # type: ignore[arg-type]
            if size != expected:
                raise StateError(
                    f"{path} has shape {tuple(value.shape)}: dim {i} is {size}, expected {expected}"
                    + ("" if isinstance(dim, int) else f" ({dim}{self._origin(dim)})")
                )

    def _size(self, dim: Union[int, str], size: int, path: str) -> int:
        if isinstance(dim, int):
            return dim
        if dim in self.ints:
            return self.ints[dim]
        if dim in self.nones:
            raise StateError(f"{path} is sized by {dim!r}, which is None")
        return self.symbols.setdefault(dim, (size, path))[0]

    def _origin(self, dim: str) -> str:
        return f", as in {self.symbols[dim][1]}" if dim in self.symbols and dim not in self.ints else ""


def _show(shape: Sequence[Dim]) -> str:
    return "(" + ", ".join("..." if d is Ellipsis else repr(d) for d in shape) + ")"


def _type_name(value: Any) -> str:
    return type(value).__name__


class Stateful:
    """Declared, strictly loaded state (see the module docstring).

    Subclasses declare in ``__init__`` with :meth:`add_state` (a tensor), :meth:`add_tensors` (a dict of
    tensors), :meth:`add_value` (a plain value), :meth:`add_state_object` (an object with its own declared
    state) and :meth:`add_frozen_module` (a frozen copy of a model, saved as its weights). By default each
    reads and writes the attribute of its name; ``attr`` names another, and ``get``/``set`` replace both.
    """

    def _declared_fields(self) -> Dict[str, _Field]:
        fields = self.__dict__.get("_state_fields")
        if fields is None:
            fields = self.__dict__["_state_fields"] = {}
        return fields

    def _declare(self, field: _Field) -> None:
        fields = self._declared_fields()
        if field.name in fields:
            raise ValueError(f"state {field.name!r} is declared twice")
        fields[field.name] = field

    def _accessors(
        self, name: str, attr: Optional[str], get: Optional[Callable[[], Any]], set: Optional[Callable[[Any], None]]
    ) -> Tuple[Callable[[], Any], Callable[[Any], None]]:
        attr = attr or name
        return (get or (lambda: getattr(self, attr))), (set or (lambda value: setattr(self, attr, value)))

    # ------------------------------------------------------------------ declarations
    def add_state(
        self,
        name: str,
        *,
        dtype: Optional[torch.dtype],
        shape: Sequence[Dim],
        optional: bool = False,
        host: bool = False,
        stash: bool = False,
        attr: Optional[str] = None,
        get: Optional[Callable[[], Any]] = None,
        set: Optional[Callable[[Any], None]] = None,
    ) -> None:
        """A tensor of ``dtype`` (None: any) and ``shape``; ``optional``: it may be None. It is loaded onto
        the object's device (kept on the host with ``host``), as a copy; with ``stash`` it is not assigned
        but kept for :meth:`_after_load` to take (:meth:`_stashed`), for state held in another form."""
        getter, setter = self._accessors(name, attr, get, set)
        if stash:
            setter = partial(self.__dict__.setdefault("_state_stash", {}).__setitem__, name)

        def check(value: Any, ctx: _Context, path: str) -> Tensor:
            return _checked_tensor(value, dtype, shape, ctx, path, host)

        self._declare(_Field(name, getter, check, setter, optional, False))

    def add_tensors(
        self,
        name: str,
        *,
        shape: Sequence[Dim],
        dtype: Optional[torch.dtype] = None,
        attr: Optional[str] = None,
        get: Optional[Callable[[], Any]] = None,
        set: Optional[Callable[[Any], None]] = None,
    ) -> None:
        """A dict of named tensors (a memory's fields), each of ``shape`` and ``dtype`` (None: any)."""
        getter, setter = self._accessors(name, attr, get, set)

        def check(value: Any, ctx: _Context, path: str) -> Dict[str, Tensor]:
            if not isinstance(value, Mapping):
                raise StateError(f"{path} must be a dict of tensors, got {_type_name(value)}")
            return {k: _checked_tensor(v, dtype, shape, ctx, f"{path}[{k!r}]", False) for k, v in value.items()}

        self._declare(_Field(name, lambda: dict(getter()), check, setter, False, False))

    def add_value(
        self,
        name: str,
        types: Union[type, Tuple[type, ...]],
        *,
        optional: bool = False,
        equal: bool = False,
        convert: Optional[Callable[[Any], Any]] = None,
        attr: Optional[str] = None,
        get: Optional[Callable[[], Any]] = None,
        set: Optional[Callable[[Any], None]] = None,
        derived: bool = False,
    ) -> None:
        """A plain value of ``types`` (a ``bool`` is no ``int``). ``equal``: it must equal the object's own
        (a capacity, a policy); ``convert`` builds the value to assign and raises on a bad one (a generator
        from its state); ``derived``: saved to be checked against, never assigned. An ``int`` value can size
        the object's tensors (name it in their shapes)."""
        getter, setter = self._accessors(name, attr, get, set)
        allowed = types if isinstance(types, tuple) else (types,)

        def check(value: Any, ctx: _Context, path: str) -> Any:
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                names = " or ".join(t.__name__ for t in allowed)
                raise StateError(f"{path} must be {names}, got {_type_name(value)} {value!r}"[:300])
            if equal and value != getter():
                raise StateError(f"{path} is {value!r}, but this object's is {getter()!r}")
            if isinstance(value, int) and not isinstance(value, bool):
                ctx.ints[name] = value
            if convert is None:
                return value
            try:
                return convert(value)
            except StateError:
                raise
            except (TypeError, ValueError, KeyError, RuntimeError) as error:
                raise StateError(f"{path} is not valid: {error}") from None

        self._declare(_Field(name, getter, check, None if (equal or derived) else setter, optional, True))

    def add_checked(
        self,
        name: str,
        get: Callable[[], Any],
        check: Callable[[Any, _Context, str], Any],
        set: Callable[[Any], None],
        *,
        optional: bool = False,
    ) -> None:
        """A value with its own check: ``check(saved, context, path)`` raises :class:`StateError` on a bad
        one and returns the value to assign (``context.tensor`` checks a tensor as :meth:`add_state` does)."""
        self._declare(_Field(name, get, check, set, optional, False))

    def add_generator(self, name: str, attr: str) -> None:
        """The random generator in attribute ``attr``: a numpy one (saved as its bit generator's state, a
        dict) or a CPU ``torch.Generator`` (saved as its state, a uint8 tensor)."""
        if isinstance(getattr(self, attr), torch.Generator):
            get_state = lambda: getattr(self, attr).get_state()  # noqa: E731
            self.add_value(name, Tensor, get=get_state, convert=torch_generator, attr=attr)
        else:
            self.add_value(
                name, dict, get=lambda: getattr(self, attr).bit_generator.state, convert=numpy_generator, attr=attr
            )

    def add_state_object(self, name: str, get: Callable[[], Optional[Stateful]], *, optional: bool = False) -> None:
        """An object with declared state of its own (a memory): saved as its state dict, loaded by it, all
        or nothing with the rest. ``get`` returns the object (None where ``optional`` and absent)."""

        def check(value: Any, ctx: _Context, path: str) -> Callable[[], None]:
            obj = get()
            if obj is None:
                raise StateError(f"{path} holds a state, but this object has none there")
            return obj._prepare_state(value, ctx.device, path)

        def state() -> Any:
            obj = get()
            return None if obj is None else obj.state_dict()

        def present_on_both_sides(state: Mapping[str, Any], path: str) -> None:
            if name in state and state[name] is None and get() is not None:
                raise StateError(f"{path}[{name!r}] is None, but this object has one (built with other arguments?)")

        self._declare(_Field(name, state, check, lambda apply: apply and apply(), optional, False))
        self.add_constraint(present_on_both_sides)

    def add_frozen_module(
        self,
        name: str,
        reference: Callable[[], nn.Module],
        build: Callable[[Mapping[str, Tensor]], nn.Module],
        *,
        grows: bool = False,
        attr: Optional[str] = None,
    ) -> None:
        """A frozen copy of a model (a teacher), or None: saved as its weights, whose names, dtypes and
        shapes must be those of ``reference()`` (the live model) -- each dimension at most the model's where
        heads ``grows`` after the copy is taken. ``build(weights)`` makes the module (before anything is
        assigned)."""
        getter, setter = self._accessors(name, attr, None, None)

        def weights() -> Optional[Dict[str, Tensor]]:
            module = getter()
            return None if module is None else {k: v.clone() for k, v in module.state_dict().items()}

        def check(value: Any, ctx: _Context, path: str) -> nn.Module:
            if not isinstance(value, Mapping):
                raise StateError(f"{path} must be a dict of the frozen model's weights, got {_type_name(value)}")
            own = reference().state_dict()
            _check_keys(value, own.keys(), path)
            for key, saved in value.items():
                mine = own[key]
                shape = [AtMost(d) for d in mine.shape] if grows else list(mine.shape)
                where = f"{path}[{key!r}]"
                if not isinstance(saved, Tensor) or saved.dtype != mine.dtype:
                    got = saved.dtype if isinstance(saved, Tensor) else _type_name(saved)
                    raise StateError(f"{where} must be a {mine.dtype} tensor, got {got}")
                ctx.check_shape(saved, shape, where)
            return build(value)

        self._declare(_Field(name, weights, check, setter, True, False))

    def add_constraint(self, check: Callable[[Mapping[str, Any], str], None]) -> None:
        """A check across entries, ``check(state, path)``, run before the entries' own (e.g.
        :func:`both_or_neither`); it raises :class:`StateError` on a state that does not fit."""
        self.__dict__.setdefault("_state_constraints", []).append(check)

    # ------------------------------------------------------------------ the state dict
    def state_dict(self) -> Dict[str, Any]:
        """Every declared entry, by name."""
        return self._declared_state()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`, all or nothing (:class:`StateError` on a state that does not fit)."""
        self._prepare_state(state, None)()

    def _declared_state(self) -> Dict[str, Any]:
        return {name: field.get() for name, field in self._declared_fields().items()}

    def _prepare_state(self, state: Any, device: Optional[torch.device], path: str = "state") -> Callable[[], None]:
        """Check ``state`` whole and build every value to assign; return the function that assigns them.
        Raises :class:`StateError` and changes nothing on a state that does not fit."""
        if not isinstance(state, Mapping):
            raise StateError(f"{path} must be a dict, got {_type_name(state)}")
        fields = self._declared_fields()
        _check_keys(state, fields.keys(), path)
        for constraint in self.__dict__.get("_state_constraints", ()):
            constraint(state, path)
        ctx = _Context(device)
        ready: List[Tuple[_Field, Any]] = []
        for field in sorted(fields.values(), key=lambda f: not f.is_value):  # stable: declaration order kept
            value = state[field.name]
            where = f"{path}[{field.name!r}]"
            if value is None:
                if not field.optional:
                    raise StateError(f"{where} is None, but it is required")
                ctx.nones.add(field.name)
                ready.append((field, None))
            else:
                ready.append((field, field.check(value, ctx, where)))

        def apply() -> None:
            for field, value in ready:
                if field.set is not None:
                    field.set(value)
            self._after_load()

        return apply

    def _stashed(self, name: str) -> Any:
        """A value declared with ``stash``, as the load being applied brought it."""
        return self.__dict__["_state_stash"].pop(name)

    def _after_load(self) -> None:
        """Rebuild what derives from the loaded state (caches, views); called once every value is assigned."""


def int_list(values: List[Any]) -> List[int]:
    """``values`` if it is a list of ints (a ``convert`` for :meth:`Stateful.add_value`), else raise."""
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(f"expected a list of ints, got {values!r}"[:200])
    return list(values)


def width_of(state: Dict[str, Any], key: str) -> Dict[str, Any]:
    """An unversioned state given the ``'num_classes'`` that today's layout derives from ``state[key]``, a
    class mask or map (None, or of the classes' width), for :meth:`~synapse.Synapse._upgrade_state`."""
    if "num_classes" not in state and key in state:
        value = state[key]
        state["num_classes"] = len(value) if isinstance(value, Tensor) and value.dim() == 1 else None
    return state


def both_or_neither(state: Mapping[str, Any], names: Sequence[str], path: str = "state") -> None:
    """Raise unless the entries ``names`` of ``state`` are all None or none of them is (a teacher and the
    classes it knows)."""
    present = [state.get(n) is not None for n in names]
    if any(present) and not all(present):
        raise StateError(f"{path} must hold {' and '.join(names)} together, or none of them")


def _check_keys(state: Mapping[str, Any], expected: Any, path: str) -> None:
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise StateError(
            f"{path} does not fit: "
            + "; ".join(part for part in (missing and f"missing {missing}", extra and f"unexpected {extra}") if part)
        )


def _checked_tensor(
    value: Any, dtype: Optional[torch.dtype], shape: Sequence[Dim], ctx: _Context, path: str, host: bool
) -> Tensor:
    if not isinstance(value, Tensor):
        raise StateError(f"{path} must be a tensor, got {_type_name(value)}")
    if dtype is not None and value.dtype != dtype:
        raise StateError(f"{path} has dtype {value.dtype}, expected {dtype}")
    ctx.check_shape(value, shape, path)
    return value.clone() if host or ctx.device is None else value.to(ctx.device, copy=True)


def numpy_generator(state: Any) -> np.random.Generator:
    """A PCG64 generator in the saved ``state`` (raises on a malformed one)."""
    if not isinstance(state, Mapping):
        raise TypeError(f"a generator state must be a dict, got {_type_name(state)}")
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = dict(state)
    if rng.bit_generator.state != state:  # numpy ignores entries it does not know
        raise ValueError(f"not a PCG64 generator state: {dict(state)!r}"[:300])
    return rng


def torch_generator(state: Any) -> torch.Generator:
    """A CPU ``torch.Generator`` in the saved ``state`` (a uint8 tensor; raises on a malformed one)."""
    if not isinstance(state, Tensor) or state.dtype != torch.uint8:
        raise TypeError(f"a generator state must be a uint8 tensor, got {_type_name(state)}")
    generator = torch.Generator()
    generator.set_state(state.cpu())
    return generator
