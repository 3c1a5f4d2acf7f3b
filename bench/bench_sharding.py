"""Sharding throughput: make_shards.py against a bare decode → resize → encode loop over
the same images, with 1 and 2 workers; segmentation captions/s per backend;
tokenization captions/s; captions/s of the whole text stage inside make_shards with 1
and 2 workers; and the peak RSS of make_shards (one process) at 10k and 100k images.

    python bench/bench_sharding.py [--images 1000] [--rss-images 10000 100000]
        [--sections images text workers rss]
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


def peak_rss_of(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of a command run as a child process."""
    import os
    import subprocess

    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    if status:
        raise RuntimeError(f"{cmd[:4]} failed with status {status}")
    return ru.ru_maxrss / 1024, time.perf_counter() - t


def rss_rows(d: Path, counts: list[int]) -> list[tuple]:
    """make_shards on N tiny generated images (--workers 1: everything in one process)."""
    from phoclip.data.synthetic import make_dataset
    from phoclip.data.text import build_phobert_tokenizer

    rows, base = [], None
    for n in counts:
        work = d / f"rss{n}"
        caps = make_dataset(work / "data", n_images=n, size=48)
        tok = build_phobert_tokenizer([l.split("\t", 1)[1] for l in caps.read_text(encoding="utf-8").splitlines()],
                                      work / "tok")
        mb, dt = peak_rss_of([sys.executable, str(Path(__file__).resolve().parents[1] / "sharding/make_shards.py"),
                              "--source", f"flickr8k-vi:{caps}:{work / 'data' / 'images'}", "--out", str(work / "sh"),
                              "--tokenizer", str(tok), "--segmenter", "none", "--workers", "1",
                              "--image-size", "48", "--shard-size", "1000"])
        base = base or mb
        rows.append((f"{n}", f"{mb:.0f}", f"{mb / base:.2f}x", f"{n / dt:.0f}"))
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--rss-images", type=int, nargs="*", default=[10000, 100000])
    ap.add_argument("--text-images", type=int, default=8000,
                    help="small images (3 captions each) of the text-in-workers run: long enough that "
                         "a spawned worker's start (imports, segmenter, tokenizer: ~3 s) is amortised")
    ap.add_argument("--sections", nargs="*", default=["images", "text", "workers", "rss"],
                    choices=["images", "text", "workers", "rss"])
    args = ap.parse_args()
    from phoclip.data.text import (NoSegmenter, PyviSegmenter, UndertheseaSegmenter, build_phobert_tokenizer,
                              load_tokenizer, tokenize_captions)
    from phoclip_cli.shards import main as make_shards

    d = Path(tempfile.mkdtemp())
    try:
        # photo-sized inputs (640x480 JPEG), like the public datasets
        caps, images, texts = shapes_photos(d, args.images, (640, 480))
        paths = sorted(str(p) for p in images.iterdir())
        seg = UndertheseaSegmenter()
        tok_dir = build_phobert_tokenizer(seg.segment(texts), d / "tok")
        rows = []
        res = {}
        for w in ((1, 2) if "images" in args.sections else ()):
            b = bare(paths, w)
            out = d / f"shards{w}"
            t = time.perf_counter()
            make_shards(["--source", f"flickr8k-vi:{caps}:{images}", "--out", str(out),
                         "--tokenizer", str(tok_dir), "--segmenter", "none", "--workers", str(w),
                         "--shard-size", "100", "--val-fraction", "0"])
            ours = args.images / (time.perf_counter() - t)
            res[w] = (ours, b)
            rows.append((f"{w} worker(s)", f"{ours:.0f}", f"{b:.0f}", f"{ours / b:.2f}x"))
        if rows:
            print(f"\nsharding: {args.images} JPEGs 640x480 → shorter side 256; {machine()}")
            print(table(rows, ("workers", "make_shards img/s", "bare loop img/s", "ours/bare")))
            print(f"scaling 1→2 workers: ours {res[2][0] / res[1][0]:.2f}x, bare {res[2][1] / res[1][1]:.2f}x")

        if "text" in args.sections:
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

        if "workers" in args.sections:
            # the text stage inside make_shards (it runs in the shard workers): 48 px images,
            # so segmentation dominates; captions/s over the whole run
            small = d / "small"
            caps_s = __import__("phoclip.data.synthetic", fromlist=["make_dataset"]).make_dataset(
                small / "data", n_images=args.text_images, size=48)
            n_caps = len(caps_s.read_text(encoding="utf-8").splitlines())
            trows = []
            for w in (1, 2):
                t = time.perf_counter()
                make_shards(["--source", f"flickr8k-vi:{caps_s}:{small / 'data' / 'images'}", "--out", str(small / f"o{w}"),
                             "--tokenizer", str(tok_dir), "--segmenter", "underthesea", "--workers", str(w),
                             "--image-size", "48", "--shard-size", "100", "--val-fraction", "0"])
                trows.append((f"{w}", f"{n_caps / (time.perf_counter() - t):.0f}"))
            print(f"\nmake_shards with underthesea, {n_caps} captions of {args.text_images} small images")
            print(table(trows, ("workers", "captions/s (whole job)")))

        if args.rss_images and "rss" in args.sections:
            print("\npeak RSS of make_shards (--workers 1, one process; tiny images, no segmenter)")
            print(table(rss_rows(d, args.rss_images), ("images", "peak RSS MB", "vs first", "img/s")))
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
