"""What every example needs besides its training loop: arguments, Split Fashion-MNIST and an MLP.

Your own code has its own versions of these; the examples' point is the loop.
"""

import argparse

import torch
from torch import nn

from synapse.experiments.datasets import load_tasks


def setup(description: str):
    """Parse ``--steps-per-task`` and ``--dataset_dir``; return (args, tasks, model), seeded."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps-per-task", type=int, default=1200)
    parser.add_argument("--dataset_dir", default="datasets")
    args = parser.parse_args()
    torch.manual_seed(0)
    _, tasks, _ = load_tasks("fashion-mnist", args.dataset_dir)  # [(train_x, train_y, test_x, test_y)] per task
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10)
    )
    return args, tasks, model


def batches(images, labels, steps: int, batch_size: int = 10):
    """``steps`` random batches of float images in [0, 1] and their labels."""
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (batch_size,))
        yield images[idx].float() / 255, labels[idx]
