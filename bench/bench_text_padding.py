"""Compute spent on padding: forward+backward of the real phobert-large text tower
(random init from its published config; no download) on batches of realistic caption
lengths, padded to max_length (70) vs trimmed to each batch's longest caption (what
data.trim_padding does) vs grouped by length first (data.length_buckets), same
batches, same run; then the tiny model end to end through Trainer.train_step on
shards made with max_length 70.

Caption lengths (PhoBERT tokens with <s> and </s>, after word segmentation): drawn
from a log-normal with median 22 and sigma 0.4, clipped to [6, 70] - mean ~24, a long
tail to 70, as Vietnamese image captions (10-25 words) give. The histogram is printed.

    python bench/bench_text_padding.py [--batch 8] [--steps 3] [--buckets 4]
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PHOBERT_LARGE, bench_shards, machine, table  # noqa: E402

MAX_LEN = 70


def caption_lengths(n: int, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    return np.clip(np.round(np.exp(np.log(22) + 0.4 * g.standard_normal(n))), 6, MAX_LEN).astype(int)


def histogram(lengths: np.ndarray) -> str:
    edges = [0, 10, 15, 20, 25, 30, 40, 50, 60, 71]
    counts = np.histogram(lengths, bins=edges)[0]
    return "  ".join(f"{a}-{b - 1}: {c / len(lengths):.0%}" for a, b, c in zip(edges, edges[1:], counts))


def make_ids(lengths, vocab: int, g: torch.Generator) -> torch.Tensor:
    ids = torch.full((len(lengths), MAX_LEN), 1, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(4, vocab, (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = 0, 2
    return ids


def text_tower_rows(batch: int, steps: int, buckets: int) -> list[tuple]:
    import phoclip
    from phoclip.data import group_by_length
    from phoclip.model import trim_padding

    torch.manual_seed(0)
    model = phoclip.create_model("tiny-debug", text={"hf_config": dict(PHOBERT_LARGE)}, embed_dim=512)
    model.train()
    n = batch * steps * buckets
    lengths = caption_lengths(n)
    print(f"caption lengths ({n} captions): mean {lengths.mean():.1f}, median {np.median(lengths):.0f}, "
          f"p95 {np.percentile(lengths, 95):.0f}, max {lengths.max()}\n  {histogram(lengths)}")
    ids = make_ids(lengths, PHOBERT_LARGE["vocab_size"], torch.Generator().manual_seed(0))
    plain = [ids[i:i + batch] for i in range(0, n, batch)][:steps]
    grouped = []
    for blk in range(0, n, batch * buckets):
        chunk = ids[blk:blk + batch * buckets]
        for g in group_by_length(lengths[blk:blk + batch * buckets].tolist(), batch, random.Random(blk)):
            grouped.append(chunk[g])
    grouped = grouped[:steps]  # the same number of samples per mode
    modes = {"padded to 70": plain, "trimmed (data.trim_padding=8)": [trim_padding(x, 1, 8) for x in plain],
             f"bucketed x{buckets} + trimmed": [trim_padding(x, 1, 8) for x in grouped]}

    def step(x):
        model.zero_grad(set_to_none=True)
        model.encode_text(x).sum().backward()

    step(plain[0][:2])  # warm-up
    rows, times = [], {}
    for name, xs in modes.items():
        t = time.perf_counter()
        for x in xs:
            step(x)
        dt = time.perf_counter() - t
        times[name] = len(xs) * batch / dt
        width = np.mean([x.shape[1] for x in xs])
        rows.append((name, f"{width:.1f}", f"{times[name]:.2f}", f"{times[name] / times['padded to 70']:.2f}x"))
    return rows


def trainer_rows(batch: int, steps: int, buckets: int) -> list[tuple]:
    from phoclip_train.config import resolve_config
    from phoclip_train.distributed import DistInfo
    from phoclip_train.trainer import Trainer

    d = Path(tempfile.mkdtemp())
    try:
        shards, tok, _ = bench_shards(d, 400, None, 64, ["--max-length", str(MAX_LEN), "--shard-size", "100",
                                                         "--val-fraction", "0", "--image-size", "64"])
        rows, times = [], {}
        for name, trim, nb in (("padded to 70", 0, 0), ("trimmed", 8, 0), (f"bucketed x{buckets} + trimmed", 8, buckets)):
            cfg = resolve_config(str(ROOT / "launch/configs/tiny-debug.yaml"), [
                f"run_dir={d}/run-{trim}-{nb}", f"model.tokenizer={tok}", "train.precision=fp32",
                f"data.train_shards={shards}/train-{{000000..000003}}.tar", f"data.batch_size={batch}",
                "data.image_size=64", "train.log_every=1000", "train.sync_every=1000", "train.max_steps=100000",
                "train.save_every=100000", f"data.trim_padding={trim}", f"data.length_buckets={nb}"])
            tr = Trainer(cfg, DistInfo())
            it = iter(tr.stream)
            bs = [next(it) for _ in range(steps)]
            tr.train_step(bs[:1])  # warm-up
            t = time.perf_counter()
            for b in bs:
                tr.train_step([b], sync=False)
            times[name] = steps * batch / (time.perf_counter() - t)
            width = np.mean([tr.device_inputs([b])[0][1].shape[1] for b in bs])
            rows.append((name, f"{width:.1f}", f"{times[name]:.1f}", f"{times[name] / times['padded to 70']:.2f}x"))
            tr.close()
        return rows
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--buckets", type=int, default=4)
    ap.add_argument("--trainer-steps", type=int, default=40)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    rows = text_tower_rows(args.batch, args.steps, args.buckets)
    print(f"\nphobert-large text tower (355M, random init), forward+backward, batch {args.batch}, "
          f"{args.steps} batches per mode")
    print(table(rows, ("ids", "mean width", "samples/s", "vs padded")))
    rows = trainer_rows(32, args.trainer_steps, args.buckets)
    print(f"\ntiny model end to end (Trainer.train_step, fp32, batch 32, {args.trainer_steps} steps; shapes "
          "captions, max_length 70)")
    print(table(rows, ("ids", "mean width", "samples/s", "vs padded")))


if __name__ == "__main__":
    main()
