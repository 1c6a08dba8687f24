"""Synapse: continual learning for the PyTorch training loop you already have.

Replace ``loss.backward()`` with ``synapse.backward(loss, targets, inputs=inputs)``::

    from synapse.rehearsal import ER
    synapse = ER(model, buffer_size=500, buffer_sample_size=32, alpha=0.3, beta=0.5, method="der++")
"""

from ._base import Synapse, named_batches
from .memory import ReservoirBuffer
from .scenarios import Permuted, Rotated, TaskFreeStream, mnist360
from .tasks import Task, TaskDict

__all__ = ["Synapse", "TaskDict", "Task", "ReservoirBuffer", "named_batches", "__version__"]
__all__ += ["Permuted", "Rotated", "TaskFreeStream", "mnist360"]  # scenarios, beside TaskDict

__version__ = "0.2.0.dev0"  # the one place the version is set (pyproject.toml reads it)
