"""Gradient projection in your own loop: A-GEM on Split Fashion-MNIST.

python examples/gradient_projection.py [--steps-per-task N]
"""

import torch
import torch.nn.functional as F

from common import batches, setup
from synapse.gradient import AGEM

args, tasks, model = setup(__doc__)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
synapse = AGEM(model, buffer_size=500, buffer_sample_size=128)

for images, labels, _, _ in tasks:
    for inputs, targets in batches(images, labels, args.steps_per_task):
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        synapse.backward(loss, targets, input=inputs)  # projects the gradient if it conflicts with the memory's
        optimizer.step()

model.eval()
with torch.no_grad():  # Task-IL: choose among the task's own two classes
    accs = [
        ((model(tx.float() / 255)[:, 2 * t : 2 * t + 2].argmax(1) + 2 * t) == ty).float().mean().item()
        for t, (_, _, tx, ty) in enumerate(tasks)
    ]
print("Task-IL accuracy per task:", " ".join(f"{a:.2f}" for a in accs))
