"""Top-25 search over 1M random 512-d fp16 embeddings: ours (EmbeddingIndex, exact)
vs the bare matmul + top-k on the same data, and FAISS flat (inner product).

    python bench/bench_search.py [--n 1000000] [--queries 16]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, machine, table  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--k", type=int, default=25)
    args = p.parse_args()
    from phoclip.search.index import EmbeddingIndex
    from phoclip.search.meta import FORMAT, INDEX_META
    from phoclip.search.parts import PartWriter, check_part, part_name

    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(args.n, args.dim, generator=g), dim=-1).half()
    q = torch.nn.functional.normalize(torch.randn(args.queries, args.dim, generator=g), dim=-1)
    with tempfile.TemporaryDirectory() as d:
        # one part in clip-retrieval's layout and an index.json of exact search, no model needed
        with PartWriter(d, part_name(0), args.dim, captions=False) as w:
            w.add(emb.numpy(), [{"key": str(i)} for i in range(args.n)])
            w.close({"source": "bench"})
        (Path(d) / INDEX_META).write_text(json.dumps({
            "format": FORMAT, "model_fingerprint": "x", "model": "none", "dim": args.dim,
            "count": {"images": args.n, "captions": 0}, "parts": [check_part(Path(d), part_name(0), args.dim)],
            "search": {"images": {"type": "exact"}}}))
        index = EmbeddingIndex(d)
        E = index.embeddings("images")  # what both sides search: the same fp32 matrix
        ours = best_of(lambda: index.topk(q, args.k))
        bare = best_of(lambda: (q @ E.T).topk(args.k, dim=1))
        s1, i1 = index.topk(q, args.k)
        s2, i2 = (q @ E.T).topk(args.k, dim=1)
        assert torch.equal(i1, i2), "ours must return the exact top-k"
        rows = [("ours (exact, chunked)", f"{ours * 1e3:.1f}", f"{ours / bare:.2f}x"),
                ("bare matmul + topk", f"{bare * 1e3:.1f}", "1.00x")]
        try:
            import faiss

            flat = faiss.IndexFlatIP(args.dim)
            flat.add(E.numpy())
            fa = best_of(lambda: flat.search(q.numpy(), args.k))
            rows.append(("FAISS IndexFlatIP", f"{fa * 1e3:.1f}", f"{fa / bare:.2f}x"))
        except ImportError:
            rows.append(("FAISS IndexFlatIP", "n/a (faiss-cpu not installed)", ""))
    print(f"search: top-{args.k} of {args.n:,} x {args.dim} fp16 embeddings, {args.queries} queries; {machine()}")
    print(table(rows, ("method", "ms per batch of queries", "vs bare")))


if __name__ == "__main__":
    main()
