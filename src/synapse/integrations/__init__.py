"""Optional adapters for training frameworks: Hugging Face Accelerate and PyTorch Lightning.

Nothing here imports a framework at import time: ``import synapse.integrations`` needs torch alone, and
:func:`accelerate_backward` imports ``accelerate`` only when called. A plain DDP loop needs none of this.

* :func:`accelerate_backward`: ``accelerator.backward(loss)`` for a loop that uses Synapse; it runs
  ``synapse.backward`` under the accelerator's loss scaling and gradient accumulation.
* :class:`PerRankState`: a method's state as a framework's checkpoint should hold it in a distributed run,
  every rank's own memory, for ``accelerator.register_for_checkpointing`` or a LightningModule's
  ``on_save_checkpoint``. Both frameworks write such state from rank 0 alone, and every rank would
  otherwise come back with rank 0's memory.

``examples/accelerate_loop.py`` and ``examples/lightning_module.py`` show both in a full loop; the README's
"Accelerate and Lightning" section says how the work divides between Synapse and each framework.
"""

from ._accelerate import accelerate_backward
from ._ranks import PerRankState

__all__ = ["accelerate_backward", "PerRankState"]
