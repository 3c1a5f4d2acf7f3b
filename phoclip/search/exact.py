"""Exact top-k over an index's embeddings: every row scored, either from one float32
matrix in memory or streamed block by block from the memory-mapped float16 parts, so
memory stays bounded whatever the index's size.

Rows that are not finite unit vectors (a damaged file) are counted and never returned: a
NaN row would otherwise be rank 1 for every query, and its score is not even JSON."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from phoclip.search.parts import release

logger = logging.getLogger(__name__)

NORM_TOLERANCE = 0.05  # |norm - 1| of a stored row; fp16 rounding stays under 1e-3
CHUNK = 65536  # rows per block of streamed exact search

# a kind's memory-mapped parts: (global id of the first row, float16 [rows, dim])
Parts = Sequence[tuple[int, np.ndarray]]


def ok_rows(x: torch.Tensor) -> torch.Tensor:
    """Which rows are finite unit vectors."""
    norm = torch.linalg.vector_norm(x, dim=1)  # NaN or inf for a non-finite row
    return torch.isfinite(norm) & ((norm - 1).abs() <= NORM_TOLERANCE)


def bad_rows(x: torch.Tensor, where: Path, chunk: int = CHUNK) -> torch.Tensor:
    """Ids of rows that are not finite unit vectors (zeroed in place), with one warning."""
    bad = []
    for s in range(0, x.shape[0], chunk):
        bad.append((~ok_rows(x[s:s + chunk])).nonzero().flatten() + s)
    ids = torch.cat(bad) if bad else torch.empty(0, dtype=torch.long)
    if len(ids):
        x[ids] = 0
        logger.warning("%s: %d of %d rows are not finite unit vectors (ids %s%s): skipped, they are "
                       "never returned; rebuild the index to search them", where, len(ids), x.shape[0],
                       ", ".join(map(str, ids[:5].tolist())), ", ..." if len(ids) > 5 else "")
    return ids


def load_matrix(parts: Parts, rows: int, dim: int, where: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The [rows, dim] float32 matrix of `parts` in memory, and the ids of its bad rows
    (zeroed, logged once naming `where`)."""
    x = torch.zeros(rows, dim)
    for start, a in parts:
        x[start:start + a.shape[0]] = torch.from_numpy(np.asarray(a, dtype=np.float32))
    return x, bad_rows(x, where)


def streamed_bad_ids(parts: Parts) -> torch.Tensor:
    """Ids of the bad rows of `parts`, read CHUNK rows at a time."""
    bad = []
    for start, a in parts:
        for s in range(0, a.shape[0], CHUNK):
            ok = ok_rows(torch.from_numpy(np.asarray(a[s:s + CHUNK], dtype=np.float32)))
            bad.append((~ok).nonzero().flatten() + start + s)
    return torch.cat(bad) if bad else torch.empty(0, dtype=torch.long)


def exact_topk(q: torch.Tensor, emb: torch.Tensor, k: int, chunk: int = 262144):
    """Top-k of q @ emb.T, in chunks of the gallery so memory stays bounded."""
    if emb.shape[0] <= chunk:
        return (q @ emb.T).topk(k, dim=1)
    best_s, best_i = None, None
    for s in range(0, emb.shape[0], chunk):
        sc, ix = (q @ emb[s:s + chunk].T).topk(min(k, emb.shape[0] - s), dim=1)
        ix += s
        if best_s is None:
            best_s, best_i = sc, ix
        else:
            cs, ci = torch.cat([best_s, sc], 1), torch.cat([best_i, ix], 1)
            best_s, o = cs.topk(k, dim=1)
            best_i = ci.gather(1, o)
    return best_s, best_i


def _drop(s: torch.Tensor, i: torch.Tensor, bad: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Results without the ids in `bad`, at most k per query."""
    if len(bad):
        keep = ~torch.isin(i, bad)
        order = keep.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :k]
        s, i = s.gather(1, order), i.gather(1, order)
    return s[:, :k], i[:, :k]


def matrix_topk(q: torch.Tensor, x: torch.Tensor, bad: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k scores and ids of q against the in-memory matrix `x`, its `bad` rows never
    returned ([q, k'] with k' <= k)."""
    k = min(k, x.shape[0] - len(bad))
    if k <= 0:
        return torch.empty(q.shape[0], 0), torch.empty(q.shape[0], 0, dtype=torch.long)
    kk = min(k + len(bad), x.shape[0])
    s, i = exact_topk(q, x, kk)
    return _drop(s, i, bad, k)


def streamed_topk(q: torch.Tensor, parts: Parts, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k scores and ids of q against `parts`, read CHUNK rows at a time (memory stays
    bounded at any size); bad rows never returned ([q, k'] with k' <= k)."""
    best_s = torch.full((q.shape[0], 0), float("-inf"))
    best_i = torch.empty((q.shape[0], 0), dtype=torch.long)
    for start, a in parts:
        for s0 in range(0, a.shape[0], CHUNK):
            blk = torch.from_numpy(np.asarray(a[s0:s0 + CHUNK], dtype=np.float32))
            sc = q @ blk.T
            sc[:, ~ok_rows(blk)] = float("-inf")
            ts, ti = sc.topk(min(k, sc.shape[1]), dim=1)
            cs, ci = torch.cat([best_s, ts], 1), torch.cat([best_i, ti + start + s0], 1)
            best_s, o = cs.topk(min(k, cs.shape[1]), dim=1)
            best_i = ci.gather(1, o)
        release(a)  # the pass's pages given back: a service searching 10 GB of parts keeps none resident
    keep = torch.isfinite(best_s).all(0)  # a column of -inf: fewer good rows than k
    return best_s[:, keep], best_i[:, keep]
