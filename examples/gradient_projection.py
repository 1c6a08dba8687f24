"""Gradient projection in your own loop: A-GEM on Split Fashion-MNIST.

python examples/gradient_projection.py [--steps-per-task N]
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from synapse.experiments.datasets import load_tasks
from synapse.gradient import AGEM

parser = argparse.ArgumentParser()
parser.add_argument("--steps-per-task", type=int, default=1200)
parser.add_argument("--dataset_dir", default="datasets")
args = parser.parse_args()

torch.manual_seed(0)
_, tasks, _ = load_tasks("fashion-mnist", args.dataset_dir)
model = nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
synapse = AGEM(model, buffer_size=500, buffer_sample_size=128)

for images, labels, _, _ in tasks:
    for _step in range(args.steps_per_task):
        idx = torch.randint(0, len(labels), (10,))
        inputs, targets = images[idx].float() / 255, labels[idx]
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        synapse.backward(loss, targets, input=inputs)
        optimizer.step()

model.eval()
with torch.no_grad():
    # Task-IL: choose among the task's own two classes.
    accs = [
        ((model(tx.float() / 255)[:, 2 * t : 2 * t + 2].argmax(1) + 2 * t) == ty).float().mean().item()
        for t, (_, _, tx, ty) in enumerate(tasks)
    ]
print("Task-IL accuracy per task:", " ".join(f"{a:.2f}" for a in accs))
