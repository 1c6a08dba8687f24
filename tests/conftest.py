import os

import pytest
import torch
from torch import nn

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


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


def params_of(model: nn.Module):
    return [p.detach().clone() for p in model.parameters()]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
