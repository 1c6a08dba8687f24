"""The state LwF, iCaRL and BiC share: the classes seen so far, the classes seen before the last task end
(the *old* classes), and the frozen teacher taken then -- declared once here for all three."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from ._state import AtMost, both_or_neither

__all__ = ["declare_class_state"]


def declare_class_state(
    method: Any,
    *,
    teacher_grows: bool = False,
    load: Optional[Callable[[nn.Module, Mapping[str, Tensor]], Any]] = None,
    width_attr: Optional[str] = None,
) -> None:
    """Declare ``seen_classes``, ``old_classes``, ``teacher`` and ``num_classes`` on a method.

    The method keeps its seen flags in ``_seen_store`` (padded by one slot each side: ``seen_classes`` is
    ``_seen_store[1:-1]``), the old flags in ``old_classes`` and the frozen copy in ``teacher``. The seen
    flags span ``num_classes`` columns, and the old flags at most as many (the head may grow after the
    teacher is taken).

    Args:
        method: the :class:`~synapse.Synapse` declaring them.
        teacher_grows: the teacher's weights may be narrower than the model's (a head grown since).
        load: how the teacher's weights are loaded into a copy of the model (default ``load_state_dict``).
        width_attr: the method's own attribute holding the output width (iCaRL's ``num_classes``); without
            it ``num_classes`` is saved only to check the seen flags' length against.
    """

    def seen() -> Optional[Tensor]:
        store = method._seen_store
        return None if store is None else store[1:-1].clone()

    def set_seen(flags: Optional[Tensor]) -> None:
        method._seen_store = None
        if flags is not None:
            method._seen_store = torch.zeros(flags.shape[0] + 2, dtype=torch.bool, device=flags.device)
            method._seen_store[1:-1] = flags

    def width() -> Optional[int]:
        flags = method._seen_store
        return None if flags is None else flags.shape[0] - 2

    if width_attr is None:
        method.add_value("num_classes", int, optional=True, get=width, derived=True)
    else:
        method.add_value("num_classes", int, optional=True, attr=width_attr)
    method.add_state("seen_classes", dtype=torch.bool, shape=("num_classes",), optional=True, get=seen, set=set_seen)
    method.add_state(
        "old_classes",
        dtype=torch.bool,
        shape=(AtMost("num_classes"),),
        optional=True,
        get=lambda: None if method.old_classes is None else method.old_classes.clone(),
    )
    method.add_frozen_module(
        "teacher", lambda: method.module, lambda weights: method._frozen_copy(weights, load), grows=teacher_grows
    )
    method.add_constraint(lambda state, path: both_or_neither(state, ("teacher", "old_classes"), path))
    if width_attr is None:
        method.add_constraint(lambda state, path: both_or_neither(state, ("seen_classes", "num_classes"), path))
