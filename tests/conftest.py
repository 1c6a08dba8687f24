import os
import shutil
from typing import Iterable, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def keep_checkpoint_at(monkeypatch, step: int, run_dir: str, copy_dir: str) -> None:
    """Have the experiment whose output is ``run_dir`` copy the checkpoint it writes at global step ``step``
    into ``copy_dir`` (a run to resume from the middle of an uninterrupted one)."""
    from synapse.experiments import checkpoint

    save = checkpoint.Writer.save

    def save_and_copy(writer, state):
        save(writer, state)
        if state["progress"]["step"] == step and writer.path.startswith(run_dir):
            os.makedirs(copy_dir)
            shutil.copy(writer.path, copy_dir)

    monkeypatch.setattr(checkpoint.Writer, "save", save_and_copy)


def mlp(num_classes: int = 10, in_features: int = 784) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, 100),
        nn.ReLU(),
        nn.Linear(100, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


@pytest.fixture(scope="session")
def fashion_tasks():
    """Split Fashion-MNIST as [(train_x, train_y, test_x, test_y)] per task, uint8 images."""
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.fail("Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
    from synapse.experiments.datasets import load_tasks

    _, tensors, _ = load_tasks("fashion-mnist", "/nonexistent-dataset-dir")
    return tensors


def batches(
    n: int, labels: Iterable[int] = range(10), batch: int = 8, seed: int = 0, shape: Tuple[int, ...] = (1, 28, 28)
):
    """``n`` batches ``(inputs, targets)`` of random inputs whose labels are drawn from ``labels``."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(list(labels))
    return [
        (torch.randn(batch, *shape, generator=g), pool[torch.randint(0, len(pool), (batch,), generator=g)])
        for _ in range(n)
    ]


def step(model: nn.Module, syn, x, y, opt=None, loss_fn=F.cross_entropy) -> None:
    """One training step through ``syn.backward`` (and the optimizer, when given; through the method's
    GradScaler when it has one)."""
    loss = loss_fn(model(x), y)
    if opt is not None:
        opt.zero_grad()
    syn.backward(loss, y, input=x)
    if opt is not None and getattr(syn, "scaler", None) is not None:
        syn.scaler.step(opt)
        syn.scaler.update()
    elif opt is not None:
        opt.step()


def train(model: nn.Module, syn, data: Sequence, opt=None, lr: float = 0.05, task_length: Optional[int] = None):
    """:func:`step` over ``data`` with SGD (or ``opt``); with ``task_length``, a task ends every that many
    steps, given its data. Returns the optimizer."""
    opt = opt or torch.optim.SGD(model.parameters(), lr=lr)
    for i, (x, y) in enumerate(data):
        step(model, syn, x, y, opt)
        if task_length and (i + 1) % task_length == 0:
            syn.end_task([(t, {"input": u}) for u, t in data[i + 1 - task_length : i + 1]])
    return opt


def params_of(model: nn.Module):
    return [p.detach().clone() for p in model.parameters()]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
