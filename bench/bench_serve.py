"""Latency of text -> image search over a 100k-item index: the service (model and index
loaded once, `launch/serve.py` over HTTP on 127.0.0.1) against the CLI, which loads the
model and the index for every call (`launch/search.py`).

    python bench/bench_serve.py [--n 100000] [--queries 200] [--cli-calls 3]

The model is the tiny-debug architecture with a tokenizer built on the fly (random
weights: what is measured is the serving path, not the model's quality); the index holds
random unit vectors. Prints p50/p99 latency and queries/s of each, and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, table  # noqa: E402

QUERIES = ["một con chó chạy trên bãi cỏ", "xe hơi màu đỏ đậu trước ngôi nhà", "hai hình tròn màu đỏ",
           "người đàn ông đang làm việc", "một hình vuông màu xanh lá ở góc trên bên trái"]


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--cli-calls", type=int, default=3)
    p.add_argument("--k", type=int, default=24)
    args = p.parse_args(argv)
    import phoclip
    from phoclip.search.index import write_index
    from phoclip.data.text import UndertheseaSegmenter, build_phobert_tokenizer, load_tokenizer

    work = Path(tempfile.mkdtemp(prefix="phoclip-serve-bench-"))
    tok_dir = build_phobert_tokenizer(UndertheseaSegmenter().segment(QUERIES), work / "tok")
    torch.manual_seed(0)
    model = phoclip.create_model("tiny-debug", text={"hf_config": {"vocab_size": len(load_tokenizer(str(tok_dir)))}})
    model.config["text"].update(segmenter="underthesea", max_length=32)
    model.save_pretrained(work / "model", tokenizer=load_tokenizer(str(tok_dir)))
    emb = torch.nn.functional.normalize(torch.randn(args.n, model.config["embed_dim"]), dim=-1)
    write_index(work / "index", model, str(work / "model"), emb,
                [{"key": f"img{i:07d}", "path": "", "caption": ""} for i in range(args.n)])

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    import socket

    with socket.socket() as sk:  # a free port on the loopback
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    srv = subprocess.Popen([sys.executable, "launch/serve.py", "--index", str(work / "index"), "--port", str(port)],
                           cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                if srv.poll() is not None or time.time() - t0 > 180:
                    raise SystemExit("the service did not start")
                time.sleep(0.2)
        startup = time.time() - t0
        url = lambda q: f"{base}/search?" + urllib.parse.urlencode({"q": q, "k": args.k})
        for q in QUERIES:  # warm-up
            urllib.request.urlopen(url(q)).read()
        lat = []
        t_all = time.perf_counter()
        for i in range(args.queries):
            t = time.perf_counter()
            res = json.loads(urllib.request.urlopen(url(QUERIES[i % len(QUERIES)])).read())
            lat.append(time.perf_counter() - t)
            assert len(res["results"]) == args.k
        qps = args.queries / (time.perf_counter() - t_all)
    finally:
        srv.send_signal(signal.SIGTERM)
        srv.wait(timeout=30)
    cli = []
    for i in range(args.cli_calls):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "launch/search.py", "--index", str(work / "index"), QUERIES[i % len(QUERIES)],
                            "--k", str(args.k), "--json"], cwd=ROOT, env=env, capture_output=True, text=True)
        cli.append(time.perf_counter() - t)
        assert r.returncode == 0, r.stderr[-2000:]
    p50s, p99s = _pct(lat, 0.5), _pct(lat, 0.99)
    p50c = statistics.median(cli)
    print(f"serve: text -> image, top-{args.k} of {args.n:,} x {model.config['embed_dim']} embeddings, "
          f"tiny-debug model; {machine()}; service start-up {startup:.1f} s")
    print(table([("service (loaded once, HTTP)", f"{p50s * 1e3:.1f}", f"{p99s * 1e3:.1f}", f"{qps:.1f}", "1.00x"),
                 ("CLI (loads per call)", f"{p50c * 1e3:.0f}", f"{max(cli) * 1e3:.0f}", f"{1 / p50c:.2f}",
                  f"{p50c / p50s:.0f}x slower")],
                ("path", "p50 ms", "p99 ms", "queries/s", "vs service")))
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
