"""Synapse in Hugging Face Accelerate and PyTorch Lightning loops, on the CPU: one process and two (gloo).

Run as a script under torchrun, this file is also the 2-process worker: ``python -m torch.distributed.run
--nproc_per_node=2 tests/test_integrations.py {accelerate,lightning} OUT_DIR``.
"""

import copy
import importlib.util
import logging
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from synapse.integrations import PerRankState, accelerate_backward
from synapse.rehearsal import ER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240
DIM, CLASSES = 20, 4  # two tasks of two classes each


def blobs(task: int, n: int, generator: torch.Generator):
    """``n`` points of task ``task``'s two classes: unit Gaussian blobs around orthogonal centres 3 apart."""
    centres = 3 * torch.eye(CLASSES, DIM)
    targets = 2 * task + torch.randint(0, 2, (n,), generator=generator)
    return centres[targets] + torch.randn(n, DIM, generator=generator), targets


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, CLASSES))


def same(a, b) -> bool:
    """Deep equality of state dicts: tensors and arrays exactly, containers by structure."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torchrun(*args: str, timeout: int = TIMEOUT) -> None:
    """2 local processes; the whole process group is killed if it overruns, so a hang fails the test."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, start_new_session=True, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"torchrun {' '.join(args)} did not finish in {timeout} s")
    assert proc.returncode == 0, err[-4000:]


def test_importing_synapse_imports_no_framework():
    code = (
        "import sys, synapse, synapse.integrations, synapse.rehearsal; "
        "frameworks = ('accelerate', 'lightning', 'pytorch_lightning', 'lightning_fabric'); "
        "found = [m for m in frameworks if m in sys.modules]; "
        "assert not found, found"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------- Accelerate
@pytest.fixture
def accelerator_factory():
    """Fresh ``Accelerator`` objects: Accelerate keeps its state in process-wide singletons."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    def make(**kwargs):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        return accelerate.Accelerator(cpu=True, **kwargs)

    yield make
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def accelerate_run(
    make,
    *,
    use_synapse,
    accumulation=1,
    init_scale=None,
    mixed_precision="no",
    steps=6,
    alpha=0.0,
    on_model=None,
    loss_factor=1.0,
):
    """A few steps of an Accelerate loop; returns (parameters, accelerator, optimizer, synapse)."""
    accelerator = make(gradient_accumulation_steps=accumulation, mixed_precision=mixed_precision)
    if init_scale is not None:
        # Accelerate makes its fp16 GradScaler on accelerators only; a CPU GradScaler takes the same path.
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    torch.manual_seed(0)
    model = tiny_mlp()
    if on_model is not None:
        on_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    synapse = None
    if use_synapse:
        synapse = ER(model, buffer_size=16, buffer_sample_size=4, alpha=alpha, method="er", scaler=accelerator.scaler)
    g = torch.Generator().manual_seed(5)
    for _ in range(steps * accumulation):
        x, y = blobs(0, 8, g)
        with accelerator.accumulate(model):
            loss = loss_factor * F.cross_entropy(model(x), y)
            if synapse is None:
                accelerator.backward(loss)
            else:
                accelerate_backward(accelerator, synapse, loss, y, input=x)
            optimizer.step()
            optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()], accelerator, optimizer, synapse


@pytest.mark.parametrize("init_scale, accumulation", [(None, 1), (None, 2), (2.0**10, 1), (2.0**10, 2), (2.0**127, 1)])
def test_accelerate_backward_does_what_accelerator_backward_does(accelerator_factory, accumulation, init_scale):
    # With replay weighted 0, Synapse's objective is the user's loss: accelerate_backward must then update the
    # model exactly as accelerator.backward does, scaling (fp16's scaler, including the steps it skips on
    # overflow: a scale of 2**127 overflows the first steps) and gradient accumulation included. (Not both
    # overflow and accumulation: accelerator.backward scales loss / N, Synapse the loss, dividing the summed
    # gradients once at the end, so its scaler overflows at a scale N times lower.)
    run = dict(accumulation=accumulation, init_scale=init_scale, loss_factor=8.0)
    ref, ref_acc, _, _ = accelerate_run(accelerator_factory, use_synapse=False, **run)
    ref_scale = ref_acc.scaler.get_scale() if init_scale else None
    got, acc, opt, synapse = accelerate_run(accelerator_factory, use_synapse=True, **run)
    assert synapse.num_steps == 6 * accumulation and len(synapse.buffer) == 16
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    if init_scale is not None:
        assert acc.scaler.get_scale() == ref_scale
        if init_scale == 2.0**127:
            assert ref_scale < init_scale and opt.step_was_skipped is False  # the same steps were skipped
    torch.manual_seed(0)
    assert not torch.equal(got[0], tiny_mlp()[0].weight)  # it trained


def test_accelerate_backward_needs_the_accelerators_scaler(accelerator_factory):
    accelerator = accelerator_factory()
    accelerator.scaler = torch.amp.GradScaler("cpu")
    model = accelerator.prepare(tiny_mlp())
    x, y = blobs(0, 8, torch.Generator().manual_seed(0))
    for scaler in (None, torch.amp.GradScaler("cpu")):
        synapse = ER(model, buffer_size=16, buffer_sample_size=4, method="er", scaler=scaler)
        with pytest.raises(ValueError, match="scaler=accelerator.scaler"):
            accelerate_backward(accelerator, synapse, F.cross_entropy(model(x), y), y, input=x)
        assert synapse.num_steps == 0 and len(synapse.buffer) == 0
        assert all(p.grad is None for p in model.parameters())
        synapse.remove_hooks()


def test_accelerate_bf16_runs_the_forward_in_bf16_and_learns_like_fp32(accelerator_factory):
    dtypes = set()
    fp32, *_ = accelerate_run(accelerator_factory, use_synapse=True, alpha=1.0)
    bf16, accelerator, _, synapse = accelerate_run(
        accelerator_factory,
        use_synapse=True,
        alpha=1.0,
        mixed_precision="bf16",
        on_model=lambda model: model[0].register_forward_hook(lambda m, i, o: dtypes.add(o.dtype)),
    )
    assert accelerator.scaler is None and dtypes == {torch.bfloat16}  # replay rows included: one forward
    assert len(synapse.buffer) == 16
    for a, b in zip(fp32, bf16):
        torch.testing.assert_close(b, a, rtol=0, atol=0.02)


def test_accelerate_save_state_restores_the_method(accelerator_factory, tmp_path):
    accelerator = accelerator_factory()
    torch.manual_seed(0)
    model = tiny_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    synapse = ER(model, buffer_size=12, buffer_sample_size=4, alpha=0.5, beta=0.5, method="der++")
    accelerator.register_for_checkpointing(PerRankState(synapse))
    g = torch.Generator().manual_seed(3)
    batches = [blobs(t, 8, g) for t in (0, 0, 0, 0, 1, 1, 1, 1)]

    def train(part):
        for x, y in part:
            loss = F.cross_entropy(model(x), y)
            accelerate_backward(accelerator, synapse, loss, y, input=x)
            optimizer.step()
            optimizer.zero_grad()

    train(batches[:4])
    synapse.end_task()
    accelerator.save_state(str(tmp_path / "ckpt"))
    train(batches[4:])
    uninterrupted = (copy.deepcopy(synapse.state_dict()), [p.detach().clone() for p in model.parameters()])
    accelerator.load_state(str(tmp_path / "ckpt"))
    assert synapse.num_steps == 4 and synapse.num_tasks_ended == 1
    train(batches[4:])  # the resumed run replays the same memory with the same RNG: bit-identical
    assert same(synapse.state_dict(), uninterrupted[0])
    for a, b in zip(uninterrupted[1], model.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- Lightning
@pytest.fixture(scope="module")
def lit():
    """The example's module, and Lightning quietened."""
    pytest.importorskip("lightning")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    return load_example("lightning_module")


def lit_module(lit, method="der++", **kwargs):
    torch.manual_seed(0)
    options = dict(in_features=DIM, num_classes=CLASSES, hidden=32, method=method, buffer_size=40, buffer_sample_size=8)
    return lit.ContinualModule(**{**options, "lr": 0.1, **kwargs})


def task_loader(task: int, n: int = 320, seed: int = 0) -> DataLoader:
    x, y = blobs(task, n, torch.Generator().manual_seed(seed + task))
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(task))


def test_lightning_fast_dev_run(lit):
    module = lit_module(lit)
    lit.trainer(5, fast_dev_run=True, accelerator="cpu").fit(module, task_loader(0))
    assert module.synapse.num_steps == 1 and len(module.synapse.buffer) == 16


def test_lightning_two_tasks_er_beats_fine_tuning(lit):
    # Class-incremental: after task 2, fine-tuning predicts task 2's classes only, and ER still knows task 1.
    x1, y1 = blobs(0, 400, torch.Generator().manual_seed(99))
    accuracy = {}
    for method in ("er", "none"):
        module = lit_module(lit, method=method, alpha=1.0)
        for task in (0, 1):
            lit.trainer(60, accelerator="cpu").fit(module, task_loader(task))
            if module.synapse is not None:
                module.synapse.end_task()
        accuracy[method] = lit.accuracy(module, x1, y1)
    # Measured: ER 0.94 with these seeds (0.88-0.94 over 4 seeds), fine-tuning 0.000-0.002.
    assert accuracy["er"] > 0.6 and accuracy["none"] < 0.1, accuracy


def test_lightning_checkpoint_restores_the_method(lit, tmp_path):
    module = lit_module(lit)
    run = lit.trainer(10, accelerator="cpu")
    run.fit(module, task_loader(0))
    module.synapse.end_task()
    run.save_checkpoint(tmp_path / "task0.ckpt")
    restored = lit.ContinualModule.load_from_checkpoint(tmp_path / "task0.ckpt")
    assert restored.synapse is not module.synapse and restored.synapse.num_tasks_ended == 1
    assert same(restored.synapse.state_dict(), module.synapse.state_dict())
    for a, b in zip(module.parameters(), restored.parameters()):
        assert torch.equal(a, b)
    # ...and it trains on: resuming the next task from the checkpoint equals going on without it.
    lit.trainer(6, accelerator="cpu").fit(module, task_loader(1))
    lit.trainer(6, accelerator="cpu").fit(restored, task_loader(1))
    assert same(restored.synapse.state_dict(), module.synapse.state_dict())


def test_lightning_fp16_scaler_is_shared_with_the_precision_plugin(lit):
    # Lightning's fp16 plugin scales the loss it hands to the backward hook; Synapse scales the unscaled loss
    # plus its replay terms with the plugin's own GradScaler, which the plugin then unscales and updates.
    # Scaling twice, or not at all, would move the weights ~65536 times too far or too little.
    from lightning.pytorch.plugins.precision import MixedPrecision

    def run(plugins):
        module = lit_module(lit)
        lit.trainer(10, accelerator="cpu", plugins=plugins).fit(module, task_loader(0))
        return module

    fp32 = run([])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)  # Lightning's fp16 plugin is CUDA-only otherwise
    fp16 = run([MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    initial = lit_module(lit)
    for a, b, start in zip(fp32.parameters(), fp16.parameters(), initial.parameters()):
        assert (a - b).abs().max() < 0.05 * (a - start).abs().max()  # measured: 2e-4
    assert fp16.synapse.scaler is scaler and scaler.get_scale() == 2.0**16 and int(scaler._growth_tracker) == 10


# ---------------------------------------------------------------------------------------------- 2 processes
@pytest.mark.distributed
def test_accelerate_two_processes(tmp_path):
    pytest.importorskip("accelerate")
    torchrun("tests/test_integrations.py", "accelerate", str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)  # DDP averaged the gradients of the whole objective inside Synapse's backward
    assert not torch.equal(*(r["saved"]["state"]["buffer"]["storage"]["input:input"] for r in (r0, r1)))
    for r in (r0, r1):  # each rank got its own memory back from accelerator.load_state
        assert same(r["loaded"], r["saved"])
        assert r["dtypes"] == [torch.bfloat16]


@pytest.mark.distributed
def test_lightning_two_processes(tmp_path):
    pytest.importorskip("lightning")
    torchrun("tests/test_integrations.py", "lightning", str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)  # manual_backward prepared DDP's reducer, which fired in Synapse's backward
    assert not torch.equal(*(r["state"]["state"]["buffer"]["storage"]["input:input"] for r in (r0, r1)))
    checkpoint = torch.load(tmp_path / "task0.ckpt", weights_only=False)
    assert checkpoint["synapse"]["world_size"] == 2
    for rank, r in enumerate((r0, r1)):
        assert same(checkpoint["synapse"]["ranks"][rank], r["state"])


# ---------------------------------------------------------------------------------------------- the workers
def accelerate_worker(out: str) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2)
    rank = accelerator.process_index
    torch.manual_seed(0)  # the same initial model on both ranks
    model = tiny_mlp()
    dtypes = set()
    model[0].register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    synapse = ER(model, buffer_size=12, buffer_sample_size=4, alpha=0.5, beta=0.5, scaler=accelerator.scaler)
    accelerator.register_for_checkpointing(PerRankState(synapse))
    g = torch.Generator().manual_seed(10 + rank)  # each rank its own stream

    def train(task, micro_steps):
        for _ in range(micro_steps):
            x, y = blobs(task, 8, g)
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(x), y)
                accelerate_backward(accelerator, synapse, loss, y, input=x)
                optimizer.step()
                optimizer.zero_grad()

    train(0, 8)
    synapse.end_task()
    accelerator.save_state(os.path.join(out, "ckpt"))
    saved = copy.deepcopy(synapse.state_dict())
    train(1, 4)
    params = [p.detach().clone() for p in model.parameters()]
    accelerator.load_state(os.path.join(out, "ckpt"))
    record = {"params": params, "saved": saved, "loaded": synapse.state_dict(), "dtypes": sorted(dtypes, key=str)}
    torch.save(record, os.path.join(out, f"rank{rank}.pt"))


def lightning_worker(out: str) -> None:
    lit = load_example("lightning_module")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    module = lit_module(lit)
    run = lit.trainer(6, accelerator="cpu", devices=2, strategy="ddp")
    run.fit(module, task_loader(0, n=192))  # the DistributedSampler gives each rank its half
    module.synapse.end_task()
    run.save_checkpoint(os.path.join(out, "task0.ckpt"))  # a collective: on_save_checkpoint gathers the ranks
    record = {"params": [p.detach().clone() for p in module.parameters()], "state": module.synapse.state_dict()}
    torch.save(record, os.path.join(out, f"rank{module.global_rank}.pt"))


if __name__ == "__main__":
    {"accelerate": accelerate_worker, "lightning": lightning_worker}[sys.argv[1]](sys.argv[2])
