"""Domain-incremental and task-free scenarios on image tensors, for the training loop you already have.

:class:`~synapse.TaskDict` splits a dataset by class (class-incremental). The DER paper (Buzzega et al.
2020) also runs two other kinds of experiment, and this module builds both from one dataset of image
tensors, batched and on the training device (no per-sample transform in a Python loop):

* **Domain-incremental** (:class:`Permuted`, :class:`Rotated`): every task holds the whole dataset under a
  fixed input transformation of its own; the labels do not change, so Class-IL and Domain-IL coincide and
  Task-IL does not apply. P-MNIST and R-MNIST are these on MNIST.
* **Task-free** (general continual learning, :func:`mnist360`): one stream, seen once, with no task
  boundaries; MNIST-360 is this on MNIST.

Transformations move pixels, so they work on any dtype; on uint8 images with nearest-neighbour sampling
(the default, as the DER authors' code) the result is exact uint8 pixels, and a replay buffer can keep them.

Example:
    Twenty permuted tasks in your own loop (``x``: uint8 images ``(N, 1, 28, 28)`` on the device)::

        from synapse.scenarios import Permuted

        scenario = Permuted(num_tasks=20, seed=0)
        for task in range(scenario.num_tasks):
            for inputs, targets in scenario.batches(x, y, task, batch_size=128):
                loss = F.cross_entropy(model(inputs), targets)
                optimizer.zero_grad()
                synapse.backward(loss, targets, inputs=inputs)
                optimizer.step()
            synapse.end_task()
            accuracy = [evaluate(model, scenario.transform(test_x, t), test_y) for t in range(task + 1)]
"""

from __future__ import annotations

from .domain import SCENARIOS, DomainIncremental, Permuted, Rotated, scenario
from .geometry import rotate, rotation_index_map
from .stream import TaskFreeStream, mnist360, mnist360_test_angles

__all__ = [
    "DomainIncremental",
    "Permuted",
    "Rotated",
    "TaskFreeStream",
    "mnist360",
    "mnist360_test_angles",
    "rotate",
    "rotation_index_map",
    "scenario",
    "SCENARIOS",
]
