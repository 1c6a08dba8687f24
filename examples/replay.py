"""Rehearsal in your own loop: DER++ on Split Fashion-MNIST with a plain PyTorch training loop.

python examples/replay.py [--steps-per-task N]
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from synapse.experiments.datasets import load_tasks
from synapse.rehearsal import ER

parser = argparse.ArgumentParser()
parser.add_argument("--steps-per-task", type=int, default=1200)
parser.add_argument("--dataset_dir", default="datasets")
args = parser.parse_args()

torch.manual_seed(0)
_, tasks, _ = load_tasks("fashion-mnist", args.dataset_dir)
model = nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.03)
synapse = ER(model, buffer_size=500, buffer_sample_size=10, alpha=0.3, beta=0.5, method="der++")

for _t, (images, labels, _, _) in enumerate(tasks):
    for _step in range(args.steps_per_task):
        idx = torch.randint(0, len(labels), (10,))
        inputs, targets = images[idx].float() / 255, labels[idx]
        outputs = model(inputs)
        loss = F.cross_entropy(outputs, targets)
        optimizer.zero_grad()
        synapse.backward(loss, targets, input=inputs)  # instead of loss.backward()
        optimizer.step()

model.eval()
with torch.no_grad():
    accs = [(model(tx.float() / 255).argmax(1) == ty).float().mean().item() for _, _, tx, ty in tasks]
print("Class-IL accuracy per task:", " ".join(f"{a:.2f}" for a in accs))
