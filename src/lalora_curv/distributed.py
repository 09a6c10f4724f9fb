"""The few ``torch.distributed`` facts lalora-curv needs, valid in a single process too."""

from __future__ import annotations

import torch
import torch.distributed as dist


def initialized() -> bool:
    """Whether ``torch.distributed`` is available and initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The number of ranks; 1 in one process."""
    return dist.get_world_size() if initialized() else 1


def rank() -> int:
    """This process's rank; 0 in one process."""
    return dist.get_rank() if initialized() else 0


def is_main_process() -> bool:
    """Whether this process is rank 0 (the one that writes files)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank; nothing in one process."""
    if initialized():
        dist.barrier()


def reduce_scalar(value: float, op: str, device: torch.device) -> float:
    """``value`` reduced over the ranks (``"min"`` or ``"max"``); itself in one process."""
    if not initialized():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
    return float(t.item())
