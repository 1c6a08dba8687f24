"""Weight regularisation in your own loop: Synaptic Intelligence with explicit task boundaries.

python examples/regularisation.py [--steps-per-task N]
"""

import torch
import torch.nn.functional as F

from common import batches, setup
from synapse.structure import SI

args, tasks, model = setup(__doc__)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
synapse = SI(model, alpha=1.0, xi=0.9)

for images, labels, _, _ in tasks:
    for inputs, targets in batches(images, labels, args.steps_per_task):
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        synapse.backward(loss, targets, input=inputs)  # adds the importance-weighted penalty's gradient
        optimizer.step()
    synapse.end_task()  # consolidate the importance at the boundary

total = sum(float(o.sum()) for o in synapse.importance)
print(f"consolidations: {synapse.num_consolidations}, total importance: {total:.3f}")
