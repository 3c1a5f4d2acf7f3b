"""Sharding throughput: make_shards.py against a bare decode → resize → encode loop over
the same images, with 1 and 2 workers; segmentation captions/s per backend;
tokenization captions/s.

    python bench/bench_sharding.py [--images 400]
"""
from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, shapes_photos, table  # noqa: E402


def bare_one(path: str) -> int:
    """The floor: read, decode, resize shorter side to 256, encode JPEG."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = 256 / min(w, h)
    im = im.resize((round(w * s), round(h * s)), Image.BICUBIC, reducing_gap=3.0)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return len(buf.getvalue())


def bare(paths: list[str], workers: int) -> float:
    t = time.perf_counter()
    if workers == 1:
        for p in paths:
            bare_one(p)
    else:
        with mp.get_context("spawn").Pool(workers) as pool:
            list(pool.imap_unordered(bare_one, paths, chunksize=16))
    return len(paths) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1000)
    args = ap.parse_args()
    from phoclip.text import (NoSegmenter, PyviSegmenter, UndertheseaSegmenter, build_phobert_tokenizer,
                              load_tokenizer, tokenize_captions)
    from phoclip_sharding.make_shards import main as make_shards

    d = Path(tempfile.mkdtemp())
    try:
        # photo-sized inputs (640x480 JPEG), like the public datasets
        caps, images, texts = shapes_photos(d, args.images, (640, 480))
        paths = sorted(str(p) for p in images.iterdir())
        seg = UndertheseaSegmenter()
        tok_dir = build_phobert_tokenizer(seg.segment(texts), d / "tok")
        rows = []
        res = {}
        for w in (1, 2):
            b = bare(paths, w)
            out = d / f"shards{w}"
            t = time.perf_counter()
            make_shards(["--source", f"flickr8k-vi:{caps}:{images}", "--out", str(out),
                         "--tokenizer", str(tok_dir), "--segmenter", "none", "--workers", str(w),
                         "--shard-size", "100", "--val-fraction", "0"])
            ours = args.images / (time.perf_counter() - t)
            res[w] = (ours, b)
            rows.append((f"{w} worker(s)", f"{ours:.0f}", f"{b:.0f}", f"{ours / b:.2f}x"))
        print(f"\nsharding: {args.images} JPEGs 640x480 → shorter side 256; {machine()}")
        print(table(rows, ("workers", "make_shards img/s", "bare loop img/s", "ours/bare")))
        print(f"scaling 1→2 workers: ours {res[2][0] / res[1][0]:.2f}x, bare {res[2][1] / res[1][1]:.2f}x")

        many = (texts * (6000 // len(texts) + 1))[:6000]
        srows = []
        for s in (UndertheseaSegmenter(), PyviSegmenter(), NoSegmenter()):
            t = time.perf_counter()
            s.segment(many)
            srows.append((s.name, f"{len(many) / (time.perf_counter() - t):.0f}"))
        tok = load_tokenizer(str(tok_dir))
        segd = seg.segment(many)
        t = time.perf_counter()
        tokenize_captions(tok, segd, 70)
        srows.append(("PhobertTokenizer (tokenize)", f"{len(many) / (time.perf_counter() - t):.0f}"))
        print(f"\ntext: {len(many)} captions, one process")
        print(table(srows, ("stage", "captions/s")))
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
