"""The global contrastive loss on 2 gloo processes: forward+backward time and logits
memory of the memory-light form (local rows x all columns, the default) vs the
straightforward full-logits form, at several global batch sizes (512-d features).

    python bench/bench_loss.py
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import machine, table  # noqa: E402

SIZES = (256, 1024, 4096)


def worker(rank, world, port, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from phoclip.models.loss import ClipLoss

    out = []
    for gb in SIZES:
        b = gb // world
        res = {}
        for local in (True, False):
            loss_fn = ClipLoss(rank, world, local_loss=local)
            best = float("inf")
            for _ in range(3):
                img = torch.nn.functional.normalize(torch.randn(b, 512), dim=-1).requires_grad_()
                txt = torch.nn.functional.normalize(torch.randn(b, 512), dim=-1).requires_grad_()
                dist.barrier()
                t = time.perf_counter()
                loss_fn(img, txt, torch.tensor(14.3))["contrastive_loss"].backward()
                dist.barrier()
                best = min(best, time.perf_counter() - t)
            # fp32 logits held per rank: [b, W*b] twice (local) or one [W*b, W*b] (full;
            # its transpose is a view). Equal at W=2; the local form wins W/2x beyond.
            elems = 2 * b * gb if local else gb * gb
            res[local] = (best, elems * 4 / 2**20)
        out.append((gb, res))
    if rank == 0:
        q.put(out)
    dist.destroy_process_group()


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from dist_utils import free_port

    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.start_processes(worker, args=(2, free_port(), q), nprocs=2, start_method="spawn")
    rows = []
    for gb, res in q.get():
        (tl, ml), (tf, mf) = res[True], res[False]
        rows.append((gb, f"{tl * 1e3:.1f}", f"{tf * 1e3:.1f}", f"{tf / tl:.2f}x", f"{ml:.1f}", f"{mf:.1f}"))
    print("logits memory at W ranks: local 2*B*W*B*4 bytes, full (W*B)^2*4 bytes per rank: "
          "equal at W=2, 4x less for the local form at W=8")
    print(f"\nloss: 2 gloo processes, 512-d, fwd+bwd per step; {machine()}")
    print(table(rows, ("global batch", "local form ms", "full logits ms", "full/local",
                       "local logits MiB/rank", "full logits MiB/rank")))


if __name__ == "__main__":
    main()
