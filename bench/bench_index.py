"""Index build and search at scale: a synthetic collection that looks like CLIP embeddings
(a shared direction all vectors lean towards, clusters, noise; 512-d, L2-normalised,
float16 parts of 1M rows in clip-retrieval's layout), indexed by `phoclip-index
--embeddings` under a memory budget, against exact search on 1,000 held-out queries drawn
from the same generator: build time, peak RSS, recall@10, latency per query in process,
the time to add 10% more; side by side, a plain faiss script of the same index (trained
and filled in memory) and exact search (ours over the parts, faiss IndexFlatIP in memory).
Without --model a random tiny model as wide as --d is written under --work: the vectors are
given, the model only names the index and answers text queries.

`--crossover` measures instead exact search's latency per query (one query, k=10, the
in-memory matrix the exact index searches) against the number of rows: where it passes the
latency target is where the approximate index starts (phoclip.search.ann.EXACT_ROW_DIMS_PER_MS).

    python bench/bench_index.py --n 1000000 --work /tmp/bench_index
    python bench/bench_index.py --n 10000000 --work /tmp/w10m --no-reference   # ~45 min on 2 cores
    python bench/bench_index.py --n 10000000 --work /tmp/w10m --plain-only     # the plain faiss script after it
    python bench/bench_index.py --crossover --d 512
    python bench/bench_index.py --n 1000000 --work /tmp/w1m --no-add --no-reference   # an index for bench_serve

The work folder is kept: parts (emb/), index (index/), model (model/) and the exact top-10 row
ids of the held-out queries (exact_top10.npy, the ground truth bench_serve.py --truth reads).
"""
from __future__ import annotations

import argparse
import json
import os
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


def make_model(folder: Path, d: int) -> Path:
    """A random tiny-debug model whose embeddings are d wide (with its tokenizer), once."""
    if (folder / "phoclip_config.json").is_file():  # phoclip.models.pretrained's config file
        return folder
    import phoclip
    from phoclip.data.text import build_phobert_tokenizer, load_tokenizer
    from phoclip.models.pretrained import save_pretrained

    tok = load_tokenizer(str(build_phobert_tokenizer(["một con mèo trên bãi cỏ xanh"], folder.parent / "tok")))
    model = phoclip.create_model("tiny-debug", embed_dim=d, text={"hf_config": {"vocab_size": len(tok)}})
    model.config["text"].update(segmenter="none")  # the service refuses a model that does not say how to segment
    save_pretrained(model, folder, tokenizer=tok)
    return folder


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: the machine is shared, figures move with them."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def latencies(fn, queries: np.ndarray) -> tuple[list, list]:
    """Milliseconds per single-query call of fn(row[None]) and its answers."""
    lat, got = [], []
    for row in queries:
        t = time.perf_counter()
        got.append(fn(row[None]))
        lat.append((time.perf_counter() - t) * 1000)
    return lat, got


def pcts(lat: list) -> dict:
    return {"p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2)}


def recall_at_10(got, exact: np.ndarray) -> float:
    return round(float(np.mean([len(set(np.asarray(a).tolist()) & set(b.tolist())) / 10 for a, b in zip(got, exact)])), 4)


def crossover(d: int, sizes: list[int], queries: int = 200) -> list[dict]:
    """Exact search's latency per query (k=10) over n in-memory rows, as the exact index
    answers (phoclip.search.exact.exact_topk), and faiss IndexFlatIP's, for each n."""
    import faiss
    import torch

    from phoclip.search.exact import exact_topk

    x = np.concatenate(list(generate(max(sizes), d, seed=1))).astype(np.float32)
    q = next(generate(queries, d, seed=2)).astype(np.float32)
    rows = []
    for n in sizes:
        xt = torch.from_numpy(x[:n])
        lat, _ = latencies(lambda r: exact_topk(torch.from_numpy(r), xt, 10), q)
        flat = faiss.IndexFlatIP(d)
        flat.add(x[:n])
        flat_lat, _ = latencies(lambda r: flat.search(r, 10), q)
        rows.append({"n": n, "ours": pcts(lat), "faiss_flat": pcts(flat_lat),
                     "row_dims_per_ms": round(n * d / float(np.percentile(lat, 50))), "load": load_average()})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--work", default="/tmp/bench_index")
    p.add_argument("--model", help="a model folder as wide as --d (default: a random tiny one under --work)")
    p.add_argument("--max-index-memory", default="4G")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--no-add", action="store_true", help="skip adding 10%% more (the index keeps --n rows)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip exact search one query at a time and the plain faiss script beside ours")
    p.add_argument("--memory-limit", help="run the build and the add in a memory cgroup of this size (e.g. 8G; "
                   "root, cgroup v1 or v2): page cache past it is reclaimed, memory the process owns is not")
    p.add_argument("--plain-only", action="store_true",
                   help="only the plain faiss script, against the index and exact_top10.npy a run left in --work")
    p.add_argument("--crossover", action="store_true", help="exact search's latency against the number of rows")
    p.add_argument("--sizes", default="10000,30000,100000,200000,300000,500000,1000000",
                   help="with --crossover: the numbers of rows")
    args = p.parse_args()
    if args.crossover:
        crossover(args.d, [int(x) for x in args.sizes.split(",")])
        return
    work = Path(args.work)
    args.model = args.model or str(make_model(work / "model", args.d))
    src, add_src, out = work / "emb", work / "emb_add", work / "index"
    if not (src / "img_emb").is_dir():
        write_parts(src, args.n, args.d, seed=1)
    if not args.no_add and not (add_src / "img_emb").is_dir():
        write_parts(add_src, args.n // 10, args.d, seed=3)
    q = next(generate(args.queries, args.d, seed=2)).astype(np.float32)
    if args.plain_only:  # the reference beside a run that skipped it (--no-reference), same data and queries
        from phoclip.search.index import EmbeddingIndex

        if not (work / "exact_top10.npy").is_file() or not (out / "index.json").is_file():
            sys.exit(f"--plain-only: no index and exact_top10.npy in {work}; run this command without --plain-only first")
        info = EmbeddingIndex(out).search_info()
        exact = np.load(work / "exact_top10.npy", allow_pickle=False)
        adds = add_src if (add_src / "img_emb").is_dir() and EmbeddingIndex(out).count("images") > args.n else None
        res = {"n": args.n, "d": args.d, "key": info.get("key"), "nprobe": info.get("nprobe"),
               "load_at_start": load_average()}
        res["plain_faiss"] = plain_faiss(src, adds, info, q, exact)
        res["bench_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        res["load_at_end"] = load_average()
        print(json.dumps(res, indent=2))
        return
    cmd = [sys.executable, "launch/build_index.py", "--model", args.model, "--embeddings", str(src), "--out", str(out),
           "--max-index-memory", args.max_index_memory, "--device", "cpu"]
    res = {"n": args.n, "d": args.d, "load_at_start": load_average()}
    steps = [("build", cmd)] + ([] if args.no_add else [("add", [x if x != str(src) else str(add_src) for x in cmd] + ["--add"])])
    for what, c in steps:
        t = time.monotonic()
        r, mem = run_measured(c, work / f"rss_{what}.tsv", args.memory_limit)
        if r.returncode:
            sys.exit(f"{what} failed (exit {r.returncode}; {mem}):\n{r.stderr[-3000:]}")
        res[f"{what}_s"] = round(time.monotonic() - t, 1)
        res[f"{what}_memory"] = mem
        done = json.loads((out / "index.json").read_text())["search"].get("images", {})
        res[f"{what}_phases_s"] = {k: done[k] for k in ("train_s", "add_s", "merge_s", "tune_s") if k in done}
        print(r.stdout.strip().splitlines()[-1])
    from phoclip.search.index import EmbeddingIndex

    t = time.monotonic()
    ix = EmbeddingIndex(out)
    res["open_s"] = round(time.monotonic() - t, 2)
    res["search"] = ix.search_info()
    t = time.monotonic()
    exact = ground_truth([src] + ([] if args.no_add else [add_src]), q, args.d)
    res["exact_truth_s"] = round(time.monotonic() - t, 1)
    np.save(work / "exact_top10.npy", exact)
    lat, got = latencies(lambda r: ix.topk(r, 10)[1][0].numpy(), q)
    res.update(pcts(lat), recall_at_10=recall_at_10(got, exact))
    if not args.no_reference:
        # exact search one query at a time, ours (streamed from the parts past RAM_EXACT_BYTES): a sample
        lat, got = latencies(lambda r: ix.topk(r, 10, backend="exact")[1][0].numpy(), q[:50])
        res["exact_ours"] = dict(pcts(lat), recall_at_10=recall_at_10(got, exact[:50]), queries=50)
    res["bench_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    if not args.no_reference:
        res["plain_faiss"] = plain_faiss(src, add_src if not args.no_add else None, res["search"], q, exact)
    res["load_at_end"] = load_average()
    print(json.dumps(res, indent=2))


def _status(pid: int) -> dict:
    """VmRSS, RssAnon, RssFile and RssShmem of a process, in KiB ({} once it has gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in fh)
                    if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem")}
    except (OSError, ValueError):
        return {}


def _cgroup(limit: str) -> tuple[Path, str]:
    """A fresh memory cgroup limited to `limit` bytes: (its folder, the usage file's name)."""
    from phoclip.search.ann import parse_bytes

    name, n = f"phoclip_bench_{os.getpid()}", parse_bytes(limit)
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    if v2.is_file():
        d = Path("/sys/fs/cgroup") / name
        d.mkdir(exist_ok=True)
        (d / "memory.max").write_text(str(n))
        return d, "memory.peak"
    d = Path("/sys/fs/cgroup/memory") / name
    d.mkdir(exist_ok=True)
    (d / "memory.limit_in_bytes").write_text(str(n))
    return d, "memory.max_usage_in_bytes"


def run_measured(cmd: list[str], series: Path, limit: str | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """Run `cmd`, sampling its memory every 0.5 s (written to `series`: seconds, VmRSS, RssAnon,
    RssFile in MiB): the peaks of resident memory, of the memory it owns (anonymous) and of
    file pages it maps (the memory-mapped parts and index files: page cache, given back
    under pressure), optionally inside a memory cgroup of `limit`."""
    import threading

    try:
        cg = _cgroup(limit) if limit else None
    except OSError as e:
        sys.exit(f"--memory-limit {limit}: cannot make a memory cgroup ({e}); it needs root and cgroup v1 or v2")
    pre = (lambda: (cg[0] / "cgroup.procs").write_text(str(os.getpid()))) if cg else None
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=pre)
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    rows = []

    def sample():
        while proc.poll() is None:
            st = _status(proc.pid)
            if st:
                for k in peak:
                    peak[k] = max(peak[k], st.get(k, 0))
                rows.append(f"{time.monotonic() - t0:.1f}\t" + "\t".join(str(st.get(k, 0) >> 10) for k in peak))
            time.sleep(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    th.join()
    series.write_text("s\tVmRSS_MiB\tRssAnon_MiB\tRssFile_MiB\n" + "\n".join(rows) + "\n")
    mem = {"peak_rss_gib": round(peak["VmRSS"] / 2**20, 2), "peak_anon_gib": round(peak["RssAnon"] / 2**20, 2),
           "peak_file_gib": round(peak["RssFile"] / 2**20, 2)}
    if cg:
        d, usage = cg
        mem.update(cgroup_limit=limit, cgroup_peak_gib=round(int((d / usage).read_text()) / 2**30, 2))
        fail = d / "memory.failcnt"
        if fail.is_file():
            mem["cgroup_failcnt"] = int(fail.read_text())
        for _ in range(50):  # busy for a moment after its last task exits
            try:
                d.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), mem


def ground_truth(folders: list[Path], q: np.ndarray, d: int) -> np.ndarray:
    """The exact top-10 row ids of `q` over the parts of `folders` in the index's order
    (phoclip.search.ann.exact_topk: faiss's brute force a chunk at a time)."""
    from phoclip.search.ann import exact_topk
    from phoclip.search.parts import open_embeddings

    arrays, start = [], 0
    for folder in folders:
        for f in sorted((folder / "img_emb").glob("*.npy")):
            a = open_embeddings(f, d, None, f.name)
            arrays.append((start, a))
            start += len(a)
    return exact_topk(arrays, q, 10)[1]


def plain_faiss(src: Path, add_src: Path | None, info: dict, q: np.ndarray, exact: np.ndarray) -> dict:
    """The same index key and nprobe with faiss alone (everything in memory): the reference."""
    import faiss

    if info.get("type") != "faiss":
        return {}
    files = sorted((src / "img_emb").glob("*.npy")) + (sorted((add_src / "img_emb").glob("*.npy")) if add_src else [])
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
    lat, got = latencies(lambda r: index.search(r, 10)[1][0], q)
    res = {"build_s": round(build, 1), **pcts(lat), "recall_at_10": recall_at_10(got, exact)}
    index = None  # its memory back before the flat index
    # exact search in memory: faiss IndexFlatIP over every vector, where its float32 matrix fits half the RAM
    rows = sum(np.load(f, mmap_mode="r").shape[0] for f in files)
    if rows * x0.shape[1] * 4 > os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2:
        res["exact_faiss_flat"] = f"skipped: {rows:,} x {x0.shape[1]} float32 is over half this machine's memory"
        return res
    flat = faiss.IndexFlatIP(x0.shape[1])
    for f in files:
        a = np.load(f, mmap_mode="r")
        for s in range(0, len(a), 100_000):
            flat.add(np.asarray(a[s:s + 100_000], dtype=np.float32))
    lat, got = latencies(lambda r: flat.search(r, 10)[1][0], q[:200])
    res["exact_faiss_flat"] = dict(pcts(lat), recall_at_10=recall_at_10(got, exact[:200]), queries=200)
    return res


if __name__ == "__main__":
    main()
