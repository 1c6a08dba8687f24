"""Run by tests/test_distributed.py under torchrun (2 gloo processes): trains a few steps under DDP."""

import copy
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import mlp  # noqa: E402
from synapse import catalog, testing  # noqa: E402

# Every registered method, plus the variants whose options change how ranks interact.
VARIANTS = {
    "der++-unfused": ("der++", {"buffer_size": 30, "fused": False}),
    "er-global": ("er", {"buffer_size": 31, "buffer_scope": "global"}),
}
TASK_END = 6  # a task ends after this many steps (its data passed), so task-end passes run under DDP too


def build(name: str, model: nn.Module):
    base, run_args = VARIANTS.get(name, (name, {"buffer_size": 30}))
    spec = catalog.get(base)
    return spec.create(model, spec.harness_hparams, buffer_sample_size=6, **run_args)


def main(method: str, out_dir: str, steps: int = 12) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same initial model on every rank
    vit = catalog.get(VARIANTS.get(method, (method, {}))[0]).cls.requires_vit  # prompts need the tiny ViT
    shape, name = ((3, testing.IMAGE_SIZE, testing.IMAGE_SIZE), "x") if vit else ((1, 28, 28), "input")
    if vit:  # a method that freezes the backbone comes before DDP, which reduces what was trainable when built
        inner = testing.toy_vit()
        syn = build(method, inner)
        model = nn.parallel.DistributedDataParallel(inner)
    else:
        model = nn.parallel.DistributedDataParallel(mlp())
        syn = build(method, model)
    opt = torch.optim.SGD(testing.optimized_parameters(model, syn), lr=0.05)
    g = torch.Generator().manual_seed(100 + rank)  # every rank sees its own data
    record = {}
    task = []
    for step in range(steps):
        x, y = torch.randn(8, *shape, generator=g), torch.randint(0, 10, (8,), generator=g)
        task.append((y, {name: x}))
        last = step == steps - 1
        if last and method == "agem":
            inner = copy.deepcopy(model.module)
            local = torch.autograd.grad(F.cross_entropy(inner(x), y), list(inner.parameters()))
            record["local_grad"] = torch.cat([t.flatten() for t in local])
            real_all_reduce = dist.all_reduce

            def recording_all_reduce(tensor, *args, real=real_all_reduce, **kwargs):
                record["local_reference"] = tensor.clone()
                return real(tensor, *args, **kwargs)

            dist.all_reduce = recording_all_reduce
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        syn.backward(loss, y, **{name: x})
        if last and method == "agem":
            dist.all_reduce = real_all_reduce
            record["applied"] = torch.cat([p.grad.flatten() for p in model.parameters()])
        opt.step()
        if (step + 1) % TASK_END == 0 and not last:
            syn.end_task(task)
            task = []
    record["params"] = [p.detach().clone() for p in model.parameters()]
    record["state"] = syn.state_dict()
    torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
