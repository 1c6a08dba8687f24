"""Your Hugging Face Accelerate loop, with DER++ on Split Fashion-MNIST.

python examples/accelerate_loop.py [--mixed_precision bf16] [--gradient_accumulation_steps 2]
accelerate launch --num_processes 2 --mixed_precision fp16 examples/accelerate_loop.py   # DDP on 2 GPUs
torchrun --nproc_per_node 2 examples/accelerate_loop.py --cpu                           # DDP on 2 CPU processes

Two lines differ from the loop Accelerate's docs show: the method is built on the prepared model with the
accelerator's scaler, and ``accelerate_backward`` replaces ``accelerator.backward(loss)``. With
``--output_dir`` the run checkpoints after every task with ``accelerator.save_state``, the method's memory
included (every rank's own, through ``PerRankState``).
"""

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from synapse.experiments.datasets import load_tasks
from synapse.integrations import PerRankState, accelerate_backward
from synapse.rehearsal import ER

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps-per-task", type=int, default=1200, help="optimizer steps per task and process")
parser.add_argument("--dataset_dir", default="datasets")
parser.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default=None)  # `accelerate launch`'s
parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
parser.add_argument("--output_dir", default=None, help="accelerator.save_state here after every task")
parser.add_argument("--cpu", action="store_true", help="CPU processes (gloo) even where there is a GPU")
args = parser.parse_args()

accelerator = Accelerator(
    cpu=args.cpu, mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps
)
set_seed(0)  # the same initial model on every process
_, tasks, _ = load_tasks("fashion-mnist", args.dataset_dir)  # [(train_x, train_y, test_x, test_y)] per task
model = nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.03)
model, optimizer = accelerator.prepare(model, optimizer)  # DDP under `accelerate launch`; autocast for bf16/fp16

# Built on the prepared model; it scales its total loss with the accelerator's fp16 scaler (None otherwise).
synapse = ER(model, buffer_size=500, buffer_sample_size=10, alpha=0.3, beta=0.5, scaler=accelerator.scaler)
if args.output_dir:
    accelerator.register_for_checkpointing(PerRankState(synapse))

batch_size, micro_steps = 10, args.steps_per_task * args.gradient_accumulation_steps
for images, labels, _, _ in tasks:
    subset = torch.randperm(len(labels))[: micro_steps * batch_size * accelerator.num_processes]
    data = TensorDataset(images[subset].float() / 255, labels[subset])
    loader = accelerator.prepare(DataLoader(data, batch_size=batch_size, shuffle=True))  # sharded across processes
    model.train()
    for inputs, targets in loader:
        with accelerator.accumulate(model):
            loss = F.cross_entropy(model(inputs), targets)
            accelerate_backward(accelerator, synapse, loss, targets, input=inputs)  # not accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    synapse.end_task()
    if args.output_dir:
        accelerator.save_state(args.output_dir)  # model, optimizer, scaler, RNG, and every rank's memory

model.eval()
with torch.no_grad():
    accs = [(model(tx.float() / 255).argmax(1) == ty).float().mean().item() for _, _, tx, ty in tasks]
accelerator.print(
    f"{accelerator.num_processes} process(es), mixed precision {accelerator.mixed_precision}, "
    f"{synapse.num_steps} Synapse steps per process"
)
accelerator.print("Class-IL accuracy per task:", " ".join(f"{a:.2f}" for a in accs))
