"""The embedding index: a folder of fp16 embeddings (`images.npy`, `captions.npy`), one
JSON line per item (`images.jsonl`, `captions.jsonl`) and `index.json` with the model's
fingerprint: searching with another model is refused, since its embeddings would live
in another space. Exact top-k (chunked matmul) or FAISS. Rows that are not finite unit
vectors (a damaged file) are counted and skipped at load, with a warning: a NaN row would
otherwise be rank 1 for every query, and its score is not even JSON."""
from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)

INDEX_META = "index.json"
PATHS_RELATIVE = "relative to the index folder"  # index.json's `paths`: how item paths and the model are written
NORM_TOLERANCE = 0.05  # |norm - 1| of a stored row; fp16 rounding stays under 1e-3
MAX_META_BYTES = 16 << 20  # index.json
MAX_ITEM_LINE = 1 << 20  # bytes of one line of images.jsonl / captions.jsonl


@dataclass
class Match:
    rank: int
    score: float
    id: int
    item: dict


class EmbeddingIndex:
    """Exact (default) or FAISS search over L2-normalised embeddings."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        meta_f = self.folder / INDEX_META
        if not meta_f.is_file():
            raise FileNotFoundError(f"{folder} is not an index (no {INDEX_META}); build one with "
                                    "launch/build_index.py")
        from phoclip.fileio import read_regular

        try:  # a regular file under a cap: a FIFO, a device or a huge file is refused unread
            self.meta = json.loads(read_regular(meta_f, MAX_META_BYTES))
        except (OSError, ValueError, RecursionError) as e:
            raise ValueError(f"{meta_f}: unreadable ({type(e).__name__}: {e})") from None
        m = self.meta
        if (not isinstance(m, dict) or not isinstance(m.get("model_fingerprint"), str)
                or not isinstance(m.get("model"), str) or not _count(m.get("dim"))
                or not isinstance(m.get("count"), dict)):
            raise ValueError(f"{meta_f}: not an index description (model_fingerprint, model, dim, count)")
        m["count"].setdefault("captions", 0)  # an index of images only may not say
        for kind in ("images", "captions"):
            if not _count(m["count"].get(kind), zero=True):
                raise ValueError(f"{meta_f}: count.{kind} must be a non-negative integer, not "
                                 f"{_short(m['count'].get(kind))}")
        # paths written relative to the index folder (indexes built since they are): resolved
        # here, so the index works from any directory and moved together with its images
        self.relative = m.get("paths") == PATHS_RELATIVE
        self.recorded_model = m["model"]
        # where the model was found: "the index folder", "built_in" (the folder the index
        # was built in), "as recorded" (an absolute path), or None: no model there
        m["model"], self.model_found_via = self.resolve_model(m["model"])
        self._emb: dict[str, torch.Tensor] = {}
        self._bad: dict[str, torch.Tensor] = {}  # ids of rows skipped at load, per kind
        self._items: dict[str, list[dict]] = {}
        self._recorded: dict[str, list[dict]] = {}  # the items' path keys as written
        self._faiss: dict = {}

    @property
    def fingerprint(self) -> str:
        return self.meta["model_fingerprint"]

    def embeddings(self, kind: str) -> torch.Tensor:
        """The [N, dim] fp32 embeddings of `kind` ("images" or "captions"), loaded and
        checked once; rows listed by `bad_ids` are zeroed and never returned by `search`."""
        if kind not in self._emb:
            f = self.folder / f"{kind}.npy"
            if not f.is_file():
                raise FileNotFoundError(f"index {self.folder} has no {kind} (built from "
                                        f"{self.meta.get('source')}); rebuild it from shards "
                                        "to search captions")
            try:
                # memory-mapped first: a header claiming more rows than the file holds is
                # refused here, not allocated
                a = np.load(f, allow_pickle=False, mmap_mode="r")
            except Exception as e:  # noqa: BLE001 -- numpy's header parser raises ValueError,
                # SyntaxError, tokenize.TokenError (an unclosed bracket)...: one refusal for all
                raise ValueError(f"{f}: not a readable embedding array ({type(e).__name__}: {e})") from None
            want = self.meta["count"].get(kind)
            if a.ndim != 2 or a.shape[1] != self.meta["dim"] or a.shape[0] != want or a.dtype.kind != "f":
                raise ValueError(f"{f}: shape {a.shape} {a.dtype}, but {INDEX_META} says "
                                 f"{want} x {self.meta['dim']} floats")
            if len(self.items(kind)) != a.shape[0]:
                raise ValueError(f"{self.folder / (kind + '.jsonl')}: {len(self.items(kind))} lines for "
                                 f"{a.shape[0]} embeddings; the index is damaged: rebuild it")
            # fp16 on disk; fp32 in memory on CPU, where fp16 matmuls are slow
            x = torch.from_numpy(np.array(a, dtype=np.float32))
            self._bad[kind] = _bad_rows(x, f)
            self._emb[kind] = x
        return self._emb[kind]

    def bad_ids(self, kind: str) -> torch.Tensor:
        """Ids of the rows of `kind` that were not finite unit vectors at load (skipped)."""
        self.embeddings(kind)
        return self._bad[kind]

    def resolve_path(self, p: str) -> str:
        """A path the index recorded, as usable from here: relative paths are read against
        the index folder where that exists, else against where the index was built
        (`built_in`: the images stayed, the index moved); absolute paths, URLs and paths
        of an index written before paths were relative (they were relative to the
        builder's working directory) are kept as written."""
        places = self.candidates(p)
        return next((c for c in places if os.path.exists(c)), places[0])

    def resolve_model(self, p: str) -> tuple[str, Optional[str]]:
        """The recorded model path as usable from here, and where it was found (see
        `model_found_via`): the first candidate that holds a model (a model folder, a run
        or checkpoint folder, an ONNX export), not merely something of that name."""
        places = self.candidates(p)
        vias = ["as recorded"] if len(places) == 1 and places[0] == p else ["the index folder", "built_in"]
        for c, via in zip(places, vias):
            if _is_model(c):
                return c, via
        return places[0], None

    def model_line(self, given: Optional[str] = None) -> str:
        """One line naming the model used and why: given on the command line, or what
        the index recorded and where it was found."""
        if given:
            return f"model: {given} (given; the index recorded {self.recorded_model!r})"
        via = self.model_found_via
        how = "no model there" if via is None else "as recorded" if via == "as recorded" else f"found via {via}"
        return f"model: {self.meta['model']} (recorded as {self.recorded_model!r} in {self.folder / INDEX_META}, {how})"

    def image_roots(self) -> list[str]:
        """The folders pictures of this index may be read from by default: the index
        folder and the images folder recorded at build time (`images_root`; an index
        written before it was recorded: its `source` when that is a folder here, else the
        folder holding its images). A folder less than two levels deep (/, /home) is
        never one: such an index's pictures outside its folder need serve --images-root."""
        roots = [os.path.abspath(self.folder)]
        if "images_root" in self.meta:
            rec = self.meta["images_root"]
            root = os.path.abspath(self.resolve_path(rec)) if isinstance(rec, str) and rec else None
        else:
            root = _images_root(self.meta.get("source"), self.items("images"))
        if root is not None and _deep_enough(root):
            roots.append(root)
        elif root is not None:
            logger.warning("%s: the images folder %s is too broad to serve pictures from by default; "
                           "name the folders with --images-root", self.folder / INDEX_META, root)
        return roots

    def recorded(self, kind: str, i: int) -> dict:
        """Item `i` of `kind`'s path keys as the index recorded them (relative to the index
        folder): what may be shown to others, where the resolved paths are local."""
        self.items(kind)
        return self._recorded[kind][i]

    def candidates(self, p: str) -> list[str]:
        """Where a recorded path may be, in the order `resolve_path` tries them."""
        if not self.relative or not p or os.path.isabs(p) or "://" in p or p.startswith("pipe:"):
            return [p]
        places = [os.path.normpath(os.path.join(os.path.abspath(self.folder), p))]
        built = self.meta.get("built_in")
        if isinstance(built, str) and os.path.isabs(built):
            places.append(os.path.normpath(os.path.join(built, p)))
        return places

    def items(self, kind: str) -> list[dict]:
        """The JSON item of each row of `kind`; its `path` and local `shard` usable from here."""
        if kind not in self._items:
            from phoclip.data.remote import open_local

            f = self.folder / f"{kind}.jsonl"
            want = self.meta["count"][kind]
            out, recorded = [], []
            try:
                # a regular file only, opened without blocking (a FIFO would hang the
                # service's start), read a line of at most MAX_ITEM_LINE bytes at a time
                # and at most one line more than index.json counts (/dev/zero never ends)
                with open_local(str(f)) as fh:
                    while len(out) <= want:
                        line = fh.readline(MAX_ITEM_LINE + 1)
                        if not line:
                            break
                        if len(line) > MAX_ITEM_LINE:
                            raise ValueError(f"line {len(out) + 1} is over {MAX_ITEM_LINE} bytes")
                        it = json.loads(line)
                        if not isinstance(it, dict):
                            raise ValueError(f"line {len(out) + 1} is not an object")
                        recorded.append({k: it.get(k) for k in _path_keys(it)})
                        for k in _path_keys(it):
                            if isinstance(it.get(k), str):
                                it[k] = self.resolve_path(it[k])
                        out.append(it)
                    more = len(out) > want and bool(fh.readline(1))
            except (OSError, ValueError, RecursionError) as e:
                raise ValueError(f"{f}: unreadable ({type(e).__name__}: {e})") from None
            if len(out) > want:  # counted up to one line over, not read to the end
                raise ValueError(f"{f}: {'over ' if more else ''}{len(out)} lines for {want} embeddings "
                                 f"({INDEX_META}'s count); the index is damaged: rebuild it")
            self._items[kind] = out
            self._recorded[kind] = recorded
        return self._items[kind]

    def check_model(self, model) -> None:
        """Refuse a model other than the one that built the index (fingerprint, width)."""
        from phoclip.models.pretrained import model_fingerprint

        fp = getattr(model, "fingerprint", None) or model_fingerprint(model)  # ONNX: recorded at export
        if fp != self.fingerprint:
            raise ValueError(f"index {self.folder} was built with model {self.fingerprint} "
                             f"({self.meta.get('model')}), not {fp}: rebuild the index or search "
                             "with the model that built it")
        dim = model.config.get("embed_dim")
        if dim != self.meta["dim"]:
            raise ValueError(f"index {self.folder} holds {self.meta['dim']}-wide embeddings, the model "
                             f"makes {dim}-wide ones: rebuild the index with this model")

    def search(self, queries: torch.Tensor, k: int = 25, kind: str = "images",
               backend: str = "exact", chunk: int = 262144) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k scores and ids for each query row; exact by default. Rows skipped at
        load are never returned (fewer than k results when fewer good rows exist)."""
        emb = self.embeddings(kind)
        bad = self._bad[kind]
        q = queries.float()
        k = min(k, emb.shape[0] - len(bad))
        if k <= 0:
            return torch.empty(q.shape[0], 0), torch.empty(q.shape[0], 0, dtype=torch.long)
        # fetch enough that k good rows remain after dropping any skipped ones
        kk = k + len(bad)
        s, i = self._search_faiss(q, kk, kind) if backend == "faiss" else exact_topk(q, emb, kk, chunk)
        if len(bad):
            keep = ~torch.isin(i, bad)
            order = keep.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :k]
            s, i = s.gather(1, order), i.gather(1, order)
        return s, i

    def _search_faiss(self, q, k, kind):
        import faiss

        if kind not in self._faiss:
            emb = self.embeddings(kind).numpy()
            ix = faiss.IndexFlatIP(emb.shape[1])
            ix.add(emb)
            self._faiss[kind] = ix
        s, i = self._faiss[kind].search(np.ascontiguousarray(q.numpy()), k)
        return torch.from_numpy(s), torch.from_numpy(i)


def _count(v, zero: bool = False) -> bool:
    """Whether `v` is a count: an integer (not a bool), positive (or zero with `zero`)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= (0 if zero else 1)


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:40] + "..."


def _is_model(path: str) -> bool:
    """Whether `path` holds a model `phoclip.models.loading.load_encoder` can load: a model
    folder, a run folder (its model/ or checkpoints/), a checkpoint, an ONNX export."""
    from phoclip.models.loading import model_folder

    p = Path(path)
    try:
        return (model_folder(p) is not None or (p / "checkpoints").is_dir() or (p / "meta.json").is_file()
                or (p.name == "onnx" and model_folder(p.parent) is not None))
    except OSError:  # a name too long, a folder we may not read
        return False


def _bad_rows(x: torch.Tensor, f: Path, chunk: int = 65536) -> torch.Tensor:
    """Ids of rows that are not finite unit vectors (zeroed in place), with one warning."""
    bad = []
    for s in range(0, x.shape[0], chunk):
        part = x[s:s + chunk]
        norm = torch.linalg.vector_norm(part, dim=1)  # NaN or inf for a non-finite row
        ok = torch.isfinite(norm) & ((norm - 1).abs() <= NORM_TOLERANCE)
        bad.append((~ok).nonzero().flatten() + s)
    ids = torch.cat(bad) if bad else torch.empty(0, dtype=torch.long)
    if len(ids):
        x[ids] = 0
        logger.warning("%s: %d of %d rows are not finite unit vectors (ids %s%s): skipped, they are "
                       "never returned; rebuild the index to search them", f, len(ids), x.shape[0],
                       ", ".join(map(str, ids[:5].tolist())), ", ..." if len(ids) > 5 else "")
    return ids


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


def write_index(folder: str | os.PathLike, model, model_name: str, images: Optional[torch.Tensor],
                image_items: list[dict], captions: Optional[torch.Tensor] = None,
                caption_items: Optional[list[dict]] = None, source: str = "") -> Path:
    """Write an index folder (fp16 embeddings + items + fingerprint), whole or not at all:
    into a temporary folder beside it, fsynced, then renamed over the old index. The
    model's path and the items' local `path`/`shard` are written relative to the index
    folder, with the folder's absolute path at build time (`built_in`), so that the index
    works from any directory and when moved with its images (`EmbeddingIndex.resolve_path`)."""
    import shutil

    from phoclip.fileio import atomic_write_bytes, atomic_write_json, fsync_dir
    from phoclip.models.pretrained import model_fingerprint

    out = Path(folder)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / INDEX_META).is_file())):
        raise ValueError(f"{out} exists and is not an index: refusing to replace it (choose an "
                         "empty or new --out folder)")
    import secrets
    import tempfile

    # a new folder under a random name (mkdtemp: created exclusively, never a planted link)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    os.chmod(tmp, 0o755)
    home = os.path.abspath(out)
    for kind, emb, items in (("images", images, image_items), ("captions", captions, caption_items)):
        if emb is None:
            continue
        items = [{k: _relative(v, home) if k in _path_keys(it) else v for k, v in it.items()} for it in items]
        if len(items) != emb.shape[0]:
            raise ValueError(f"{len(items)} {kind} items for {emb.shape[0]} embeddings")
        buf = io.BytesIO()
        np.save(buf, emb.to(torch.float16).numpy(), allow_pickle=False)
        atomic_write_bytes(tmp / f"{kind}.npy", buf.getvalue())
        atomic_write_bytes(tmp / f"{kind}.jsonl", "".join(
            json.dumps(it, ensure_ascii=False) + "\n" for it in items).encode("utf-8"))
    meta = {"model_fingerprint": model_fingerprint(model), "model": _relative(model_name, home),
            "paths": PATHS_RELATIVE, "built_in": home,
            "images_root": _relative(_images_root(source, image_items), home),
            "dim": int(model.config["embed_dim"]), "source": source,
            "count": {"images": 0 if images is None else int(images.shape[0]),
                      "captions": 0 if captions is None else int(captions.shape[0])}}
    atomic_write_json(tmp / INDEX_META, meta, indent=2)
    old = out.with_name(f".{out.name}.old.{secrets.token_hex(8)}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(out.parent)
    return out


def _images_root(source: str, items: list[dict]) -> Optional[str]:
    """The folder the indexed pictures come from: `source` when it is a local folder,
    else the folder holding every item's local file (shards)."""
    if isinstance(source, str) and source and "://" not in source and os.path.isdir(source):
        return os.path.abspath(source)
    dirs = [os.path.dirname(os.path.abspath(v)) for it in items for k in _path_keys(it)
            if isinstance(v := it.get(k), str) and v and "://" not in v and not v.startswith("pipe:")]
    try:
        root = os.path.commonpath(dirs) if dirs else None
    except ValueError:  # mixed drives (Windows)
        return None
    return root if root is not None and _deep_enough(root) else None


def _deep_enough(folder: str) -> bool:
    """Whether `folder` is at least two levels deep (/data/photos, not / or /home): a
    folder pictures may be served from without being named."""
    return len(Path(os.path.abspath(folder)).parts) >= 3


def _path_keys(item: dict) -> tuple:
    """The keys of an item that are file paths: its `shard` when it comes from a shard
    (its `path` is then the image's name in the source dataset, not a file here), else its
    `path`."""
    return ("shard",) if item.get("shard") else ("path",)


def _relative(p, home: str):
    """A local path (as the builder's working directory saw it) relative to `home`; URLs,
    `pipe:` commands and non-text as given."""
    if not isinstance(p, str) or not p or "://" in p or p.startswith("pipe:"):
        return p
    return os.path.relpath(os.path.abspath(p), home)
