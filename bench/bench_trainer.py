"""Trainer overhead: steps/s of the real training step (phoclip_train.step.train_step on
the parts `build_run` builds, with the host read of a logging step (read_step), as
Trainer.train_step(sync=True) does, and without it, as on the steps between reads; DDP
on 2 gloo processes, tiny model, fp32, one batch held in memory) vs a bare DDP
forward/backward/AdamW loop on the same model and batch; and the share of a step spent
in the all-gather + loss.

    python bench/bench_trainer.py [--batch 32] [--steps 30]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from common import bench_shards, machine, table  # noqa: E402


def worker(rank, world, port, shards, tok, n_train, batch, steps, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from phoclip_train.config import resolve_config
    from phoclip_cli.distributed import init_distributed
    from phoclip.data.transforms import normalize_images
    from phoclip_train.run import build_run
    from phoclip_train.step import NonFiniteCounter, device_inputs, read_step, train_step

    info = init_distributed("cpu")
    cfg = resolve_config(str(ROOT / "launch/configs/tiny-debug.yaml"), [
        f"run_dir={shards}/../run", f"model.tokenizer={tok}", "train.precision=fp32",
        f"data.train_shards={shards}/train-{{000000..{n_train - 1:06d}}}.tar", f"data.batch_size={batch}",
        "data.image_size=64", "train.log_every=1000"])
    tr = build_run(cfg, info)
    b = next(iter(tr.stream))
    counter = NonFiniteCounter()

    def ours_no_read():
        out = train_step(tr.model, tr.engine, tr.loss_fn, device_inputs([b], tr.prep, tr.model))
        counter.update(out.bad)
        return out

    def ours():
        read_step(ours_no_read(), counter, False, tr.engine.lrs())

    model = tr.engine.wrapped
    opt = tr.engine.optimizer
    imgs, ids = normalize_images(b["images"]), b["input_ids"]

    def bare():
        out = model(imgs, ids)
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        lab = torch.arange(len(imgs))
        loss = (torch.nn.functional.cross_entropy(logits, lab) + torch.nn.functional.cross_entropy(logits.T, lab)) / 2
        loss.backward()
        opt.step()
        opt.zero_grad()

    feats = torch.randn(batch, tr.model.config["embed_dim"])

    def loss_only():
        i = torch.nn.functional.normalize(feats, dim=-1).requires_grad_()
        t = torch.nn.functional.normalize(feats.flip(0), dim=-1).requires_grad_()
        tr.loss_fn(i, t, torch.tensor(14.3))["contrastive_loss"].backward()

    res = {}
    for name, fn in (("ours", ours), ("ours_no_read", ours_no_read), ("bare", bare), ("loss", loss_only)):
        for _ in range(3):
            fn()
        dist.barrier()
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        dist.barrier()
        res[name] = (time.perf_counter() - t) / steps
    if rank == 0:
        q.put(res)
    tr.close()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    from dist_utils import free_port

    d = Path(tempfile.mkdtemp())
    try:
        _, tok, _ = bench_shards(d, 128, image_px=72, shard_args=["--workers", "1", "--shard-size", "64",
                                                                  "--val-fraction", "0", "--max-length", "32"])
        q = mp.get_context("spawn").SimpleQueue()
        mp.start_processes(worker, args=(2, free_port(), str(d / "sh"), str(tok), 2, args.batch, args.steps, q),
                           nprocs=2, start_method="spawn")
        r = q.get()
        rows = [("ours: train_step + read_step (a logging step)", f"{1 / r['ours']:.2f}", f"{r['ours'] * 1e3:.1f}",
                 f"{r['bare'] / r['ours']:.2f}x"),
                ("ours: train_step (a step between reads)", f"{1 / r['ours_no_read']:.2f}",
                 f"{r['ours_no_read'] * 1e3:.1f}", f"{r['bare'] / r['ours_no_read']:.2f}x"),
                ("bare DDP fwd/bwd/AdamW loop", f"{1 / r['bare']:.2f}", f"{r['bare'] * 1e3:.1f}", "1.00x")]
        print(f"\ntrainer: tiny-debug, 64px, batch {args.batch}/rank, 2 gloo processes, fp32; {machine()}")
        print(table(rows, ("loop", "steps/s", "ms/step", "speed vs bare")))
        print(f"all-gather + global loss (fwd+bwd): {r['loss'] * 1e3:.2f} ms = "
              f"{100 * r['loss'] / r['ours']:.1f}% of our step")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
