"""CUDA checks: no host syncs in backward, flat memory, and the same numbers as on the CPU.

Skipped without CUDA (CI has none); run them on a GPU machine with ``pytest -m gpu``.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import mlp
from synapse.gradient import AGEM
from synapse.rehearsal import ER
from synapse.structure import SI

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

METHODS = {
    "er": lambda m: ER(m, 64, 16, method="er"),
    "der": lambda m: ER(m, 64, 16, method="der"),
    "der++": lambda m: ER(m, 64, 16),
    "der++ unfused": lambda m: ER(m, 64, 16, fused=False),
    "agem": lambda m: AGEM(m, 64, 16),
    "si": lambda m: SI(m, checkpoint_per_steps=5),
}


def batch(step, device="cuda"):
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 1, 28, 28, generator=g).to(device), torch.randint(0, 10, (16,), generator=g).to(device)


def step(model, syn, opt, x, y):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    syn.backward(loss, y, input=x)
    opt.step()


@pytest.mark.parametrize("name", METHODS)
def test_backward_never_synchronises(name):
    model = mlp().cuda()
    syn = METHODS[name](model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = [batch(i) for i in range(30)]
    for x, y in data[:10]:  # fill the buffer, allocate workspaces
        step(model, syn, opt, x, y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in data[10:]:
            loss = F.cross_entropy(model(x), y)  # the fused forward's hooks included
            opt.zero_grad()
            syn.backward(loss, y, input=x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", ["der++", "agem", "si"])
def test_memory_is_flat_once_the_buffer_is_full(name):
    model = mlp().cuda()
    syn = METHODS[name](model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = [batch(i) for i in range(8)]
    for i in range(100):
        step(model, syn, opt, *data[i % 8])
    torch.cuda.synchronize()
    after_warmup = torch.cuda.memory_allocated()
    for i in range(1000):
        step(model, syn, opt, *data[i % 8])
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == after_warmup


@pytest.mark.parametrize("name", METHODS)
def test_cuda_matches_cpu(name):
    torch.manual_seed(0)
    cpu_model = mlp()
    cpu_syn = METHODS[name](cpu_model)
    cpu_opt = torch.optim.SGD(cpu_model.parameters(), lr=0.05)
    for i in range(6):
        step(cpu_model, cpu_syn, cpu_opt, *batch(i, "cpu"))
    gpu_model = copy.deepcopy(cpu_model).cuda()
    gpu_syn = METHODS[name](gpu_model)
    gpu_syn.load_state_dict(cpu_syn.state_dict())  # CPU checkpoint onto CUDA
    x, y = batch(99, "cpu")
    for model, syn, device in ((cpu_model, cpu_syn, "cpu"), (gpu_model, gpu_syn, "cuda")):
        model.zero_grad()
        syn.backward(F.cross_entropy(model(x.to(device)), y.to(device)), y.to(device), input=x.to(device))
    for a, b in zip(cpu_model.parameters(), gpu_model.parameters()):
        assert torch.allclose(a.grad, b.grad.cpu(), atol=1e-4, rtol=1e-3)
    back = METHODS[name](copy.deepcopy(gpu_model).cpu())
    back.load_state_dict(gpu_syn.state_dict())  # and back to the CPU
    assert back.num_steps == gpu_syn.num_steps
