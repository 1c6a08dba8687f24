"""Memory policies: which items a rehearsal memory keeps.

Every policy is a :class:`~synapse.buffer.Buffer`: named tensors in ``capacity`` rows preallocated on the
data's device, sampled uniformly without replacement, with an exact state dict. They differ in what
stays:

* ``'reservoir'`` (:class:`ReservoirBuffer`): a uniform sample of the stream;
* ``'class_balanced'`` (:class:`ClassBalancedBuffer`): GDumb's greedy class balancer, every class an
  equal share;
* ``'herding'`` (:class:`HerdingMemory`): iCaRL's exemplars, chosen at task ends so that their mean
  feature follows the class mean.

A method picks one by name: ``BufferedSynapse(..., buffer_policy='class_balanced')`` builds it with
:func:`make_buffer`, and ``ER(model, ..., buffer_policy='class_balanced')`` passes it on.
"""

from __future__ import annotations

from typing import Any, Optional

from .._model import FeaturesFn, head_input_features
from ..buffer import Buffer
from .class_balanced import UNIFORM_BLOCK, ClassBalancedBuffer
from .herding import HerdingMemory
from .reservoir import ReservoirBuffer

__all__ = [
    "BUFFER_POLICIES",
    "STREAM_POLICIES",
    "UNIFORM_BLOCK",
    "ClassBalancedBuffer",
    "FeaturesFn",
    "HerdingMemory",
    "ReservoirBuffer",
    "head_input_features",
    "make_buffer",
]

STREAM_POLICIES = ("reservoir", "class_balanced")  # filled by add() at every step
BUFFER_POLICIES = (*STREAM_POLICIES, "herding")  # herding is filled at task ends only


def make_buffer(policy: str, capacity: int, seed: Optional[int] = None, **options: Any) -> Buffer:
    """The memory of policy ``'reservoir'``, ``'class_balanced'`` or ``'herding'`` (see the module
    docstring), with ``capacity`` items and its own generator seeded by ``seed``; ``options`` go to the
    class (e.g. ``label_field`` or ``defer`` for the class-balanced one)."""
    classes = {"reservoir": ReservoirBuffer, "class_balanced": ClassBalancedBuffer, "herding": HerdingMemory}
    if policy not in classes:
        raise ValueError(f"buffer_policy must be one of {BUFFER_POLICIES}, got {policy!r}")
    return classes[policy](capacity, seed=seed, **options)
