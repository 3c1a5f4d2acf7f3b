"""Index build and search at scale: a synthetic collection that looks like CLIP embeddings
(a shared direction all vectors lean towards, clusters, noise; 512-d, L2-normalised,
float16 parts of 1M rows in clip-retrieval's layout), indexed by `phoclip-index
--embeddings` under a memory budget, against exact search on 1,000 held-out queries drawn
from the same generator: build time, peak RSS, recall@10, latency per query in process,
the time to add 10% more; and a plain faiss script of the same index side by side.

    python bench/bench_index.py --n 1000000 --work /tmp/bench_index
    python bench/bench_index.py --n 10000000 --work /tmp/bench_index   # hours on 2 cores
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def generate(n: int, d: int, seed: int, clusters: int = 1000, chunk: int = 200_000):
    """Blocks of float16 unit vectors: 0.5 x a shared direction + a cluster centre + noise."""
    rng = np.random.default_rng(0)
    shared = rng.standard_normal(d)
    shared /= np.linalg.norm(shared)
    centres = rng.standard_normal((clusters, d)) / np.sqrt(d)
    rng = np.random.default_rng(seed)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        x = 0.5 * shared + centres[rng.integers(0, clusters, m)] + 0.6 * rng.standard_normal((m, d)) / np.sqrt(d)
        yield (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def write_parts(folder: Path, n: int, d: int, seed: int, part_rows: int = 1_000_000) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for sub in ("img_emb", "metadata"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rows, j, buf = 0, 0, []
    for x in generate(n, d, seed):
        buf.append(x)
        rows += len(x)
        if sum(len(b) for b in buf) >= part_rows or rows == n:
            a = np.concatenate(buf)
            np.save(folder / "img_emb" / f"img_emb_{j:04d}.npy", a)
            start = rows - len(a)
            pq.write_table(pa.table({"image_path": [f"img/{i}.jpg" for i in range(start, rows)]}),
                           folder / "metadata" / f"metadata_{j:04d}.parquet")
            buf, j = [], j + 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--work", default="/tmp/bench_index")
    p.add_argument("--model", required=True, help="a model folder as wide as --d (its fingerprint names the index)")
    p.add_argument("--max-index-memory", default="4G")
    p.add_argument("--queries", type=int, default=1000)
    args = p.parse_args()
    work = Path(args.work)
    src, add_src, out = work / "emb", work / "emb_add", work / "index"
    if not (src / "img_emb").is_dir():
        write_parts(src, args.n, args.d, seed=1)
        write_parts(add_src, args.n // 10, args.d, seed=3)
    q = next(generate(args.queries, args.d, seed=2)).astype(np.float32)
    cmd = [sys.executable, "launch/build_index.py", "--model", args.model, "--embeddings", str(src), "--out", str(out),
           "--max-index-memory", args.max_index_memory, "--device", "cpu"]
    res = {"n": args.n, "d": args.d}
    for what, c in (("build", cmd), ("add", [x if x != str(src) else str(add_src) for x in cmd] + ["--add"])):
        t = time.monotonic()
        r = subprocess.run(["/usr/bin/time", "-f", "%M", *c], capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr[-3000:])
        res[f"{what}_s"] = round(time.monotonic() - t, 1)
        res[f"{what}_peak_rss_gib"] = round(int(r.stderr.strip().splitlines()[-1]) / 2**20, 2)
        print(r.stdout.strip().splitlines()[-1])
    from phoclip.search.index import EmbeddingIndex

    t = time.monotonic()
    ix = EmbeddingIndex(out)
    res["open_s"] = round(time.monotonic() - t, 2)
    res["search"] = ix.search_info()
    _, exact = ix.topk(q, 10, backend="exact")
    lat = []
    got = []
    for row in q:
        t = time.perf_counter()
        got.append(ix.topk(row[None], 10)[1][0].numpy())
        lat.append((time.perf_counter() - t) * 1000)
    res["recall_at_10"] = float(np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(got, exact.numpy())]))
    res["p50_ms"], res["p99_ms"] = float(np.percentile(lat, 50)), float(np.percentile(lat, 99))
    res["bench_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    res["plain_faiss"] = plain_faiss(src, add_src, res["search"], q, exact.numpy())
    print(json.dumps(res, indent=2))


def plain_faiss(src: Path, add_src: Path, info: dict, q: np.ndarray, exact: np.ndarray) -> dict:
    """The same index key and nprobe with faiss alone (everything in memory): the reference."""
    import faiss

    if info.get("type") != "faiss":
        return {}
    files = sorted((src / "img_emb").glob("*.npy")) + sorted((add_src / "img_emb").glob("*.npy"))
    t = time.monotonic()
    x0 = np.load(files[0], mmap_mode="r")
    index = faiss.index_factory(x0.shape[1], info["key"], faiss.METRIC_INNER_PRODUCT)
    n_train = min(len(x0), info["nlist"] * 64)
    index.train(np.asarray(x0[:n_train], dtype=np.float32))
    for f in files:
        a = np.load(f, mmap_mode="r")
        for s in range(0, len(a), 100_000):
            index.add(np.asarray(a[s:s + 100_000], dtype=np.float32))
    build = time.monotonic() - t
    faiss.extract_index_ivf(index).nprobe = info["nprobe"]
    lat, got = [], []
    for row in q:
        t = time.perf_counter()
        got.append(index.search(row[None], 10)[1][0])
        lat.append((time.perf_counter() - t) * 1000)
    return {"build_s": round(build, 1), "p50_ms": float(np.percentile(lat, 50)),
            "recall_at_10": float(np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(got, exact)]))}


if __name__ == "__main__":
    main()
