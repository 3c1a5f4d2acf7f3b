"""The search service under load, as clip-retrieval's clients use it: latency of
POST /knn-service with `embedding_input` (k=10, metadata of the 10 results included),
one client and four at once, over HTTP on 127.0.0.1; the service's start-up, the time to
open the index, and the service's memory (RSS) beside a process holding only the model;
in process, what reading 10 results' items costs (one thread and four at once), and
whether they come from the parts' memory-mapped Arrow copies or their parquet.

    python bench/bench_serve.py [--n 200000] [--queries 1000]          # builds its own index
    python bench/bench_serve.py --index IDX [--queries 1000]           # an index built elsewhere
                                                                       # (bench/bench_index.py's)
    python bench/bench_serve.py --index W/index --truth W/exact_top10.npy   # + recall@10 vs exact

With `--truth` (bench_index.py's exact_top10.npy: the exact top-10 row ids of the same
held-out queries) the recall@10 of the service's answers is printed beside the index's own,
one query at a time in process (EmbeddingIndex.topk).

The index it builds holds `--n` 512-d vectors that look like CLIP embeddings (the
generator of bench/bench_index.py when that file exists, else the same recipe here: a
shared direction, clusters, noise), one part, exact search, and a tiny-debug model of
that width (random weights: the serving path is measured, not the model). The queries
are held-out vectors of the same generator.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import requests
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, table  # noqa: E402


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def clip_like(n: int, dim: int, seed: int, clusters: int = 1000) -> np.ndarray:
    """Unit vectors that look like CLIP embeddings (bench/bench_index.py's generator when
    it exists): a direction every vector shares (CLIP's cone: mean cosine ~0.2-0.3), a
    cluster centre per vector (topics), and noise."""
    f = ROOT / "bench" / "bench_index.py"
    if f.is_file():
        spec = importlib.util.spec_from_file_location("bench_index_gen", f)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        if callable(getattr(mod, "generate", None)):  # blocks of float16 unit vectors
            return np.concatenate([np.asarray(b, dtype=np.float32) for b in mod.generate(n, dim, seed)])
    rng = np.random.default_rng(1234)  # shared by every call: the same space for queries and index
    shared = rng.standard_normal(dim)
    centres = rng.standard_normal((clusters, dim))
    rng = np.random.default_rng(seed)
    x = 0.5 * shared / np.linalg.norm(shared) * np.sqrt(dim) + centres[rng.integers(0, clusters, n)] \
        + 0.8 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def build(work: Path, n: int, dim: int) -> Path:
    """A tiny-debug model of width `dim` and an index of `n` generated vectors."""
    import phoclip
    from phoclip.data.text import UndertheseaSegmenter, build_phobert_tokenizer, load_tokenizer
    from phoclip.search.index import write_index

    tok_dir = build_phobert_tokenizer(UndertheseaSegmenter().segment(["một con chó", "xe hơi màu đỏ"]), work / "tok")
    torch.manual_seed(0)
    vocab = len(load_tokenizer(str(tok_dir)))
    model = phoclip.create_model("tiny-debug", embed_dim=dim, text={"hf_config": {"vocab_size": vocab}})
    model.config["text"].update(segmenter="none", max_length=32)
    model.save_pretrained(work / "model", tokenizer=load_tokenizer(str(tok_dir)))
    emb = torch.from_numpy(clip_like(n, dim, seed=1))
    write_index(work / "index", model, str(work / "model"), emb,
                [{"key": f"img{i:08d}", "path": "", "caption": f"ảnh {i}", "url": f"https://example.com/{i}.jpg"}
                 for i in range(n)])
    return work / "index"


def rss_mb(pid: int) -> tuple[float, float, float, float]:
    """(VmRSS, VmHWM, RssAnon, RssFile) of process `pid` in MiB: RssAnon is the memory the
    process owns, RssFile the file pages it has mapped (the memory-mapped codes and parts:
    page cache, given back under memory pressure)."""
    f = Path(f"/proc/{pid}/status").read_text().splitlines()
    get = lambda k: next(int(line.split()[1]) for line in f if line.startswith(k + ":")) / 1024  # noqa: E731
    return get("VmRSS"), get("VmHWM"), get("RssAnon"), get("RssFile")


def model_only_rss(index: Path) -> tuple[float, float]:
    """(VmRSS, RssAnon) in MiB of a process holding only the index's model, as the service loads it."""
    code = ("import sys, phoclip; from phoclip.search.index import EmbeddingIndex; "
            "m = phoclip.load(EmbeddingIndex(sys.argv[1]).meta['model'], 'torch', 'cpu'); "
            "m.embed_texts(['kiểm tra']); "
            "print(*[int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith(('VmRSS:', 'RssAnon:'))])")
    r = subprocess.run([sys.executable, "-c", code, str(index)], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        return float("nan"), float("nan")
    rss, anon = (float(x) for x in r.stdout.strip().splitlines()[-1].split())
    return rss, anon


def items_latency(index: Path, n: int, k: int, threads: int, calls: int = 200) -> tuple[float, float, bool]:
    """(p50 ms, p99 ms) of `EmbeddingIndex.items_for` of `k` random image ids, `threads`
    threads calling at once, and whether the first part's rows come memory-mapped."""
    from phoclip.search import parts as P
    from phoclip.search.index import EmbeddingIndex
    from phoclip.search.metadata import MetadataReader

    ix = EmbeddingIndex(index)
    reader = MetadataReader(P.files_of(index, ix.meta["parts"][0]["name"])[P.META])
    mapped = getattr(reader, "memory_mapped", False)  # a checkout before the Arrow copies reads parquet only
    lat: list[float] = []
    lock = threading.Lock()

    def one(seed: int) -> None:
        rng, mine = np.random.default_rng(seed), []
        for _ in range(calls // threads):
            ids = rng.integers(0, n, k).tolist()
            t = time.perf_counter()
            ix.items_for("images", ids)
            mine.append(time.perf_counter() - t)
        with lock:
            lat.extend(mine)

    ts = [threading.Thread(target=one, args=(s,)) for s in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return _pct(lat, 0.5) * 1e3, _pct(lat, 0.99) * 1e3, mapped


def run_clients(url: str, queries: np.ndarray, clients: int, k: int, failed: list,
                answers: dict | None = None) -> tuple[list[float], float]:
    """Latencies (s) of every query, `clients` threads each with its own connection, and
    queries/s; answers other than k results, and requests the service never answered (it
    died), are appended to `failed` (a client stops at its first unanswered request).
    `answers`, when given, receives each query's row ids by the query's position."""
    lat: list[float] = []
    lock = threading.Lock()

    def one(c: int) -> None:
        s = requests.Session()
        mine = []
        for j in range(c, len(queries), clients):
            q = queries[j]
            body = json.dumps({"text": None, "image": None, "image_url": None, "embedding_input": q.tolist(),
                               "modality": "image", "num_images": k, "num_result_ids": k, "indice_name": None,
                               "deduplicate": False, "use_mclip": False, "use_safety_model": False,
                               "use_violence_detector": False, "aesthetic_score": "", "aesthetic_weight": ""})
            t = time.perf_counter()
            try:
                r = s.post(url, data=body, timeout=60)
            except requests.RequestException as e:
                failed.append(f"no answer: {type(e).__name__}: {str(e)[:200]}")
                break
            mine.append(time.perf_counter() - t)
            if r.status_code != 200 or len(r.json()) != k:
                failed.append(f"{r.status_code} {r.text[:200]}")
            elif answers is not None:
                answers[j] = [int(x["id"]) for x in r.json()]
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=one, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, len(queries) / (time.perf_counter() - t0)


def recall_at_k(got: dict, truth: np.ndarray, k: int) -> float:
    """Mean share of each answered query's exact top-k found in its answer."""
    return float(np.mean([len(set(ids[:k]) & set(truth[j, :k].tolist())) / k for j, ids in got.items()])) if got \
        else float("nan")


def index_recall(index: Path, queries: np.ndarray, truth: np.ndarray, k: int) -> tuple[float, float, float]:
    """(recall@k, p50 ms, p99 ms) of the index alone, one query at a time in process."""
    from phoclip.search.index import EmbeddingIndex

    ix, got, lat = EmbeddingIndex(index), {}, []
    for j, q in enumerate(queries):
        t = time.perf_counter()
        got[j] = ix.topk(torch.from_numpy(q[None]), k)[1][0].tolist()
        lat.append(time.perf_counter() - t)
    return recall_at_k(got, truth, k), _pct(lat, 0.5) * 1e3, _pct(lat, 0.99) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", help="an index built elsewhere (default: build one of --n vectors)")
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--truth", help="exact top-k row ids of the held-out queries, a .npy [queries, >=k] "
                                   "(bench_index.py writes exact_top10.npy in its work folder)")
    p.add_argument("--items-threads", default="1,4",
                   help="threads reading items at once in process (comma-separated; 1 for a checkout whose "
                        "metadata readers are not thread-safe)")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="phoclip-serve-bench-"))
    index = Path(args.index) if args.index else build(work, args.n, args.dim)
    from phoclip.search.index import EmbeddingIndex

    t = time.perf_counter()
    opened = EmbeddingIndex(index)
    open_s = time.perf_counter() - t
    n, dim = opened.count("images"), opened.dim
    del opened
    items = {t: items_latency(index, n, args.k, t) for t in map(int, args.items_threads.split(","))}
    queries = clip_like(args.queries, dim, seed=2)  # held out: another seed than the index's
    truth = np.load(args.truth) if args.truth else None
    if truth is not None and (truth.shape[0] < args.queries or truth.shape[1] < args.k):
        raise SystemExit(f"{args.truth}: {truth.shape} ids, needs at least [{args.queries}, {args.k}]")
    ix_recall = index_recall(index, queries, truth, args.k) if truth is not None else None

    with socket.socket() as sk:  # a free port on the loopback
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    log = open(work / "serve.log", "w")
    t0 = time.time()
    srv = subprocess.Popen([sys.executable, "launch/serve.py", "--index", str(index), "--port", str(port),
                            "--device", "cpu"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    rows, hung, died = [], False, None
    try:
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                if srv.poll() is not None or time.time() - t0 > 300:
                    raise SystemExit("the service did not start: " + (work / "serve.log").read_text()[-2000:])
                time.sleep(0.2)
        startup = time.time() - t0
        rss_start = rss_mb(srv.pid)[0]
        failed: list[str] = []
        first, _ = run_clients(base + "/knn-service", queries[:1], 1, args.k, failed)  # opens the search structures
        run_clients(base + "/knn-service", queries[1:20], 1, args.k, failed)  # warm-up
        recalls = {}
        for clients in (1, 4):
            got: dict = {}
            lat, qps = run_clients(base + "/knn-service", queries, clients, args.k, failed, got)
            recalls[clients] = recall_at_k(got, truth, args.k) if truth is not None else float("nan")
            rows.append((f"{clients} client{'s' if clients > 1 else ''}", f"{_pct(lat, 0.5) * 1e3:.1f}",
                         f"{_pct(lat, 0.99) * 1e3:.1f}", f"{qps:.0f}", f"{len(lat)}/{len(queries)}"))
            if srv.poll() is not None:
                break
        died = srv.poll()
        rss_end, hwm, anon_end, file_end = rss_mb(srv.pid) if died is None else (float("nan"),) * 4
    finally:
        if srv.poll() is None:
            srv.send_signal(signal.SIGTERM)
            try:
                srv.wait(timeout=30)
            except subprocess.TimeoutExpired:  # deadlocked: it answers nothing, not even its stop signal
                hung = True
                srv.kill()
                srv.wait()
        log.close()
    model_rss, model_anon = model_only_rss(index)
    print(f"serve: POST /knn-service, embedding_input, k={args.k} (metadata included), {args.queries} held-out queries "
          f"against {n:,} x {dim} ({index if args.index else 'built here: one part, exact'}); {machine()}")
    print(table(rows, ("clients", "p50 ms", "p99 ms", "queries/s", "answered")))
    print(f"index open (EmbeddingIndex): {open_s:.2f} s; service start-up (process start to /health answering: "
          f"model + index + probe): {startup:.1f} s; first query: {first[0] * 1e3 if first else float('nan'):.0f} ms")
    if ix_recall is not None:
        print(f"recall@{args.k} vs exact ({args.truth}): through the service "
              + ", ".join(f"{c} client{'s' if c > 1 else ''} {r:.4f}" for c, r in recalls.items())
              + f"; the index alone in process {ix_recall[0]:.4f} (p50 {ix_recall[1]:.2f} ms, p99 {ix_recall[2]:.2f} ms)")
    mapped = next(iter(items.values()))[2]
    print(f"items of {args.k} results in process (EmbeddingIndex.items_for, "
          f"{'memory-mapped Arrow copies' if mapped else 'parquet row groups'}): "
          + "; ".join(f"{t} thread{'s' if t > 1 else ''}: p50 {a:.2f} ms, p99 {b:.2f} ms" for t, (a, b, _) in items.items()))
    if died is not None:
        print(f"the service died during the queries (exit status {died}; -11: a segmentation fault)")
    if hung:
        print("the service hung: no answer to SIGTERM in 30 s (killed)")
    print(f"service RSS: {rss_start:.0f} MiB at start, {rss_end:.0f} MiB after the queries (peak {hwm:.0f}); "
          f"a process holding only the model: {model_rss:.0f} MiB (peak - model: {(hwm - model_rss) / 1024:.2f} GiB); "
          f"after the queries {anon_end:.0f} MiB its own (anonymous, model alone {model_anon:.0f}) + "
          f"{file_end:.0f} MiB of mapped file pages")
    if failed or died is not None or hung:
        errors = [line for line in (work / "serve.log").read_text().splitlines() if "Error" in line or "ERROR" in line]
        print(f"{len(failed)} failed answers (first: {(failed or ['-'])[0]}); the service's log: {work / 'serve.log'}")
        print("\n".join(errors[-10:]))
        return 1
    if not args.index:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
