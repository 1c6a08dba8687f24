"""Every rank's method state in one state dict, for checkpoints that one rank writes."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping

import torch
import torch.distributed as dist

from .._base import Synapse, distributed_world

__all__ = ["PerRankState"]


def _to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in it (through dicts, lists and tuples) copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class PerRankState:
    """A method's state with every rank's share: what a framework's checkpoint should hold.

    Each rank of a distributed run keeps its own memory (its own reservoir of its own data stream, and
    its own sampling RNG). Accelerate's ``save_state`` writes a registered object's ``state_dict`` from
    the main process only, and Lightning writes the checkpoint from rank 0 only, so after a resume every
    rank would hold rank 0's memory. Register this wrapper instead of the method: its :meth:`state_dict`
    gathers every rank's state (on the CPU) and :meth:`load_state_dict` gives each rank back its own.
    On one process it is the method's state in a list of one.

    Both frameworks call ``state_dict`` on every rank before rank 0 writes, as :meth:`state_dict` needs:
    it is a collective (``all_gather_object``) in a distributed run. Every rank holds the gathered
    states until the checkpoint is written: ``world_size`` memories in host memory, for a moment.

    Args:
        synapse: the method whose state to save and restore.

    Example:
        >>> accelerator.register_for_checkpointing(PerRankState(synapse))  # doctest: +SKIP
        >>> accelerator.save_state("ckpt")  # every rank's memory   # doctest: +SKIP
    """

    def __init__(self, synapse: Synapse) -> None:
        if not isinstance(synapse, Synapse):
            raise TypeError(f"synapse must be a Synapse method, got {type(synapse).__name__}")
        self.synapse = synapse

    def state_dict(self) -> Dict[str, Any]:
        """``{"world_size": W, "ranks": [state of rank 0, ..., state of rank W-1]}``; a collective when W > 1."""
        state = self.synapse.state_dict()
        world = distributed_world()
        if world == 1:
            return {"world_size": 1, "ranks": [state]}
        ranks: List[Any] = [None] * world
        dist.all_gather_object(ranks, _to_cpu(state))
        return {"world_size": world, "ranks": ranks}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore this rank's own state from a :meth:`state_dict` saved with the same number of ranks."""
        if not isinstance(state, Mapping) or "world_size" not in state or "ranks" not in state:
            raise ValueError("not a PerRankState state dict: expected keys 'world_size' and 'ranks'")
        world = distributed_world()
        if state["world_size"] != world or len(state["ranks"]) != world:
            raise ValueError(
                f"the state was saved by {state['world_size']} processes and this run has {world}: every rank's "
                "memory is its own shard, so resume with the same number of processes"
            )
        rank = dist.get_rank() if world > 1 else 0
        self.synapse.load_state_dict(state["ranks"][rank])
