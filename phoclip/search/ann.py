"""The approximate index of a large collection, with faiss: which index a memory budget
allows, training on a sample, vectors added part by part (global ids, so the parts
need not be the same size) into blocks merged on disk, nprobe chosen for recall, an exact
re-rank from the memory-mapped float16 vectors, and the checks a faiss file we open must
pass (its sizes, its inverted lists inside its data file).

The rules follow autofaiss's (exact for small collections; IVF with SQ8 codes where they
fit the budget, else the largest PQ code that does; nlist about 4 sqrt(n), a power of
two; 30-100 training points per centroid), limited by what this machine builds in time:
see bench/RESULTS.md for the measured choice of the thresholds."""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
import zipfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import faiss
import numpy as np

from phoclip.fileio import fsync_dir
from phoclip.search.parts import release

logger = logging.getLogger(__name__)

LATENCY_TARGET_MS = 10.0  # a query's search time the choice aims at (--max-query-ms)
# rows x dims exact search scans per millisecond for one query (k=10, in-memory matrix): where its latency
# crosses 10 ms on the 2-core reference machine (33k x 512, load ~7: `bench/bench_index.py --crossover`,
# bench/RESULTS.md). A query reads the whole matrix, so this is memory bandwidth; exact search is chosen
# while n x d stays within the latency target's worth of it
EXACT_ROW_DIMS_PER_MS = 1_700_000
MAX_NLIST = 8192  # more centroids cost k-means time this machine does not have for 10M (bench/RESULTS.md)
PQ_SIZES = (256, 128, 64, 48, 32, 24, 16, 8, 4)
BLOCK_ROWS = 1_000_000  # vectors added into one block file (its inverted lists are in memory while added)
TRAIN_PER_CENTROID = 64
RECALL_TARGET = 0.95
RECALL_PLATEAU = 0.005  # a doubling of nprobe that adds less recall than this ends the search for it
RERANK_FACTOR = 10  # candidates per result re-ranked exactly from the float16 vectors
HELD_OUT = 1000  # queries of the build-time recall estimate
INDEX_FILE, DATA_FILE, TRAINED_FILE = "{kind}.index", "{kind}.ivfdata", "{kind}.trained.index"
HELD_OUT_FILE = "{kind}.heldout.npz"  # the recall queries and their exact answers: an add extends them
ID_BYTES = 8


def parse_bytes(s: str | int) -> int:
    """"4G", "512M", "2.5G" or a number of bytes -> bytes (1024-based, as autofaiss)."""
    if isinstance(s, int):
        return s
    t = str(s).strip().upper().rstrip("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        v = float(t[:-1] if t[-1:] in "KMGT" else t)
    except ValueError:
        raise ValueError(f"{s!r} is not a size (e.g. 4G, 512M)") from None
    if not v > 0:
        raise ValueError(f"{s!r} is not a positive size")
    return int(v * mult)


def nlist_for(n: int) -> int:
    """Inverted lists for n vectors: 4 sqrt(n) rounded to a power of two, within [16, MAX_NLIST]."""
    return int(min(MAX_NLIST, max(16, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))))


def exact_max_rows_for(d: int, max_bytes: int, max_query_ms: float = LATENCY_TARGET_MS) -> int:
    """The most rows exact search answers within `max_query_ms` a query (EXACT_ROW_DIMS_PER_MS)
    whose float32 matrix also fits `max_bytes`."""
    return int(min(max_query_ms * EXACT_ROW_DIMS_PER_MS / d, max_bytes / (4 * d)))


def choose(n: int, d: int, max_bytes: int, exact: bool = False, exact_max_rows: Optional[int] = None,
           max_query_ms: float = LATENCY_TARGET_MS) -> dict:
    """The search structure for n d-wide vectors within `max_bytes` of codes, ids and
    centroids: {"type": "exact"} while exact search is fast enough (below `exact_max_rows`,
    by default what answers within `max_query_ms`: `exact_max_rows_for`), else
    {"type": "faiss", "key", "nlist", "code_bytes", "rerank"}. ValueError when not even
    the smallest code fits."""
    if exact_max_rows is None:
        exact_max_rows = exact_max_rows_for(d, max_bytes, max_query_ms)
    if exact or n < exact_max_rows:
        return {"type": "exact"}
    nlist = nlist_for(n)
    room = (max_bytes - nlist * d * 4) / n - ID_BYTES  # bytes per vector for its code
    if room >= d:  # SQ8: one byte per dimension, near exact
        return {"type": "faiss", "key": f"IVF{nlist},SQ8", "nlist": nlist, "code_bytes": d, "rerank": False}
    if room >= d // 2 and d % 2 == 0:  # SQ4: trains in seconds where PQ takes minutes on 2 cores
        return {"type": "faiss", "key": f"IVF{nlist},SQ4", "nlist": nlist, "code_bytes": d // 2, "rerank": True}
    for m in PQ_SIZES:
        if m <= room and m < d and d % m == 0:
            return {"type": "faiss", "key": f"IVF{nlist},PQ{m}x8", "nlist": nlist, "code_bytes": m, "rerank": True}
    raise ValueError(f"{n} vectors of {d} dimensions do not fit in {max_bytes} bytes even as 4-byte codes: "
                     "raise --max-index-memory")


def estimated_bytes(choice: dict, n: int, d: int) -> int:
    """What the codes, ids and centroids of `choice` take for n vectors."""
    if choice["type"] != "faiss":
        return 0
    return n * (choice["code_bytes"] + ID_BYTES) + choice["nlist"] * d * 4


Arrays = Sequence[tuple[int, np.ndarray]]  # (global id of the first row, [rows, d] float16 memmap)


def _rows(a: np.ndarray, s: int, e: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 rows s:e of `a` and a mask of those that are finite unit vectors."""
    x = np.asarray(a[s:e], dtype=np.float32)
    release(a)
    with np.errstate(invalid="ignore", over="ignore"):
        norm = np.linalg.norm(x, axis=1)
    ok = np.isfinite(norm) & (np.abs(norm - 1) <= 0.05)
    return x, ok


def sample(arrays: Arrays, n: int, seed: int = 0, exclude: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """n good rows drawn at random from the parts (float32) and their global ids."""
    total = sum(a.shape[0] for _, a in arrays)
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(total, size=min(total, int(n * 1.05) + 16), replace=False))
    if exclude is not None:
        ids = np.setdiff1d(ids, exclude)
    out, got = [], []
    starts = np.array([s for s, _ in arrays] + [total])
    for j, (s, a) in enumerate(arrays):
        sel = ids[(ids >= s) & (ids < starts[j + 1])] - s
        for c in range(0, len(sel), 65536):
            x = np.asarray(a[sel[c:c + 65536]], dtype=np.float32)
            release(a)
            with np.errstate(invalid="ignore", over="ignore"):
                norm = np.linalg.norm(x, axis=1)
            ok = np.isfinite(norm) & (np.abs(norm - 1) <= 0.05)
            out.append(x[ok])
            got.append(sel[c:c + 65536][ok] + s)
    x, g = np.concatenate(out)[:n], np.concatenate(got)[:n]
    return np.ascontiguousarray(x), g


def exact_topk(arrays: Arrays, q: np.ndarray, k: int, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over the memory-mapped parts, bad rows never returned (ground truth):
    faiss's brute-force k-NN a chunk at a time, merged; missing results are -1 / -inf."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    best_s = np.full((q.shape[0], 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((q.shape[0], 0), dtype=np.int64)
    for start, a in arrays:
        for s in range(0, a.shape[0], chunk):
            x, ok = _rows(a, s, s + chunk)
            keep = np.flatnonzero(ok)
            if not len(keep):
                continue
            sc, ix = faiss.knn(q, np.ascontiguousarray(x[keep]), min(k, len(keep)), metric=faiss.METRIC_INNER_PRODUCT)
            cs = np.concatenate([best_s, sc], 1)
            ci = np.concatenate([best_i, np.where(ix >= 0, keep[np.maximum(ix, 0)] + start + s, -1)], 1)
            o = np.argsort(-cs, axis=1, kind="stable")[:, :k]
            best_s, best_i = np.take_along_axis(cs, o, 1), np.take_along_axis(ci, o, 1)
    if best_s.shape[1] < k:
        pad = k - best_s.shape[1]
        best_s = np.concatenate([best_s, np.full((q.shape[0], pad), -np.inf, dtype=np.float32)], 1)
        best_i = np.concatenate([best_i, np.full((q.shape[0], pad), -1, dtype=np.int64)], 1)
    return best_s, best_i


def build(arrays: Arrays, choice: dict, vdir: Path, kind: str, trained: Optional[Path] = None,
          old_index: Optional[Path] = None, progress: Optional[Callable[[str], None]] = None,
          all_arrays: Optional[Arrays] = None, held_out: Optional[Path] = None) -> dict:
    """Build `kind`'s index into version folder `vdir`: train on a sample (or reuse
    `trained`), add each part's good rows with their global ids into block files, merge
    the blocks (and the inverted lists of `old_index`, an add) on disk, choose nprobe
    for recall and measure it. An add passes the previous version's `held_out` queries:
    their exact answers are brought up to date from the new rows alone. Returns the
    description for index.json, with the seconds each phase took."""
    say = progress or logger.info
    d = arrays[0][1].shape[1]
    n = sum(a.shape[0] for _, a in arrays)
    vdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    trained_out = vdir / TRAINED_FILE.format(kind=kind)
    if trained is None:
        nt = min(n, max(choice["nlist"] * TRAIN_PER_CENTROID, 10_000))
        xt, _ = sample(arrays, nt, seed=1)
        index = faiss.index_factory(d, choice["key"], faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        if hasattr(ivf, "pq"):  # PQ codebooks: 64 points a code and 10 rounds (faiss: 256 and 25) keep training in minutes
            ivf.pq.cp.max_points_per_centroid, ivf.pq.cp.niter = 64, 10
        say(f"{kind}: training {choice['key']} on {len(xt):,} vectors")
        index.train(xt)
        del xt
        faiss.write_index(index, str(trained_out))
    else:
        import shutil

        shutil.copyfile(trained, trained_out)
    t_train = time.monotonic() - t0
    blocks, bad, added = [], 0, 0
    for start, a in arrays:
        for s in range(0, a.shape[0], BLOCK_ROWS):
            idx = faiss.read_index(str(trained_out))
            for c in range(s, min(s + BLOCK_ROWS, a.shape[0]), 65536):
                x, ok = _rows(a, c, min(c + 65536, s + BLOCK_ROWS, a.shape[0]))
                ids = np.arange(start + c, start + c + len(x), dtype=np.int64)
                bad += int((~ok).sum())
                if ok.any():
                    idx.add_with_ids(np.ascontiguousarray(x[ok]), ids[ok])
                    added += int(ok.sum())
            f = vdir / f".{kind}.block{len(blocks):05d}.index"
            faiss.write_index(idx, str(f))
            blocks.append(f)
            del idx
            say(f"{kind}: added {added:,} of {n:,} vectors ({time.monotonic() - t0:.0f} s)")
    t_add = time.monotonic() - t0 - t_train
    empty = faiss.read_index(str(trained_out))
    inputs = ([(old_index, faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)] if old_index else []) + \
        [(b, faiss.IO_FLAG_MMAP) for b in blocks]
    _merge_ondisk(empty, inputs, vdir / DATA_FILE.format(kind=kind))
    index_f = vdir / INDEX_FILE.format(kind=kind)
    faiss.write_index(empty, str(index_f))
    for b in blocks:
        b.unlink()
    for f in (index_f, vdir / DATA_FILE.format(kind=kind), trained_out):
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    fsync_dir(vdir)
    t_merge = time.monotonic() - t0 - t_train - t_add
    info = dict(choice, type="faiss", file=index_f.name, data=DATA_FILE.format(kind=kind),
                trained=trained_out.name, ntotal=int(empty.ntotal), skipped=bad,
                bytes=index_f.stat().st_size + (vdir / DATA_FILE.format(kind=kind)).stat().st_size,
                index_sha256=_sha256(index_f), data_bytes=(vdir / DATA_FILE.format(kind=kind)).stat().st_size,
                train_s=round(t_train, 1), add_s=round(t_add, 1), merge_s=round(t_merge, 1))
    del empty
    every = all_arrays or arrays
    index = open_index(vdir, info, sum(a.shape[0] for _, a in every), d)
    t = time.monotonic()
    truth = None
    if held_out is not None:
        truth = read_held_out(held_out, d, sum(a.shape[0] for _, a in every))
        if truth is not None:
            new_s, new_i = exact_topk(arrays, truth[0], truth[2].shape[1])
            truth = (truth[0], truth[1]) + _merge_topk(truth[2], truth[3], new_i, new_s)
    if truth is None:
        truth = ground_truth(every)
    info.update(tune(index, every, info, truth))
    _save_held_out(vdir / HELD_OUT_FILE.format(kind=kind), *truth)
    info.update(held_out=HELD_OUT_FILE.format(kind=kind), tune_s=round(time.monotonic() - t, 1))
    say(f"{kind}: {choice['key']} nprobe {info['nprobe']}, recall@10 {info['recall_at_10']:.3f} "
        f"({info['recall_queries']} held-out queries), {info['latency_ms']:.1f} ms a query; "
        f"train {t_train:.0f} s, add {t_add:.0f} s, merge {t_merge:.0f} s, recall {info['tune_s']:.0f} s")
    return info


def own_file(name) -> bool:
    """Whether `name`, as index.json gives it, names a file of the version folder itself
    (not a path elsewhere, not a hidden or temporary file)."""
    return isinstance(name, str) and bool(name) and "/" not in name and not name.startswith(".")


def carry(old_vdir: Path, info: dict, vdir: Path) -> dict:
    """An add with no new rows of this kind (images added without captions): the previous
    version's index of it taken into `vdir` unchanged, hard-linked (versions are never
    written in place; copied across file systems), so the new version stays complete when
    the old one is removed. Returns its description, unchanged."""
    import shutil

    for k in ("file", "data", "trained", "held_out"):
        name = info.get(k)
        if k == "held_out" and not (own_file(name) and (old_vdir / name).is_file()):
            continue  # optional: the next add measures the recall from scratch
        if not own_file(name):
            raise ValueError(f"{old_vdir}: index.json names {k} {name!r}, not a file of its own")
        src, dst = old_vdir / name, vdir / name
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    return dict(info)


Truth = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # queries, their own ids, exact ids, exact scores


def ground_truth(arrays: Arrays, k: int = 10) -> Truth:
    """HELD_OUT rows of the parts as queries, with their exact top k+1 (their own row among them)."""
    q, qid = sample(arrays, HELD_OUT, seed=2)
    s, i = exact_topk(arrays, q, k + 1)
    return q, qid, i, s


def _merge_topk(ids: np.ndarray, scores: np.ndarray, new_ids: np.ndarray,
                new_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two exact top-k answers of the same queries over disjoint rows, merged (ids, scores)."""
    k = ids.shape[1]
    cs, ci = np.concatenate([scores, new_scores], 1), np.concatenate([ids, new_ids], 1)
    o = np.argsort(-cs, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ci, o, 1), np.take_along_axis(cs, o, 1)


def _save_held_out(f: Path, q: np.ndarray, qid: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> None:
    tmp = f.with_name(f".{f.name}.tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, q=q.astype(np.float32), qid=qid.astype(np.int64), ids=ids.astype(np.int64),
                 scores=scores.astype(np.float32))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, f)


def read_held_out(f: Path, d: int, count: int) -> Optional[Truth]:
    """The held-out queries and exact answers a version saved, or None (logged) when the
    file is missing or not what it should be: the add then measures from scratch."""
    try:
        with np.load(f, allow_pickle=False) as z:
            q, qid, ids, scores = (z[k] for k in ("q", "qid", "ids", "scores"))
        ok = (q.dtype == np.float32 and q.ndim == 2 and q.shape[1] == d and qid.shape == (len(q),)
              and ids.ndim == 2 and ids.shape[0] == len(q) and scores.shape == ids.shape
              and ids.dtype == np.int64 and qid.dtype == np.int64 and 0 < len(q) <= 10 * HELD_OUT
              and bool(np.isfinite(q).all()) and bool(((ids >= -1) & (ids < count)).all())
              and bool(((qid >= 0) & (qid < count)).all()))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        logger.warning("%s: unreadable (%s): recall measured from scratch", f, e)
        return None
    if not ok:
        logger.warning("%s: not the held-out queries of this index: recall measured from scratch", f)
        return None
    return q, qid, ids, scores


def _merge_ondisk(trained_index, inputs: list[tuple[Path, int]], ivfdata: Path) -> None:
    """faiss.contrib.ondisk.merge_ondisk with ids kept as added (no shift_ids: it is wrong
    for blocks of unequal sizes in faiss 1.15) and each input read with its own flags (a
    previous version's on-disk index beside its data file)."""
    ivfs, keep = [], []
    for fname, flags in inputs:
        index = faiss.read_index(str(fname), flags)
        ivf = faiss.extract_index_ivf(index)
        ivfs.append(ivf.invlists)
        keep.append(index)
    out_ivf = faiss.extract_index_ivf(trained_index)
    if trained_index.ntotal != 0:
        raise ValueError("merging into an index that is not empty")
    invlists = faiss.OnDiskInvertedLists(out_ivf.nlist, out_ivf.code_size, str(ivfdata))
    vec = faiss.InvertedListsPtrVector()
    for il in ivfs:
        vec.push_back(il)
    ntotal = invlists.merge_from_multiple(vec.data(), vec.size(), False)
    trained_index.ntotal = out_ivf.ntotal = ntotal
    out_ivf.replace_invlists(invlists, True)
    invlists.this.disown()
    del keep


def _sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for b in iter(lambda: fh.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def open_index(vdir: Path, info: dict, count: int, dim: int):
    """The faiss index a version folder holds, read only with its inverted lists on disk
    (memory-mapped), after checks that keep a crafted file from crashing the process:
    the index file's hash and the data file's size as index.json records them, then the
    index's width, size, metric and every inverted list inside the data file. ValueError
    in one line naming the file otherwise."""
    names = [info.get("file"), info.get("data")]
    if not all(own_file(x) for x in names):
        raise ValueError(f"{vdir}: index.json names no faiss files of its own ({names})")
    index_f, data_f = vdir / names[0], vdir / names[1]
    for f in (index_f, data_f):
        if not f.is_file():
            raise ValueError(f"{f}: missing (index.json names it)")
    if _sha256(index_f) != info.get("index_sha256"):
        raise ValueError(f"{index_f}: not the file index.json records (sha256 differs); rebuild the index")
    if data_f.stat().st_size != info.get("data_bytes"):
        raise ValueError(f"{data_f}: {data_f.stat().st_size} bytes, index.json records {info.get('data_bytes')}")
    try:
        index = faiss.read_index(str(index_f), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as e:
        raise ValueError(f"{index_f}: not a faiss index ({str(e).splitlines()[0][:200]})") from None
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        raise ValueError(f"{index_f}: not an IVF index") from None
    if index.d != dim or index.metric_type != faiss.METRIC_INNER_PRODUCT or index.ntotal > count:
        raise ValueError(f"{index_f}: {index.d}-wide, metric {index.metric_type}, {index.ntotal} vectors; "
                         f"the index is {dim}-wide inner product with {count}")
    il = faiss.downcast_InvertedLists(ivf.invlists)
    if not isinstance(il, faiss.OnDiskInvertedLists):
        raise ValueError(f"{index_f}: its inverted lists are not on disk beside it")
    per = il.code_size + ID_BYTES
    size, total = data_f.stat().st_size, 0
    for j in range(il.nlist):
        lst = il.lists.at(j)
        if lst.size > lst.capacity or lst.offset + lst.capacity * per > size:
            raise ValueError(f"{index_f}: inverted list {j} lies outside {data_f.name}")
        total += lst.size
    if total != index.ntotal:
        raise ValueError(f"{index_f}: its lists hold {total} vectors, it says {index.ntotal}")
    nprobe = info.get("nprobe", 16)
    ivf.nprobe = int(nprobe) if isinstance(nprobe, int) and 0 < nprobe <= ivf.nlist else min(16, ivf.nlist)
    return index


def search(index, q: np.ndarray, k: int, info: dict,
           vectors: Optional[Callable[[np.ndarray], np.ndarray]] = None,
           nprobe: Optional[int] = None, count: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of the faiss index, re-ranked exactly from the stored vectors when `vectors`
    (ids -> float32 rows) is given; -1 results dropped (fewer than k columns then), and
    with `count` (the rows of the index) ids outside [0, count) too."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    kk = k * RERANK_FACTOR if vectors is not None else k
    params = faiss.SearchParametersIVF(nprobe=int(nprobe or faiss.extract_index_ivf(index).nprobe))
    s, i = index.search(q, kk, params=params)
    if count is not None:
        # the ids are read from the data file, which open_index checks for size only: an id
        # past the index names no row (a damaged or crafted file), and is dropped, not looked up
        out = (i >= count) | (i < -1)
        if out.any():
            logger.warning("faiss index: %d results name ids outside the index's %d rows: dropped; rebuild the index",
                           int(out.sum()), count)
            i[out], s[out] = -1, -np.inf
            o = np.argsort(-s, axis=1, kind="stable")
            s, i = np.take_along_axis(s, o, 1), np.take_along_axis(i, o, 1)
    if vectors is not None:
        s2 = np.full_like(s, -np.inf)
        for a in range(q.shape[0]):
            ok = i[a] >= 0
            if ok.any():
                x = vectors(i[a][ok])
                with np.errstate(invalid="ignore"):
                    sc = x @ q[a]
                s2[a, np.flatnonzero(ok)] = np.where(np.isfinite(sc), sc, -np.inf)
        o = np.argsort(-s2, axis=1, kind="stable")
        s, i = np.take_along_axis(s2, o, 1), np.take_along_axis(i, o, 1)
        i[~np.isfinite(s)] = -1
    s, i = s[:, :k], i[:, :k]
    keep = (i >= 0).all(0)
    return s[:, keep].astype(np.float32), i[:, keep].astype(np.int64)


def tune(index, arrays: Arrays, info: dict, truth: Optional[Truth] = None, k: int = 10) -> dict:
    """nprobe: the smallest power of two whose recall@k on held-out queries (rows of the
    collection, each query's own row left out of both answers; `truth` or drawn here)
    reaches RECALL_TARGET; with the recall and the latency measured there."""
    q, qid, gt_ids, _ = truth if truth is not None else ground_truth(arrays, k)
    gt = _without(gt_ids, qid, k)

    def vectors(ids: np.ndarray) -> np.ndarray:
        return _gather(arrays, ids)

    ivf = faiss.extract_index_ivf(index)
    best = None
    p = 1
    while p <= ivf.nlist:
        t = time.monotonic()
        _, got = search(index, q, k + 1, info, vectors if info.get("rerank") else None, nprobe=p)
        ms = (time.monotonic() - t) * 1000 / len(q)
        for _, a in arrays:  # the re-rank's reads
            release(a)
        r = recall(_without(got, qid, k), gt)
        if best is not None and r < best["recall_at_10"] + RECALL_PLATEAU:
            break  # probing twice the lists no longer helps: the codes, not nprobe, limit the recall
        best = {"nprobe": p, "recall_at_10": round(r, 4), "latency_ms": round(ms, 2), "recall_queries": len(q)}
        if r >= RECALL_TARGET:
            break
        p *= 2
    best["recall_target_met"] = best["recall_at_10"] >= RECALL_TARGET
    if not best["recall_target_met"]:
        logger.warning("%s: recall@10 %.3f at nprobe %d, below %.2f however many lists are probed: these codes are "
                       "too coarse for these vectors; raise --max-index-memory (SQ4 needs %s here) or use --exact",
                       info.get("key"), best["recall_at_10"], best["nprobe"], RECALL_TARGET,
                       _size(estimated_bytes(dict(info, code_bytes=ivf.d // 2), ivf.ntotal, ivf.d)))
    ivf.nprobe = best["nprobe"]
    return best


def _size(b: int) -> str:
    """Bytes as --max-index-memory takes them: 1.1 MiB, 2.7 GiB."""
    return f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def _without(ids: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each row's first k ids other than its own."""
    return np.stack([np.array([j for j in row.tolist() if j != o][:k] + [-1] * k)[:k] for row, o in zip(ids, own)])


def recall(got: np.ndarray, gt: np.ndarray) -> float:
    """Mean fraction of each row of `gt` found in the same row of `got`."""
    k = gt.shape[1]
    return float(np.mean([len(set(g.tolist()) & set(t.tolist())) / k for g, t in zip(got, gt)]))


def _gather(arrays: Arrays, ids: np.ndarray) -> np.ndarray:
    """float32 rows of global `ids`, read a part at a time."""
    ids = np.asarray(ids, dtype=np.int64)
    starts = np.array([s for s, _ in arrays])
    out = np.zeros((len(ids), arrays[0][1].shape[1]), dtype=np.float32)
    where = np.searchsorted(starts, ids, side="right") - 1
    for p in np.unique(where):
        sel = np.flatnonzero(where == p)
        out[sel] = arrays[p][1][ids[sel] - arrays[p][0]]
    return out
