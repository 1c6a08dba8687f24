"""iCaRL's herding memory: exemplars chosen at task ends so that their mean feature follows the class mean."""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .._model import FeaturesFn
from .._state import int_list
from .._validation import check_targets_and_inputs
from ..buffer import Buffer, indices_on
from ..functional import herding_selection

__all__ = ["HerdingMemory"]


class HerdingMemory(Buffer):
    """iCaRL's exemplar memory (Rebuffi et al. 2017, *iCaRL: Incremental Classifier and Representation
    Learning*, Algorithms 4 and 5), filled at task ends from the task's data.

    :meth:`select_task` takes the finished task's data (the batches ``end_task(data)`` receives) and a
    feature extractor. With ``t`` the classes held afterwards, every class gets ``m = capacity // t``
    exemplars (the paper's ``m = K / t``, rounded down):

    * each class of the task gets the first ``min(m, n_c)`` of its ``n_c`` items in herding order
      (:func:`~synapse.functional.herding_selection` on its L2-normalised features: the running mean of
      the chosen features best approximates the class mean);
    * each class already held keeps the first ``m`` of its exemplars (Algorithm 5, "ReduceExemplarSet":
      herding order makes a prefix the best smaller set).

    A class that appears again in a later task is selected afresh from that task's items, and its old
    exemplars are dropped (the paper's classes never recur). Rows ``[0, len)`` hold the classes one
    after the other, each in herding order (:meth:`class_ranges`); fields are ``'input:<name>'`` for each
    model input and ``'targets'``, as :class:`~synapse._base.BufferedSynapse` stores them, so replay
    sampling (:meth:`sample`) and ``BufferedSynapse._inputs_of`` work unchanged. There is no per-step
    :meth:`add`.

    **The feature extractor** is "the model minus its head": any ``features_fn(inputs) -> (batch, d)``
    taking the batch's inputs as a dict named like ``model.forward``'s keywords, e.g.
    ``lambda inputs: model.backbone(inputs["x"])``, or :func:`head_input_features` ``(model, "fc")``,
    which runs the whole model and takes what enters its head (named by attribute path or as the
    module). It is called under ``torch.no_grad()``; put the model in eval mode first if its layers
    should (iCaRL computes features with the network as trained so far).

    Args:
        capacity: the memory budget ``K`` (items over all classes).
        seed: seed of the replay sampling generator; by default drawn from torch's global RNG.
        normalize: L2-normalise features before herding (the paper's ``phi``).

    Example:
        >>> from synapse.memory import head_input_features
        >>> memory = HerdingMemory(100)
        >>> x, y = torch.randn(200, 8), torch.arange(200) % 2  # a finished task: classes 0 and 1
        >>> task_batches = [(y, {"inputs": x})]                 # as end_task(data) receives it
        >>> memory.select_task(task_batches, head_input_features(model, "fc"))  # at the task end
        >>> memory.exemplars_per_class, memory.class_ranges()
        (50, {0: (0, 50), 1: (50, 100)})
        >>> replay = memory.sample(32)           # {"input:inputs": ..., "targets": ...}
    """

    policy = "herding"

    def __init__(self, capacity: int, *, seed: Optional[int] = None, normalize: bool = True) -> None:
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be a bool, got {normalize!r}")
        super().__init__(capacity, seed=seed)
        self.normalize = normalize
        self._classes: List[int] = []  # in row order
        self._sizes: List[int] = []
        self._m = capacity
        self.add_value("policy", str, equal=True)
        self.add_value("classes", list, attr="_classes", convert=int_list)
        self.add_value("sizes", list, attr="_sizes", convert=int_list)
        self.add_value("m", int, attr="_m")

    # ------------------------------------------------------------------ inspection
    def __len__(self) -> int:
        return sum(self._sizes)

    @property
    def classes(self) -> Tuple[int, ...]:
        """The classes held, in row order."""
        return tuple(self._classes)

    @property
    def exemplars_per_class(self) -> int:
        """``m``: the exemplars each class may hold now (``capacity`` before the first task)."""
        return self._m

    def class_ranges(self) -> Dict[int, Tuple[int, int]]:
        """``{class: (start, stop)}``: the rows of each class's exemplars, in herding order."""
        starts = np.cumsum([0, *self._sizes]).tolist()
        return {c: (starts[i], starts[i + 1]) for i, c in enumerate(self._classes)}

    def class_items(self, label: int, names: Optional[Iterable[str]] = None) -> Dict[str, Tensor]:
        """The exemplars of class ``label``, in herding order (views of the storage: do not write to them)."""
        ranges = self.class_ranges()
        if label not in ranges:
            raise KeyError(f"class {label} is not in memory; held: {self.classes}")
        start, stop = ranges[label]
        return {k: self._storage[k][start:stop] for k in (self._storage if names is None else names)}

    def __repr__(self) -> str:
        return f"HerdingMemory(capacity={self.capacity}, classes={len(self._classes)}, m={self._m}, len={len(self)})"

    def _population_fixed(self, n: int) -> bool:
        return True  # the population changes only at select_task, which drops the pre-drawn indices

    # ------------------------------------------------------------------ mutation
    def add(self, items: Mapping[str, Tensor], *, validate: bool = True) -> None:
        raise TypeError(
            "a herding memory is filled at task ends, not per step: call select_task(data, features_fn) "
            "with the finished task's (targets, {name: inputs}) batches"
        )

    @torch.no_grad()
    def select_task(self, data: Iterable[Tuple[Tensor, Mapping[str, Tensor]]], features_fn: FeaturesFn) -> None:
        """Choose the exemplars of the task's classes by herding and cut the others to the new share.

        Args:
            data: the finished task's batches ``(targets, {name: inputs})`` (what ``end_task`` receives),
                read once. Their items are held until the selection is done.
            features_fn: ``features_fn(inputs) -> (batch, d)`` features of a batch's inputs (see the
                class docstring).

        Everything is checked before the memory changes; a task without data changes nothing.
        """
        if not callable(features_fn):
            raise TypeError(f"features_fn must be callable, got {type(features_fn).__name__}")
        batches: List[Dict[str, Tensor]] = []
        features: List[Tensor] = []
        for item in data:
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], Mapping)):
                raise TypeError(f"each batch must be (targets, {{name: inputs}}), got {type(item).__name__}")
            targets, inputs = item[0], dict(item[1])
            batch = check_targets_and_inputs(targets, inputs)
            items = {f"input:{k}": v.detach() for k, v in inputs.items()}
            items["targets"] = targets.detach()
            self.check_layout(items)
            if batches and items.keys() != batches[0].keys():
                raise ValueError(f"batch fields {sorted(items)} differ from the first batch's {sorted(batches[0])}")
            feats = features_fn(inputs)
            if not isinstance(feats, Tensor) or feats.dim() != 2 or feats.shape[0] != batch:
                got = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
                raise ValueError(f"features_fn must return a (batch, d) tensor with batch={batch}, got {got}")
            if features and feats.shape[1] != features[0].shape[1]:
                raise ValueError(f"features_fn returned {feats.shape[1]} features, earlier {features[0].shape[1]}")
            batches.append(items)
            features.append(feats.detach())
        if not batches:
            return
        task = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        phi = torch.cat(features)
        if not bool(torch.isfinite(phi).all()):  # a task-end check: reading it is fine here
            raise ValueError("features_fn returned non-finite features; herding needs finite ones")
        labels = task["targets"].cpu().numpy()
        new_classes = np.unique(labels).tolist()
        kept = [(c, s) for c, s in zip(self._classes, self._sizes) if c not in new_classes]
        m = self.capacity // (len(kept) + len(new_classes))
        if m == 0:
            raise ValueError(
                f"a herding memory of capacity {self.capacity} cannot hold {len(kept) + len(new_classes)} classes: "
                "each needs at least one exemplar"
            )
        # Rows of the new layout: kept classes' first m exemplars, then each new class's herding choice.
        old_start = dict(zip(self._classes, np.cumsum([0, *self._sizes]).tolist()))
        old_rows = [np.arange(old_start[c], old_start[c] + min(s, m)) for c, s in kept]
        new_rows = []
        for c in new_classes:
            members = np.flatnonzero(labels == c)
            order = herding_selection(phi[torch.from_numpy(members).to(phi.device)], m, normalize=self.normalize)
            new_rows.append(members[order.cpu().numpy()])
        # Apply: gather every kept row before writing any (rows move down), then the new ones.
        if not self._storage:
            self._allocate(task)
        device = self._device
        assert device is not None
        keep = np.concatenate(old_rows) if old_rows else np.zeros(0, dtype=np.int64)
        pick = torch.from_numpy(np.concatenate(new_rows).astype(np.int64))
        for name, stored in self._storage.items():
            moved = stored.index_select(0, indices_on(keep, device))
            chosen = self._clean(task[name].index_select(0, pick.to(task[name].device))).to(device)
            stored[: len(keep) + len(pick)] = torch.cat([moved, chosen])
        self._classes = [c for c, _ in kept] + new_classes
        self._sizes = [len(r) for r in old_rows] + [len(r) for r in new_rows]
        self._m = m
        self.num_seen += len(labels)
        self._set_block(None)  # the population changed: pre-drawn replay indices are stale
