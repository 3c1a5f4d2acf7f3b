"""Process-group set-up from the launcher's environment (torchrun, the deepspeed
launcher, srun via torchrun): the launch floor reads RANK/WORLD_SIZE/LOCAL_RANK here and
hands the library and the trainer a `phoclip.distributed.DistInfo`."""
from __future__ import annotations

import datetime
import os
import sys
from typing import Optional

import torch
import torch.distributed as dist

from phoclip.distributed import DistInfo


def launcher_rank() -> Optional[int]:
    """This process's rank under a launcher (torchrun, deepspeed, srun via torchrun), or
    None when started alone: the launch layer reads the environment, the library is told."""
    r = os.environ.get("RANK")
    return int(r) if r is not None and r.strip().isdigit() else None


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Join the process group described by RANK/WORLD_SIZE/LOCAL_RANK (torchrun and the
    deepspeed launcher both set them): NCCL on GPUs, gloo on CPU."""
    exit_with_launcher()
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        import warnings

        # the loss's autograd all_gather (torch.distributed.nn): the functional-collectives
        # replacement its deprecation warning points to has no autograd on gloo yet
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*")
        backend = "nccl" if use_cuda else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restart > 0 and "MASTER_ADDR" in os.environ:
            # After torchrun --max-restarts brings the job back, the agent's store still
            # holds the dead round's gloo addresses (seen with torch 2.14 --standalone:
            # "connectFullMesh failed ... Connection refused"): key this round apart.
            store = dist.PrefixStore(f"phoclip/attempt{restart}", _agent_store(rank, world, timeout))
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    return DistInfo(rank, world, local, dev)


def exit_with_launcher() -> None:
    """Under a launcher (torchrun's agent, the deepspeed launcher), ask Linux to send this
    rank SIGTERM when its launcher dies: the training loop then saves at the end of its
    step and exits, instead of training on as an orphan nobody can stop or restart."""
    if sys.platform != "linux" or "LOCAL_RANK" not in os.environ:
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


def _agent_store(rank: int, world: int, timeout) -> dist.Store:
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return dist.TCPStore(host, port, world, is_master=not agent and rank == 0, timeout=timeout,
                         multi_tenant=not agent)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
