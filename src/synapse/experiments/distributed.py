"""torchrun support: process-group setup from the environment torchrun provides."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import List

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: str) -> World:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); NCCL on GPUs, gloo on CPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if rank == 0 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and _shares_agent_store():
        warnings.warn(
            "torchrun --max-restarts with its rendezvous store shared with the workers (torch's default): the "
            "restarted group can read the failed group's addresses and fail or hang in init_process_group "
            "(pytorch/pytorch#135712; seen with gloo on torch 2.14). Launch torchrun with "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment",
            UserWarning,
            stacklevel=2,
        )
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=10))
    return World(rank, size, local_rank)


def _shares_agent_store() -> bool:
    """Whether torchrun's workers use the agent's long-lived rendezvous store (its default since torch 2.4)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def device_for(requested: str, world: World) -> torch.device:
    """``auto`` picks CUDA when present; each torchrun process takes its own local GPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", world.local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    return device


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank if ``flag`` is True on any rank (so all ranks stop at the same step)."""
    return bool(reduce_ints([int(flag)], world, device)[0])


def reduce_ints(values: List[int], world: World, device: torch.device, op: str = "max") -> List[int]:
    """``values`` reduced elementwise over the ranks (``op``: "max" or "min"), in one collective; as given
    in a single process. Several flags or counters that ranks must agree on cost one round trip."""
    if world.size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
    return [int(v) for v in t.tolist()]


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
