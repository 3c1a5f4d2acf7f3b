"""How long the real recipe's checkpoint takes to write and read on this machine: the
preemption margin of launch/slurm/train.sbatch is chosen from it.

    python bench/bench_checkpoint.py [--out DIR]

phobert-large + resnet50 (random weights, the published architecture, no hub) with its
AdamW state (exp_avg, exp_avg_sq for every parameter), saved through the trainer's own
Checkpointer + DDPEngine (torch.save, fsync, atomic rename), then loaded back.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import PHOBERT_LARGE, machine  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder to write the checkpoint in (default: a temporary folder)")
    args = p.parse_args(argv)
    import phoclip
    from phoclip_train.checkpointer import Checkpointer
    from phoclip_train.build import build_optimizer
    from phoclip_train.config import OptimConfig
    from phoclip_train.engine import DDPEngine

    torch.manual_seed(0)
    model = phoclip.create_model("phobert-large-rn50", vision={"pretrained": False},
                                 text={"hf_model": None, "hf_config": PHOBERT_LARGE})
    n = sum(p.numel() for p in model.parameters())
    opt, sched = build_optimizer(model, OptimConfig(warmup_steps=1), 10)
    eng = DDPEngine(model, opt, sched, precision="bf16", grad_clip=1.0, device=torch.device("cpu"),
                    world_size=1, rank=0)
    for q in model.parameters():  # one step with zero gradients creates the full AdamW state
        q.grad = torch.zeros_like(q)
    eng.step(skip=False)
    work = Path(args.out or tempfile.mkdtemp(prefix="phoclip-ckpt-"))
    try:
        ck = Checkpointer(work, keep_last=1, rank=0, world_size=1)
        t = time.perf_counter()
        path = ck.save(1, eng, {"data": {}, "rng": {}}, {"samples_seen": 0})
        save_s = time.perf_counter() - t
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        t = time.perf_counter()
        eng.load(path)
        load_s = time.perf_counter() - t
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {machine()}")
    print(f"phobert-large-rn50: {n / 1e6:.0f} M parameters, checkpoint {size / 1e9:.2f} GB "
          f"(model + AdamW state)")
    print(f"save (write + fsync + rename): {save_s:.1f} s  ({size / 1e6 / save_s:.0f} MB/s)")
    print(f"load: {load_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
