"""Loader throughput on the same shards: our training stream (decode + transform +
caption choice + batching, seeded and resumable) vs a bare JPEG-decode loop, and vs a
plain webdataset pipeline doing the same work. One process, no DataLoader workers, so
the numbers are per CPU core.

    python bench/bench_loader.py [--images 1200] [--samples 1024] [--size 224]
"""
from __future__ import annotations

import argparse
import io
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_shards, machine, peak_rss_mb, table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    import webdataset as wds

    from phoclip.data.stream import ShardStream, StreamConfig
    from phoclip.data.transforms import image_to_tensor

    d = Path(tempfile.mkdtemp())
    try:
        bench_shards(d, args.images, (320, 256), shard_args=["--workers", "2", "--shard-size", "200",
                                                             "--val-fraction", "0", "--image-size", "256"])
        urls = sorted(str(p) for p in (d / "sh").glob("train-*.tar"))
        bs, n = 64, args.samples

        def ours(resize_on="worker", keep=None):
            s = ShardStream(StreamConfig(urls=urls, weights=[1.0] * len(urls), batch_size=bs, image_size=args.size,
                                         seed=0, rank=0, world_size=1, resampled=False, shuffle_buffer=256,
                                         resize_on=resize_on))
            it = iter(s)
            for _ in range(n // bs):
                b = next(it)
                if keep is not None:
                    keep.append(b)

        def bare():
            k = 0
            for s in wds.WebDataset(urls, shardshuffle=False):
                Image.open(io.BytesIO(s["jpg"])).convert("RGB").load()
                k += 1
                if k == n:
                    break

        def plain_wds(normalize: bool):
            rng = random.Random(0)

            def prep(s):
                ids = np.load(io.BytesIO(s["ids.npy"]), allow_pickle=False)
                img = Image.open(io.BytesIO(s["jpg"])).convert("RGB")
                return (image_to_tensor(img, args.size, True, rng, normalize=normalize),
                        torch.from_numpy(ids[rng.randrange(len(ids))].astype(np.int64)))
            ds = wds.WebDataset(urls, shardshuffle=False).shuffle(256).map(prep).batched(bs)
            it = iter(ds)
            for _ in range(n // bs):
                next(it)

        rows = []
        times = {}
        # ours ships uint8 pixels (normalised on the GPU by the trainer); the float row
        # is the same pipeline normalising on the CPU, as ours did before
        for name, fn in (("bare JPEG decode", bare),
                         ("plain webdataset, float normalised on CPU", lambda: plain_wds(True)),
                         ("plain webdataset, same work", lambda: plain_wds(False)),
                         ("ours (ShardStream, uint8)", ours),
                         ("ours, data.resize_on=device (workers decode only)", lambda: ours("device"))):
            fn()  # warm the page cache
            t = time.perf_counter()
            fn()
            times[name] = n / (time.perf_counter() - t)
        for name, sps in times.items():
            rows.append((name, f"{sps:.0f}", f"{sps / times['bare JPEG decode']:.2f}x",
                         f"{sps / times['plain webdataset, same work']:.2f}x"))
        print(f"\nloader: {n} samples, 320x256 JPEGs → {args.size} crops, batch {bs}, 1 core; {machine()}")
        print(table(rows, ("pipeline", "samples/s", "vs bare decode", "vs plain wds")))
        print(f"peak RSS of this process: {peak_rss_mb():.0f} MB")
        from phoclip.data.transforms import resize_on_device

        # the work resize_on=device moves to the training device, timed here on one CPU
        # core (on a GPU it is bench/gpu_check.py's business)
        kept: list = []
        ours("device", kept)
        torch.set_num_threads(1)
        t = time.perf_counter()
        for b in kept:
            resize_on_device(b["images"], b["boxes"], args.size)
        per = (time.perf_counter() - t) / (len(kept) * bs)
        ratio = times['ours, data.resize_on=device (workers decode only)'] / times['ours (ShardStream, uint8)']
        print(f"ours-worker / ours-device: {ratio:.2f}x "
              f"samples/s per worker core; the moved resize costs {per * 1e3:.2f} ms/sample on one CPU core")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
