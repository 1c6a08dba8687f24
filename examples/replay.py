"""Rehearsal in your own loop: DER++ on Split Fashion-MNIST.

python examples/replay.py [--steps-per-task N]
"""

import torch
import torch.nn.functional as F

from common import batches, setup
from synapse.rehearsal import ER

args, tasks, model = setup(__doc__)
optimizer = torch.optim.SGD(model.parameters(), lr=0.03)
synapse = ER(model, buffer_size=500, buffer_sample_size=10, alpha=0.3, beta=0.5, method="der++")

for images, labels, _, _ in tasks:
    for inputs, targets in batches(images, labels, args.steps_per_task):
        outputs = model(inputs)
        loss = F.cross_entropy(outputs, targets)
        optimizer.zero_grad()
        synapse.backward(loss, targets, input=inputs)  # instead of loss.backward()
        optimizer.step()

model.eval()
with torch.no_grad():
    accs = [(model(tx.float() / 255).argmax(1) == ty).float().mean().item() for _, _, tx, ty in tasks]
print("Class-IL accuracy per task:", " ".join(f"{a:.2f}" for a in accs))
