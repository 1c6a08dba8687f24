"""Weight regularisation in your own loop: Synaptic Intelligence with explicit task boundaries.

python examples/regularisation.py [--steps-per-task N]
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from synapse.experiments.datasets import load_tasks
from synapse.structure import SI

parser = argparse.ArgumentParser()
parser.add_argument("--steps-per-task", type=int, default=1200)
parser.add_argument("--dataset_dir", default="datasets")
args = parser.parse_args()

torch.manual_seed(0)
_, tasks, _ = load_tasks("fashion-mnist", args.dataset_dir)
model = nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
synapse = SI(model, alpha=1.0, xi=0.9)

for images, labels, _, _ in tasks:
    for _step in range(args.steps_per_task):
        idx = torch.randint(0, len(labels), (10,))
        inputs, targets = images[idx].float() / 255, labels[idx]
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        synapse.backward(loss, targets, input=inputs)
        optimizer.step()
    synapse.end_task()  # consolidate importance at the boundary

total = sum(float(o.sum()) for o in synapse.importance)
print(f"consolidations: {synapse.num_consolidations}, total importance: {total:.3f}")
