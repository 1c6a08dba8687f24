"""A first conversion, as a new user writes it: a tutorial's loop (the PyTorch MNIST example's shape: a CNN with
``forward(self, x)``, ``log_softmax`` or raw logits, Adadelta) split into tasks with ``TaskDict``, and only the
documented Synapse lines: build the method, ``synapse.backward(loss, target, x=data)``,
``synapse.end_task(named_batches(loader))`` and ``synapse.predict(x=data)``.

One representative per family runs it. With raw logits nothing warns; with log-probabilities exactly the
methods that read logits warn, once. Tiny synthetic images keep it to a few seconds.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from synapse import TaskDict, named_batches
from synapse.distillation import LwF
from synapse.gradient import AGEM
from synapse.rehearsal import ER, ICaRL
from synapse.structure import EWC

METHODS = {
    "der++": lambda model: ER(model, buffer_size=64, buffer_sample_size=16, alpha=0.3, beta=0.5, method="der++"),
    "agem": lambda model: AGEM(model, buffer_size=64, buffer_sample_size=16),
    "ewc": lambda model: EWC(model),
    "lwf": lambda model: LwF(model),
    "icarl": lambda model: ICaRL(model, buffer_size=64),
}
READS_LOGITS = {"der++", "lwf", "icarl"}


def images(n_per_class, classes, seed):
    """Class ``c``: a bright 3x3 square at a place of its own, on noise (1x10x10 images)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes).repeat_interleave(n_per_class)
    x = 0.3 * torch.randn(len(y), 1, 10, 10, generator=g)
    for i, c in enumerate(y.tolist()):
        r, col = 2 * (c // 2), 5 * (c % 2)
        x[i, 0, r : r + 3, col : col + 3] += 2.0
    return TensorDataset(x, y)


class SyntheticSplit(TaskDict):
    """The seed's form: properties that build the datasets through ``_create_dataset``."""

    @property
    def _train_set(self):
        return self._create_dataset(train=True)

    @property
    def _test_set(self):
        return self._create_dataset(train=False)

    def _create_dataset(self, train):
        return images(48 if train else 16, list(range(4)), seed=0 if train else 1)


class Net(nn.Module):
    """The PyTorch MNIST example's CNN, shrunk: two convolutions, dropout, two linear layers."""

    def __init__(self, log_softmax):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, 1)
        self.conv2 = nn.Conv2d(4, 8, 3, 1)
        self.dropout = nn.Dropout(0.25)
        self.fc1 = nn.Linear(8 * 3 * 3, 32)
        self.fc2 = nn.Linear(32, 4)
        self.log_softmax = log_softmax

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(self.dropout(torch.flatten(x, 1))))
        x = self.fc2(x)
        return F.log_softmax(x, dim=1) if self.log_softmax else x


def convert(name, log_softmax):
    """The tutorial's loop with the documented Synapse lines; returns the accuracy on each task's test set."""
    torch.manual_seed(0)
    tasks = SyntheticSplit(root="unused", key_to_targets={0: [0, 1], 1: [2, 3]})
    model = Net(log_softmax)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    synapse = METHODS[name](model)
    for task in tasks.values():
        loader = DataLoader(task.train_set, batch_size=16, shuffle=True)
        model.train()
        for data, target in loader:
            optimizer.zero_grad()
            output = model(data)
            loss = F.nll_loss(output, target) if log_softmax else F.cross_entropy(output, target)
            synapse.backward(loss, target, x=data)  # instead of loss.backward()
            optimizer.step()
        synapse.end_task(named_batches(loader))  # the names backward saw: x
    accuracy = []
    for task in tasks.values():
        correct = 0
        for data, target in DataLoader(task.test_set, batch_size=32):
            correct += int((synapse.predict(x=data).argmax(1) == target).sum())
        accuracy.append(correct / len(task.test_set))
    return accuracy


@pytest.mark.parametrize("name", list(METHODS))
def test_a_tutorial_with_raw_logits_converts_without_a_warning(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no trap fires, and nothing else complains either
        accuracy = convert(name, log_softmax=False)
    assert accuracy[1] > 0.75  # the task just learned (measured: 0.84 to 1.0; chance is 0.25)


@pytest.mark.parametrize("name", list(METHODS))
def test_log_softmax_outputs_warn_exactly_for_the_methods_that_read_logits(name):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        accuracy = convert(name, log_softmax=True)
    messages = [str(w.message) for w in record if issubclass(w.category, UserWarning)]
    expected = 1 if name in READS_LOGITS else 0
    assert sum("log-probabilities" in m for m in messages) == expected
    assert len(messages) == expected  # and no other warning
    assert accuracy[1] > 0.75
