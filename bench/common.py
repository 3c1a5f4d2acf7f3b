"""Shared helpers for the benchmarks: timing and the machine line for RESULTS.md."""
from __future__ import annotations

import os
import platform
import resource
import time
from typing import Callable

# phobert-large's shape (its published config.json), so no hub access is needed (random weights)
PHOBERT_LARGE = dict(model_type="roberta", vocab_size=64001, hidden_size=1024, num_hidden_layers=24,
                     num_attention_heads=16, intermediate_size=4096, max_position_embeddings=258,
                     pad_token_id=1, type_vocab_size=1, layer_norm_eps=1e-5)


def best_of(fn: Callable[[], object], repeat: int = 3) -> float:
    """Best wall time of `repeat` calls (seconds)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    import torch

    return (f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}")


def table(rows: list[tuple], header: tuple) -> str:
    w = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w[i]) for i, c in enumerate(r))
    return "\n".join([line(header), line(tuple("-" * x for x in w))] + [line(r) for r in rows])


def shapes_photos(work, n_images: int, photo_size=None, image_px: int = 96):
    """The built-in shapes dataset (Flickr8k-vi format) under work/data, its pictures
    re-saved as JPEGs of `photo_size` (w, h) when given, so decoding costs what photos
    cost. Returns (captions file, image folder, caption texts)."""
    from pathlib import Path

    from PIL import Image

    from phoclip.data.synthetic import make_dataset

    work = Path(work)
    caps = make_dataset(work / "data", n_images=n_images, size=image_px)
    images = work / "data" / "images"
    if photo_size:
        for f in images.iterdir():
            Image.open(f).resize(photo_size).save(f, quality=92)
    texts = [l.split("\t", 1)[1] for l in caps.read_text(encoding="utf-8").splitlines()]
    return caps, images, texts


def bench_shards(work, n_images: int, photo_size=None, image_px: int = 96, shard_args=()):
    """`shapes_photos`, a PhoBERT-format tokenizer over its captions, and shards of them in
    work/sh made by make_shards.py (`shard_args` added). Returns (shard folder,
    tokenizer folder, seconds make_shards.py took)."""
    from pathlib import Path

    from phoclip.data.text import build_phobert_tokenizer
    from phoclip_cli.shards import main as make_shards

    work = Path(work)
    caps, images, texts = shapes_photos(work, n_images, photo_size, image_px)
    tok = build_phobert_tokenizer(texts, work / "tok")
    t = time.perf_counter()
    rc = make_shards(["--source", f"flickr8k-vi:{caps}:{images}", "--out", str(work / "sh"),
                      "--tokenizer", str(tok), "--segmenter", "none", *shard_args])
    if rc:
        raise RuntimeError(f"make_shards.py exited with {rc}")
    return work / "sh", tok, time.perf_counter() - t
