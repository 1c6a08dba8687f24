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
from synapse.gradient import AGEM  # noqa: E402
from synapse.rehearsal import ER  # noqa: E402
from synapse.structure import SI  # noqa: E402

METHODS = {
    "er": lambda m: ER(m, 30, 6, method="er"),
    "der": lambda m: ER(m, 30, 6, method="der"),
    "der++": lambda m: ER(m, 30, 6, alpha=0.5, beta=0.5),
    "der++-unfused": lambda m: ER(m, 30, 6, alpha=0.5, beta=0.5, fused=False),
    "er-global": lambda m: ER(m, 31, 6, method="er", buffer_scope="global"),
    "agem": lambda m: AGEM(m, 30, 6),
    "si": lambda m: SI(m, checkpoint_per_steps=5),
}


def main(method: str, out_dir: str, steps: int = 12) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same initial model on every rank
    model = nn.parallel.DistributedDataParallel(mlp())
    syn = METHODS[method](model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(100 + rank)  # every rank sees its own data
    record = {}
    for step in range(steps):
        x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
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
        syn.backward(loss, y, input=x)
        if last and method == "agem":
            dist.all_reduce = real_all_reduce
            record["applied"] = torch.cat([p.grad.flatten() for p in model.parameters()])
        opt.step()
    record["params"] = [p.detach().clone() for p in model.parameters()]
    record["state"] = syn.state_dict()
    torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
