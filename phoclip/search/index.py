"""The embedding index: `EmbeddingIndex` opens an index folder (its parts in clip-retrieval's
layout, `phoclip.search.parts`; their metadata, `phoclip.search.metadata`; index.json and
its versions, `phoclip.search.meta`), answers searches (exact, `phoclip.search.exact`, or
approximate, `phoclip.search.ann`), reads items by id and switches to a new version when
one is published (`reload_if_changed`). `write_index` writes a small index in one go.

Everything is memory-mapped and read lazily: opening an index reads index.json and each
part's .npy header and parquet footer, never the vectors. A reader opens index.json once
and then only the version it names, so it sees the old index or the new one, never a torn
one."""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from phoclip.fileio import atomic_write_json, fsync_dir, real_dir
from phoclip.search import parts as P
from phoclip.search.exact import load_matrix, matrix_topk, streamed_bad_ids, streamed_topk
from phoclip.search.meta import (
    INDEX_META,
    KINDS,
    PATHS_RELATIVE,
    VERSIONS,
    caption_rows,
    check_out_folder,
    deep_enough,
    image_rows,
    images_root,
    index_meta,
    meta_stamp,
    new_version,
    path_keys,
    read_meta,
)
from phoclip.search.metadata import MetadataReader, parquet_rows

logger = logging.getLogger(__name__)

MAX_ROW_GROUP_BYTES = 64 << 20  # one metadata row group, decoded: what one item lookup may cost
RAM_EXACT_BYTES = 1 << 30  # exact search keeps an fp32 copy in memory up to this size, else streams the parts


@dataclass
class Match:
    rank: int
    score: float
    id: int
    item: dict


class _Version:
    """What one index.json names: its description, its parts (global ids), the search
    structures opened lazily. Replaced whole by `reload_if_changed`."""

    def __init__(self, folder: Path, meta: dict, stamp: tuple) -> None:
        self.folder, self.meta, self.stamp = folder, meta, stamp
        self.parts: list[P.Part] = []
        start = cap_start = 0
        for rec in meta["parts"]:
            self.parts.append(P.Part(rec["name"], folder, rec["rows"], rec["captions"], start, cap_start))
            start += rec["rows"]
            cap_start += rec["captions"]
        self.starts = {"images": np.array([p.start for p in self.parts] + [start], dtype=np.int64),
                       "captions": np.array([p.cap_start for p in self.parts] + [cap_start], dtype=np.int64)}
        self.readers: dict[tuple, MetadataReader] = {}
        self.matrix: dict[str, Optional[torch.Tensor]] = {}
        self.bad: dict[str, torch.Tensor] = {}
        self.ann: dict = {}
        self.lock = threading.Lock()


class EmbeddingIndex:
    """Exact or approximate (faiss) search over the memory-mapped parts of an index folder."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._v = self._open()
        m = self.meta
        self.relative = m.get("paths") == PATHS_RELATIVE
        self.recorded_model = m["model"]
        # where the model was found: "the index folder", "built_in" (the folder the index
        # was built in), "as recorded" (an absolute path), or None: no model there
        m["model"], self.model_found_via = self.resolve_model(m["model"])

    # ---------------------------------------------------------------- opening

    def _open(self) -> _Version:
        m, stamp = read_meta(self.folder)
        v = _Version(self.folder, m, stamp)
        for p in v.parts:  # headers and footers only: the vectors stay on disk
            f = p.files()
            rows = parquet_rows(f[P.META])
            if rows != p.rows:
                raise ValueError(f"{f[P.META]}: {rows} rows, but {INDEX_META} says part {p.name} has {p.rows}; "
                                 "the index is damaged: rebuild it")
            p.embeddings("images", m["dim"])
            if p.captions:
                p.embeddings("captions", m["dim"])
                if f[P.TEXT_META].exists() and parquet_rows(f[P.TEXT_META]) != p.captions:
                    raise ValueError(f"{f[P.TEXT_META]}: rows differ from the {p.captions} captions {INDEX_META} "
                                     f"counts for part {p.name}; the index is damaged: rebuild it")
        return v

    def reload_if_changed(self) -> bool:
        """Reopen when index.json names another version (an add finished): True when it
        switched. Cheap (one stat) when nothing changed; a new index.json that does not open
        keeps the old version serving (logged)."""
        stamp = meta_stamp(self.folder)
        if stamp is None or stamp == self._v.stamp:
            return False
        try:
            new = self._open()
        except (ValueError, OSError) as e:
            logger.error("%s changed but does not open (%s): still serving version %s", self.folder / INDEX_META,
                         e, self.version)
            self._v.stamp = stamp
            return False
        if new.meta.get("version") == self.version:
            self._v.stamp = new.stamp
            return False
        new.meta["model"] = self.meta["model"]
        old, self._v = self._v, new
        logger.info("%s: version %s -> %s (%d images)", self.folder, old.meta.get("version"), self.version,
                    self.count("images"))
        return True

    # ---------------------------------------------------------------- description

    @property
    def meta(self) -> dict:
        return self._v.meta

    @property
    def fingerprint(self) -> str:
        return self.meta["model_fingerprint"]

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def version(self) -> Optional[str]:
        return self.meta.get("version")

    def count(self, kind: str = "images") -> int:
        """How many rows of `kind` the index holds (skipped rows included)."""
        return int(self.meta["count"].get(kind, 0))

    def search_info(self, kind: str = "images") -> dict:
        """What index.json records of `kind`'s search structure ({"type": "exact"} or faiss's choice)."""
        return dict(self.meta.get("search", {}).get(kind) or {"type": "exact"})

    # ---------------------------------------------------------------- paths and the model

    def resolve_path(self, p: str) -> str:
        """A path the index recorded, as usable from here: relative paths are read against
        the index folder where that exists, else against where the index was built
        (`built_in`: the images stayed, the index moved); absolute paths and URLs as written."""
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
        folder and the images folder recorded at build time (`images_root`). A folder less
        than two levels deep (/, /home) is never one: such an index's pictures outside its
        folder need serve --images-root."""
        roots = [os.path.abspath(self.folder)]
        rec = self.meta.get("images_root")
        root = os.path.abspath(self.resolve_path(rec)) if isinstance(rec, str) and rec else None
        if root is not None and deep_enough(root):
            roots.append(root)
        elif root is not None:
            logger.warning("%s: the images folder %s is too broad to serve pictures from by default; "
                           "name the folders with --images-root", self.folder / INDEX_META, root)
        return roots

    def candidates(self, p: str) -> list[str]:
        """Where a recorded path may be, in the order `resolve_path` tries them."""
        if not self.relative or not p or os.path.isabs(p) or "://" in p or p.startswith("pipe:"):
            return [p]
        places = [os.path.normpath(os.path.join(os.path.abspath(self.folder), p))]
        built = self.meta.get("built_in")
        if isinstance(built, str) and os.path.isabs(built):
            places.append(os.path.normpath(os.path.join(built, p)))
        return places

    def check_model(self, model) -> None:
        """Refuse a model other than the one that built the index (fingerprint, width)."""
        from phoclip.models.pretrained import model_fingerprint  # lazy: opening an index needs no model code

        fp = getattr(model, "fingerprint", None) or model_fingerprint(model)  # ONNX: recorded at export
        if fp != self.fingerprint:
            raise ValueError(f"index {self.folder} was built with model {self.fingerprint} "
                             f"({self.meta.get('model')}), not {fp}: rebuild the index or search "
                             "with the model that built it")
        dim = model.config.get("embed_dim")
        if dim != self.dim:
            raise ValueError(f"index {self.folder} holds {self.dim}-wide embeddings, the model "
                             f"makes {dim}-wide ones: rebuild the index with this model")

    # ---------------------------------------------------------------- items (lazy)

    def _locate(self, v: _Version, kind: str, i: int) -> tuple[P.Part, int]:
        starts = v.starts[kind]
        if not 0 <= i < starts[-1]:
            raise IndexError(f"index {self.folder}: no {kind} id {i}")
        j = int(np.searchsorted(starts, i, side="right")) - 1
        return v.parts[j], i - int(starts[j])

    def _row(self, v: _Version, kind: str, part: P.Part, r: int) -> dict:
        f = part.files()
        path = f[P.META] if kind == "images" or not f[P.TEXT_META].exists() else f[P.TEXT_META]
        key = (kind, part.name)
        with v.lock:
            rd = v.readers.get(key)
            if rd is None:
                rd = v.readers[key] = MetadataReader(path, max_group_bytes=MAX_ROW_GROUP_BYTES)
        return rd.row(r)

    def raw_item(self, kind: str, i: int) -> dict:
        """Item `i` of `kind` as stored (paths as recorded)."""
        v = self._v
        part, r = self._locate(v, kind, i)
        row = dict(self._row(v, kind, part, r))
        if kind == "captions":
            if "image_row" in row:  # ours: which image of the part it describes
                ir = row.pop("image_row")
                row["image"] = part.start + int(ir) if isinstance(ir, int) and 0 <= ir < part.rows else None
            else:  # clip-retrieval: row-aligned with the images
                row = {"caption": row.get("caption"), "image_key": row.get("key") or row.get("image_path"),
                       "image": part.start + r}
            return row
        row.setdefault("image_path", None)
        row["path"] = row.pop("image_path") or ""
        row["key"] = row.get("key") or row["path"]
        for k in ("caption", "url", "source", "shard"):
            row[k] = row.get(k) or ""
        return row

    def item(self, kind: str, i: int) -> dict:
        """Item `i` of `kind`: images {key, path, source, shard, caption, url, ...} with
        their local `path`/`shard` usable from here; captions {caption, image_key, image}."""
        it = self.raw_item(kind, i)
        if kind == "images":
            for k in path_keys(it):
                if isinstance(it.get(k), str):
                    it[k] = self.resolve_path(it[k])
        return it

    def items_for(self, kind: str, ids: Sequence[int]) -> list[dict]:
        """The items of `ids` (read a row group at a time; the whole metadata never is)."""
        return [self.item(kind, int(i)) for i in ids]

    def recorded(self, kind: str, i: int) -> dict:
        """Item `i` of `kind`'s path keys as the index recorded them (relative to the index
        folder): what may be shown to others, where the resolved paths are local."""
        it = self.raw_item(kind, i)
        return {k: it.get(k) for k in path_keys(it)}

    def items(self, kind: str) -> list[dict]:
        """Every item of `kind` (small indices, the tags listing and the projector; large
        ones use `item`/`items_for`)."""
        return self.items_for(kind, range(self.count(kind)))

    # ---------------------------------------------------------------- vectors

    def _parts_of(self, v: _Version, kind: str) -> list[tuple[int, np.ndarray]]:
        out = []
        for p in v.parts:
            n = p.rows if kind == "images" else p.captions
            if n:
                out.append((p.start if kind == "images" else p.cap_start, p.embeddings(kind, self.dim)))
        return out

    def _check_kind(self, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        if kind == "captions" and self.count("captions") == 0:
            raise FileNotFoundError(f"index {self.folder} has no captions (built from {self.meta.get('source')}); "
                                    "rebuild it from shards to search captions")

    def vectors(self, kind: str, ids: Sequence[int]) -> np.ndarray:
        """float32 rows of `ids` read from the memory-mapped parts."""
        v = self._v
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        groups: dict[int, tuple[P.Part, list[int], list[int]]] = {}
        for j, i in enumerate(ids):
            part, r = self._locate(v, kind, int(i))
            g = groups.setdefault(id(part), (part, [], []))
            g[1].append(j)
            g[2].append(r)
        for part, where, rows in groups.values():
            out[where] = part.read(kind, self.dim, rows)
        return out

    def _in_ram(self, v: _Version, kind: str) -> Optional[torch.Tensor]:
        """The fp32 matrix of `kind` when it fits RAM_EXACT_BYTES (bad rows zeroed), else None."""
        with v.lock:
            if kind not in v.matrix:
                n = self.count(kind)
                if n * self.dim * 4 > RAM_EXACT_BYTES:
                    v.matrix[kind] = None
                else:
                    where = self.folder / (P.IMG if kind == "images" else P.TEXT)
                    v.matrix[kind], v.bad[kind] = load_matrix(self._parts_of(v, kind), n, self.dim, where)
            return v.matrix[kind]

    def embeddings(self, kind: str) -> torch.Tensor:
        """The [N, dim] fp32 embeddings of `kind` in memory, rows listed by `bad_ids`
        zeroed: for indices that fit RAM_EXACT_BYTES (tags, maps, similar items)."""
        self._check_kind(kind)
        x = self._in_ram(self._v, kind)
        if x is None:
            raise ValueError(f"index {self.folder}: {self.count(kind)} {kind} do not fit in memory as one matrix; "
                             "use search() or vectors()")
        return x

    def bad_ids(self, kind: str) -> torch.Tensor:
        """Ids of the rows of `kind` that are not finite unit vectors (never returned)."""
        self._check_kind(kind)
        v = self._v
        if kind not in v.bad:
            if self._in_ram(v, kind) is None:
                v.bad[kind] = streamed_bad_ids(self._parts_of(v, kind))
        return v.bad[kind]

    # ---------------------------------------------------------------- search

    def topk(self, queries, k: int = 25, kind: str = "images", backend: str = "auto",
             rerank: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k scores and ids ([q, k'] tensors, k' <= k) for each query row. `backend`:
        "auto" (what index.json chose), "exact" or "faiss" (the same; exact through faiss
        where no approximate index was built). Bad rows are never returned."""
        self._check_kind(kind)
        v = self._v
        q = torch.as_tensor(np.asarray(queries, dtype=np.float32) if not torch.is_tensor(queries) else queries).float()
        if q.ndim == 1:
            q = q[None]
        if q.shape[1] != self.dim:
            raise ValueError(f"queries are {q.shape[1]}-wide, the index {self.folder} is {self.dim}-wide")
        k = min(int(k), self.count(kind))
        if k <= 0:
            return torch.empty(q.shape[0], 0), torch.empty(q.shape[0], 0, dtype=torch.long)
        info = self.search_info(kind)
        if backend in ("auto", "ann") and info.get("type") == "faiss":
            from phoclip.search import ann  # lazy: faiss loads only for an index that uses it

            index = self._ann(v, kind, info)
            s, i = ann.search(index, q.numpy(), k, info, self._rerank_fn(kind) if rerank is not False and
                              (rerank or info.get("rerank")) else None, count=self.count(kind))
            return torch.from_numpy(s), torch.from_numpy(i)
        return self._exact(v, kind, q, k)

    def _rerank_fn(self, kind: str):
        def fn(ids: np.ndarray) -> np.ndarray:
            return self.vectors(kind, ids.tolist())
        return fn

    def _ann(self, v: _Version, kind: str, info: dict):
        from phoclip.search import ann  # lazy: faiss loads only for an index that uses it

        with v.lock:
            if kind not in v.ann:
                v.ann[kind] = ann.open_index(self.folder / VERSIONS / self.version, info, self.count(kind), self.dim)
            return v.ann[kind]

    def _exact(self, v: _Version, kind: str, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._in_ram(v, kind)
        if x is not None:
            return matrix_topk(q, x, v.bad[kind], k)
        return streamed_topk(q, self._parts_of(v, kind), k)

    def search(self, queries, k: int = 25, kind: str = "images", backend: str = "auto",
               rerank: Optional[bool] = None) -> list[list[Match]]:
        """The k best items of `kind` for each query row ([q, dim] tensor or array)."""
        s, i = self.topk(queries, k, kind, backend, rerank)
        return [[Match(r + 1, float(s[a, r]), int(i[a, r]), self.item(kind, int(i[a, r]))) for r in range(s.shape[1])]
                for a in range(s.shape[0])]


def open_index(path: str | os.PathLike) -> EmbeddingIndex:
    """Open an index folder (memory-mapped: the vectors stay on disk)."""
    return EmbeddingIndex(path)


def write_index(folder: str | os.PathLike, model, model_name: str, images: Optional[torch.Tensor],
                image_items: list[dict], captions: Optional[torch.Tensor] = None,
                caption_items: Optional[list[dict]] = None, source: str = "") -> Path:
    """Write a small index in one part with exact search, whole or not at all: into a
    temporary folder beside it, then renamed over the old index. Items are
    {key, path, source, shard, caption, url} for images and {caption, image_key, image} for
    captions; local paths are written relative to the index folder, with the folder's
    absolute path at build time (`built_in`), so that the index works from any directory
    and when moved with its images (`EmbeddingIndex.resolve_path`)."""
    out = Path(folder)
    check_out_folder(out)  # the folder is replaced whole below
    out.parent.mkdir(parents=True, exist_ok=True)
    # a new folder under a random name (mkdtemp: created exclusively, never a planted link)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    os.chmod(tmp, 0o755)
    home = os.path.abspath(out)
    try:
        img = images if images is not None else torch.zeros(0, int(model.config["embed_dim"]))
        if len(image_items) != img.shape[0]:
            raise ValueError(f"{len(image_items)} images items for {img.shape[0]} embeddings")
        if captions is not None and len(caption_items or []) != captions.shape[0]:
            raise ValueError(f"{len(caption_items or [])} captions items for {captions.shape[0]} embeddings")
        name = P.part_name(0)
        with P.PartWriter(tmp, name, img.shape[1], captions is not None) as w:
            w.add(img.to(torch.float16).numpy(), image_rows(image_items, home),
                  None if captions is None else captions.to(torch.float16).numpy(),
                  caption_rows(caption_items or [], image_items, 0))
            rec = w.close({"source": source, "part": 0, "of": 1})
        meta = index_meta(model, model_name, home, source, images_root(source, image_items))
        meta.update(count={"images": rec["rows"], "captions": rec["captions"]},
                    parts=[P.check_part(tmp, name, meta["dim"])], version=new_version(tmp, None),
                    search={k: {"type": "exact"} for k in KINDS})
        real_dir(tmp / VERSIONS / meta["version"])
        atomic_write_json(tmp / INDEX_META, meta, indent=2)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old.{secrets.token_hex(8)}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(out.parent)
    return out


def _is_model(path: str) -> bool:
    """Whether `path` holds a model `phoclip.models.loading.load_encoder` can load: a model
    folder, a run folder (its model/ or checkpoints/), a checkpoint, an ONNX export."""
    from phoclip.models.loading import model_folder  # lazy: opening an index needs no model code

    p = Path(path)
    try:
        return (model_folder(p) is not None or (p / "checkpoints").is_dir() or (p / "meta.json").is_file()
                or (p.name == "onnx" and model_folder(p.parent) is not None))
    except OSError:  # a name too long, a folder we may not read
        return False
