"""Splitting your own dataset into tasks with TaskDict.

python examples/task_dict.py
"""

import torch
from torch.utils.data import TensorDataset

from synapse import TaskDict


class LabelledTensors(TensorDataset):
    """A dataset without a ``targets`` attribute: TaskDict reads the labels itself."""


class SplitToy(TaskDict):
    """Any source of (input, label) pairs works: here, random data with 6 classes."""

    def _train_set(self, root):
        g = torch.Generator().manual_seed(0)
        return LabelledTensors(torch.randn(600, 8, generator=g), torch.randint(0, 6, (600,), generator=g))

    def _test_set(self, root):
        g = torch.Generator().manual_seed(1)
        return LabelledTensors(torch.randn(120, 8, generator=g), torch.randint(0, 6, (120,), generator=g))


# Three tasks of two classes; class 5 is left out on purpose (a subset of classes is fine).
tasks = SplitToy(root="unused", key_to_targets={"first": [0, 1], "second": [2, 3], "third": [4]})
for key, task in tasks.items():
    x, y = task.train_set[0]
    print(
        f"{key}: classes {task.targets}, {len(task.train_set)} train / {len(task.test_set)} test, first label {int(y)}"
    )
