"""Compute spent on padding: forward+backward of the real phobert-large text tower
(random init from its published config; no download) on batches of realistic caption
lengths: padded to max_length (70), trimmed to each batch's longest caption (what
data.trim_padding does), packed end to end into rows of that width (data.pack_captions:
one forward, a block-diagonal attention mask), optionally grouped by length across
batches first (data.length_buckets), and - the yardstick - the same real tokens with no
padding at all (every caption of the batch at its mean length); the modes take turns on
the same batches. Then the tiny model end to end through Trainer.train_step on
shards made with max_length 70.

Caption lengths (PhoBERT tokens with <s> and </s>, after word segmentation): drawn
from a log-normal with median 22 and sigma 0.4, clipped to [6, 70] - mean ~24, a long
tail to 70, as Vietnamese image captions (10-25 words) give. The histogram is printed.

    python bench/bench_text_padding.py [--batch 64 256 512] [--steps 2] [--buckets 0]
        [--grad-checkpointing] [--modes padded trimmed packed flat] [--plan-only]
        [--sections text trainer]

Timed in this process's CPU time over its threads (wall time is printed too): on a
machine shared with other jobs that is the stable figure. Run it with
OMP_WAIT_POLICY=PASSIVE, so that a thread waiting for another does not spin.
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


MODES = {"padded": "padded to 70", "trimmed": "trimmed (data.trim_padding=8)",
         "packed": "packed into rows (data.pack_captions)",
         "bucketed": "bucketed x{n} + trimmed", "flat": "flat: the same tokens, every caption at the mean length"}


def text_modes(ids: torch.Tensor, lengths: np.ndarray, batch: int, steps: int, buckets: int,
               vocab: int) -> dict:
    """name -> [(ids, packing)] per step: the same captions in every mode but flat."""
    from phoclip.data.stream import group_by_length
    from phoclip.models.packing import pack_captions, trim_padding

    plain = [ids[i * batch:(i + 1) * batch] for i in range(steps)]
    trimmed = [trim_padding(x, 1, 8) for x in plain]
    modes = {MODES["padded"]: [(x, None) for x in plain],
             MODES["trimmed"]: [(x, None) for x in trimmed],
             MODES["packed"]: [(x, pack_captions(x, 1, "roberta")) for x in trimmed]}
    if buckets:
        grouped = []
        for blk in range(0, batch * steps * buckets, batch * buckets):
            chunk = ids[blk:blk + batch * buckets]
            for g in group_by_length(lengths[blk:blk + batch * buckets].tolist(), batch, random.Random(blk)):
                grouped.append(chunk[g])
        modes[MODES["bucketed"].format(n=buckets)] = [(trim_padding(x, 1, 8), None) for x in grouped[:steps]]
    g = torch.Generator().manual_seed(1)
    flat_len = [int(round(float((x != 1).sum(1).float().mean()))) for x in plain]
    # the yardstick: the batch's real tokens with no padding at all (every caption at
    # the batch's mean length, the width that length exactly)
    modes[MODES["flat"]] = [(make_ids([n] * batch, vocab, g)[:, :n], None) for n in flat_len]
    return modes


def token_rows(modes: dict, batch: int) -> list[list]:
    """Per mode: computed tokens per caption, real/computed tokens."""
    rows = []
    for name, xs in modes.items():
        real = sum(int((x != 1).sum()) for x, _ in xs)
        computed = sum(c.computed_tokens if c else x.numel() for x, c in xs)
        rows.append([name, f"{computed / len(xs) / batch:.1f}", f"{real / computed:.2f}"])
    return rows


def text_tower_rows(batch: int, steps: int, buckets: int, checkpointing: bool = False,
                    only: tuple = tuple(MODES), plan_only: bool = False) -> list[tuple]:
    import phoclip

    n = batch * steps * max(1, buckets)
    lengths = caption_lengths(n)
    print(f"caption lengths ({n} captions): mean {lengths.mean():.1f}, median {np.median(lengths):.0f}, "
          f"p95 {np.percentile(lengths, 95):.0f}, max {lengths.max()}\n  {histogram(lengths)}", flush=True)
    vocab = PHOBERT_LARGE["vocab_size"]
    modes = text_modes(make_ids(lengths, vocab, torch.Generator().manual_seed(0)), lengths, batch, steps,
                       buckets, vocab)
    keep = {MODES[k].format(n=buckets) for k in only}
    modes = {k: v for k, v in modes.items() if k in keep}
    if plan_only:
        return [tuple(r) for r in token_rows(modes, batch)]
    torch.manual_seed(0)
    model = phoclip.create_model("tiny-debug", text={"hf_config": dict(PHOBERT_LARGE)}, embed_dim=512)
    model.train()
    if checkpointing:
        model.set_grad_checkpointing(True)

    def step(x, packing):
        model.zero_grad(set_to_none=True)
        model.encode_text(x, packing=packing).sum().backward()

    step(next(iter(modes.values()))[0][0][:2], None)  # warm-up
    # CPU time of this process, not wall time: on a machine shared with other jobs the
    # wall time of one mode's step varied 3x between identical plans; the CPU time
    # (with OMP_WAIT_POLICY=PASSIVE, so a waiting thread does not spin) did not
    spent = {name: 0.0 for name in modes}
    wall = dict(spent)
    for i in range(steps):  # the modes take turns: a busy machine slows them alike
        for name, xs in modes.items():
            t, c = time.perf_counter(), time.process_time()
            step(*xs[i])
            spent[name] += time.process_time() - c
            wall[name] += time.perf_counter() - t
            print(f"  step {i} {name}: {spent[name]:.1f} CPU s, {wall[name]:.1f} s", flush=True)
    threads = torch.get_num_threads()
    rows, base, flat = token_rows(modes, batch), None, None
    for r, (name, xs) in zip(rows, modes.items()):
        real = sum(int((x != 1).sum()) for x, _ in xs)
        cpu_s = spent[name] / threads  # seconds of the cores the run had
        sps, tps = len(xs) * batch / cpu_s, real / cpu_s
        base = base or sps  # the first mode (padded, unless left out)
        if name.startswith("flat"):
            flat = tps
        r += [f"{sps:.2f}", f"{tps:.1f}", f"{len(xs) * batch / wall[name]:.2f}", f"{sps / base:.2f}x", tps]
    for r in rows:
        r[-1] = f"{r[-1] / flat:.2f}x" if flat else "-"
    return [tuple(r) for r in rows]


def trainer_rows(batch: int, steps: int, buckets: int) -> list[tuple]:
    from phoclip_train.config import resolve_config
    from phoclip_train.distributed import DistInfo
    from phoclip_train.run import build_run
    from phoclip_train.trainer import Trainer

    d = Path(tempfile.mkdtemp())
    try:
        shards, tok, _ = bench_shards(d, 400, None, 64, ["--max-length", str(MAX_LEN), "--shard-size", "100",
                                                         "--val-fraction", "0", "--image-size", "64"])
        rows, times = [], {}
        variants = [("padded to 70", 0, 0, False), ("trimmed", 8, 0, False), ("packed", 8, 0, True)]
        if buckets:
            variants.append((f"bucketed x{buckets} + trimmed", 8, buckets, False))
        for name, trim, nb, pack in variants:
            cfg = resolve_config(str(ROOT / "launch/configs/tiny-debug.yaml"), [
                f"run_dir={d}/run-{trim}-{nb}-{pack}", f"model.tokenizer={tok}", "train.precision=fp32",
                f"data.train_shards={shards}/train-{{000000..000003}}.tar", f"data.batch_size={batch}",
                "data.image_size=64", "train.log_every=1000", "train.sync_every=1000", "train.max_steps=100000",
                "train.save_every=100000", f"data.trim_padding={trim}", f"data.length_buckets={nb}",
                f"data.pack_captions={str(pack).lower()}"])
            tr = Trainer(build_run(cfg, DistInfo()))
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
    ap.add_argument("--batch", type=int, nargs="+", default=[64])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--buckets", type=int, default=0, help="also data.length_buckets=N (0: not run)")
    ap.add_argument("--grad-checkpointing", action="store_true",
                    help="recompute activations (batch 256+ padded to 70 needs it in 24 GiB)")
    ap.add_argument("--trainer-steps", type=int, default=40)
    ap.add_argument("--modes", nargs="+", default=[m for m in MODES if m != "bucketed"], choices=list(MODES),
                    help="text-tower modes to time (bucketed also needs --buckets)")
    ap.add_argument("--plan-only", action="store_true",
                    help="only the token counts of each mode (no timing: any batch size, in seconds)")
    ap.add_argument("--sections", nargs="+", default=["text", "trainer"], choices=["text", "trainer"])
    args = ap.parse_args()
    print(f"machine: {machine()}")
    only = tuple(args.modes) + (("bucketed",) if args.buckets and "bucketed" not in args.modes else ())
    head = ("ids", "computed tokens/caption", "real/computed")
    for b in args.batch if "text" in args.sections else []:
        rows = text_tower_rows(b, args.steps, args.buckets, args.grad_checkpointing, only, args.plan_only)
        if args.plan_only:
            print(f"\ntoken counts, batch {b}, {args.steps} batches")
            print(table(rows, head), flush=True)
            continue
        print(f"\nphobert-large text tower (355M, random init), forward+backward, batch {b}, "
              f"{args.steps} batches per mode{', grad checkpointing' if args.grad_checkpointing else ''}")
        print(table(rows, head + ("samples/s (CPU time)", "real tokens/s (CPU time)", "samples/s (wall)",
                                  f"vs {rows[0][0].split(' (')[0]}", "vs flat (real tokens/s)")), flush=True)
    if "trainer" in args.sections:
        rows = trainer_rows(32, args.trainer_steps, args.buckets)
        print(f"\ntiny model end to end (Trainer.train_step, fp32, batch 32, {args.trainer_steps} steps; shapes "
              "captions, max_length 70)")
        print(table(rows, ("ids", "mean width", "samples/s", "vs padded")))


if __name__ == "__main__":
    main()
