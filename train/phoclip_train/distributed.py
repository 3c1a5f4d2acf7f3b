"""Collectives the training loop uses (no-ops on one process). Joining the process
group is the launch floor's (phoclip_cli.distributed); `DistInfo` is the library's."""
from __future__ import annotations

import torch
import torch.distributed as dist

from phoclip.distributed import DistInfo  # noqa: F401 (re-exported: the trainer's callers build one)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def current_rank() -> int:
    """This process's rank in the process group (0 without one)."""
    return dist.get_rank() if dist.is_initialized() else 0


def current_world_size() -> int:
    """The process group's size (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1
