"""What LwF, iCaRL and BiC share: the classes seen so far, the classes seen before the last task end (the
*old* classes), and the frozen teacher taken then -- kept, moved, grown, merged over ranks and saved in
one place. ER-ACE's per-task mask uses :func:`widened` too."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._model import distributed_world
from ._state import AtMost, Stateful, both_or_neither

__all__ = ["ClassHistory", "widened"]


def widened(mask: Optional[Tensor], width: int, device: torch.device) -> Tensor:
    """A fresh copy of a class mask with ``width`` columns (heads may grow between tasks): the mask's
    first ``width`` flags, then False; all False for no mask."""
    out = torch.zeros(width, dtype=torch.bool, device=device)
    if mask is not None:
        kept = min(width, mask.shape[0])
        out[:kept] = mask[:kept]
    return out


class ClassHistory(Stateful):
    """A mixin for a :class:`~synapse.Synapse` that distils a frozen copy of itself on the old classes.

    The seen flags live in ``_seen_store``, one per output column with a slot at each end, where targets
    below 0 and past the last column land (so flagging a batch's labels never syncs): ``seen_classes`` is
    ``_seen_store[1:-1]``. ``old_classes`` are the seen flags frozen with ``teacher`` at a task end.
    """

    module: nn.Module  # the Synapse's
    _frozen_copy: Callable[..., nn.Module]

    def _init_class_history(
        self,
        *,
        teacher_grows: bool = False,
        load: Optional[Callable[[nn.Module, Mapping[str, Tensor]], Any]] = None,
        width_attr: Optional[str] = None,
    ) -> None:
        """Start with nothing seen, and declare the state: ``num_classes``, ``seen_classes``, ``old_classes``
        and ``teacher``. The seen flags span ``num_classes`` columns and the old flags at most as many.

        Args:
            teacher_grows: the teacher's weights may be narrower than the model's (a head grown since).
            load: how saved teacher weights are loaded into a copy of the model (default ``load_state_dict``).
            width_attr: the method's own attribute holding the output width (iCaRL's ``num_classes``);
                without it ``num_classes`` is saved only to check the seen flags' length against.
        """
        self._seen_store: Optional[Tensor] = None
        self.old_classes: Optional[Tensor] = None
        self.teacher: Optional[nn.Module] = None
        if width_attr is None:
            self.add_value("num_classes", int, optional=True, get=self._seen_width, derived=True)
        else:
            self.add_value("num_classes", int, optional=True, attr=width_attr)
        self.add_state(
            "seen_classes",
            dtype=torch.bool,
            shape=("num_classes",),
            optional=True,
            get=lambda: None if self._seen_store is None else self._seen_store[1:-1].clone(),
            set=self._set_seen_classes,
        )
        self.add_state(
            "old_classes",
            dtype=torch.bool,
            shape=(AtMost("num_classes"),),
            optional=True,
            get=lambda: None if self.old_classes is None else self.old_classes.clone(),
        )
        self.add_frozen_module(
            "teacher", lambda: self.module, lambda weights: self._frozen_copy(weights, load), grows=teacher_grows
        )
        self.add_constraint(lambda state, path: both_or_neither(state, ("teacher", "old_classes"), path))
        if width_attr is None:
            self.add_constraint(lambda state, path: both_or_neither(state, ("seen_classes", "num_classes"), path))

    @property
    def seen_classes(self) -> Optional[Tensor]:
        """Bool flags over the output columns: the classes seen so far."""
        return None if self._seen_store is None else self._seen_store[1:-1]

    def _seen_width(self) -> Optional[int]:
        return None if self._seen_store is None else self._seen_store.shape[0] - 2

    def _set_seen_classes(self, flags: Optional[Tensor]) -> None:
        self._seen_store = None
        if flags is not None:
            self._seen_store = torch.zeros(flags.shape[0] + 2, dtype=torch.bool, device=flags.device)
            self._seen_store[1:-1] = flags

    def _seen_with(self, labels: Tensor, width: int, device: torch.device, in_place: bool = False) -> Tensor:
        """The seen-flag store at ``width`` columns on ``device`` with ``labels`` flagged (no host sync). A
        new tensor, unless ``in_place`` and the width is unchanged (then the store itself)."""
        store = self._seen_store
        if store is None or store.shape[0] != width + 2:  # first step, or the head grew
            grown = torch.zeros(width + 2, dtype=torch.bool, device=device)
            if store is not None:  # keep the old flags and the low slot
                grown[: store.shape[0] - 1] = store[:-1]
            store = grown
        elif not in_place:
            store = store.clone()
        return store.scatter_(0, labels.to(device, torch.long).clamp(-1, width).add_(1), True)

    def _follow_classes(self, device: torch.device) -> bool:
        """Move the flags and the teacher to ``device``; True if the old flags moved (caches derived from
        them are stale)."""
        if self._seen_store is not None and self._seen_store.device != device:
            self._seen_store = self._seen_store.to(device)
        if self.teacher is not None and next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        if self.old_classes is not None and self.old_classes.device != device:
            self.old_classes = self.old_classes.to(device)
            return True
        return False

    @staticmethod
    def _union_over_ranks(seen: Tensor) -> Tensor:
        """The seen flags of all ranks together (``seen`` itself without torch.distributed): every rank
        distils and corrects the same classes. A task-end collective, never in ``backward``."""
        if distributed_world() == 1:
            return seen
        flags = seen.to(torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags.bool()
