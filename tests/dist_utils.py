"""Run a function in N real processes on the gloo backend (no mocks)."""
from __future__ import annotations

import os
import socket
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, errq):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    except BaseException:
        errq.put((rank, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int = 2, args: tuple = ()) -> None:
    """Spawn `world_size` processes running fn(rank, world_size, *args); re-raise failures."""
    ctx = mp.get_context("spawn")
    errq = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world_size, free_port(), fn, args, errq),
                       nprocs=world_size, join=True, start_method="spawn")
    if not errq.empty():
        rank, tb = errq.get()
        raise AssertionError(f"rank {rank} failed:\n{tb}")
