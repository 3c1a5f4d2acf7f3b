"""The named indices a service answers from. Each name holds one `ServedIndex`: an
`EmbeddingIndex` opened for one version of its folder, with what the routes ask of it
(search, items by id, single stored vectors, its picture cache). A request takes the
object once and keeps it to its end; a reload opens a fresh one beside it and swaps the
reference, so a request in flight never sees its index change under it, and a failed
reload leaves the old one serving (`EmbeddingIndex.reload_if_changed` switches one
object in place; a request between its search and its items would straddle versions).

The service never loads an index's embedding matrix itself: it searches through
`EmbeddingIndex.topk`, reads items through `items_for`, and reads the few stored rows it
needs (more like this, tags of an indexed image, de-duplication) through `vectors`, from
the memory-mapped parts."""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from phoclip.data.text import strip_controls
from phoclip.errors import EXPECTED_ERRORS, one_line
from phoclip.search.exact import NORM_TOLERANCE
from phoclip.search.index import EmbeddingIndex
from phoclip.search.meta import INDEX_META
from phoclip.serve.picture_cache import PictureCache, default_roots

logger = logging.getLogger(__name__)

IMAGES, CAPTIONS = "images", "captions"
# the embedding files of each kind: clip-retrieval's layout of parts, else one file
PART_FILES = {IMAGES: ("img_emb", "img_emb_*.npy"), CAPTIONS: ("text_emb", "text_emb_*.npy")}
MAX_CAPTION_MAP = 200_000  # caption rows read to list an image's captions (a larger index lists its own only)
SCAN_BYTES = 1 << 30  # an index whose vectors take more is never read whole by the service


def _signature(folder: str) -> Optional[tuple]:
    """What changes when an index is replaced (index.json is written atomically: a new
    inode), cheap enough to ask every few seconds; None when it is not there."""
    try:
        st = os.stat(os.path.join(folder, INDEX_META))
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _text(x) -> str:
    return strip_controls(str(x or ""))


class ServedIndex:
    """One version of one named index, as the routes use it (immutable once opened)."""

    def __init__(self, name: str, folder: str, images_roots: Sequence[str] = ()) -> None:
        self.name, self.folder = name, folder
        self.signature = _signature(folder)  # taken first: a change during the open is seen next time
        self.index = EmbeddingIndex(folder)
        self.dim, self.version = self.index.dim, self.index.version
        self.fingerprint = self.index.fingerprint
        self._counts = {k: self._count(k) for k in (IMAGES, CAPTIONS)}
        self._captions_of: Optional[dict[int, list[str]]] = None
        self.bytes = sum(f.stat().st_size for kind in (IMAGES, CAPTIONS) for f in self._emb_files(kind))
        self.skipped: Optional[int] = None  # counted by `prepare`, once the model is known to fit
        roots = list(images_roots) or default_roots(self.index)
        self.pictures = PictureCache(lambda i: self.items_for(IMAGES, [i])[0], roots)

    # ------------------------------------------------------------------ sizes

    def _count(self, kind: str) -> int:
        return int(self.index.count(kind))

    def count(self, kind: str = IMAGES) -> int:
        return self._counts[kind]

    def prepare(self) -> "ServedIndex":
        """What the first query would otherwise do, done before this index serves."""
        self.skipped = self._skipped()
        return self

    def _skipped(self) -> Optional[int]:
        """Image rows not served (not finite unit vectors) where knowing it costs no more
        than the first exact search would (an index searched in memory); else None
        (counting them would read every vector)."""
        if not self.count(IMAGES):
            return 0
        if self.count(IMAGES) * self.dim * 4 > SCAN_BYTES:
            return None
        # done here, once, where the service opens the index, not by the first query
        return len(self.index.bad_ids(IMAGES))

    def has(self, i: int, kind: str = IMAGES) -> bool:
        return 0 <= i < self.count(kind)

    # ------------------------------------------------------------------ search and items

    def search(self, emb: torch.Tensor, k: int, kind: str = IMAGES) -> list[tuple[float, int]]:
        """(score, id) of the k rows of `kind` nearest the one query `emb` [1, dim], best
        first; rows the index skipped and non-finite scores never appear."""
        k = min(k, self.count(kind))
        if k <= 0:
            return []
        s, i = self.index.topk(emb, k, kind)  # scores and ids only: the items shown are read after
        pairs = [(float(s[0, r]), int(i[0, r])) for r in range(s.shape[1])]
        return [(s, i) for s, i in pairs if i >= 0 and np.isfinite(s)]

    def items_for(self, kind: str, ids: Sequence[int]) -> list[dict]:
        """The items of rows `ids` of `kind` (dicts with path or shard+key, caption, ...)."""
        # no lock: the index's metadata readers are safe from several threads (rows from the
        # memory-mapped Arrow copy; a part read from its parquet takes that part's own lock)
        return [_with_path(it) for it in self.index.items_for(kind, list(ids))]

    def shown_path(self, kind: str, i: int, item: dict) -> str:
        """Item `i`'s file as the index recorded it (relative to the index folder), never
        the server's absolute path (a shard's item: its name in the source dataset)."""
        if item.get("shard"):
            return _text(item.get("path"))
        return _text(self.index.recorded(kind, i).get("path"))

    def captions_of(self, i: int, item: dict) -> list[str]:
        """The captions of indexed image `i`: its own, those its item lists, and caption
        rows pointing at it (read once, for an index of at most MAX_CAPTION_MAP of them)."""
        caps = [_text(item.get("caption"))]
        if isinstance(item.get("captions"), list):
            caps += [_text(c) for c in item["captions"]]
        return caps + self._caption_map().get(i, [])

    def _caption_map(self) -> dict[int, list[str]]:
        if self._captions_of is None:
            m: dict[int, list[str]] = {}
            n = self.count(CAPTIONS)
            if 0 < n <= MAX_CAPTION_MAP:
                for it in self.items_for(CAPTIONS, range(n)):
                    j = it.get("image")
                    if isinstance(j, int) and not isinstance(j, bool) and self.has(j):
                        m.setdefault(j, []).append(_text(it.get("caption")))
            self._captions_of = m
        return self._captions_of

    def image_of(self, kind: str, i: int, item: dict) -> int:
        """The image row a row of `kind` shows: itself, or the image a caption row names."""
        if kind == CAPTIONS:
            j = item.get("image")
            if isinstance(j, int) and not isinstance(j, bool) and self.has(j):
                return j
        return i

    # ------------------------------------------------------------------ stored vectors

    def _emb_files(self, kind: str) -> list[Path]:
        sub, pattern = PART_FILES[kind]
        return sorted((Path(self.folder) / sub).glob(pattern))

    def vectors(self, kind: str, ids: Sequence[int]) -> np.ndarray:
        """[len(ids), dim] float32 stored rows (read from the memory-mapped files, nothing
        else loaded); a row that is not a finite unit vector, or not there, comes back as NaN."""
        out = np.full((len(ids), self.dim), np.nan, dtype=np.float32)
        there = [n for n, i in enumerate(ids) if self.has(i, kind)]
        if there:
            out[there] = self.index.vectors(kind, [ids[n] for n in there])
        norm = np.linalg.norm(out, axis=1)
        with np.errstate(invalid="ignore"):
            bad = ~(np.isfinite(norm) & (np.abs(norm - 1) <= NORM_TOLERANCE))
        out[bad] = np.nan
        return out

    def usable(self, i: int) -> bool:
        """Whether indexed image `i` exists and its stored row is a finite unit vector."""
        return self.has(i) and bool(np.isfinite(self.vectors(IMAGES, [i])).all())


def _with_path(item: dict) -> dict:
    """An item as the picture reader wants it: clip-retrieval's `image_path` as `path`."""
    if "path" not in item and isinstance(item.get("image_path"), str):
        return dict(item, path=item["image_path"])
    return item


class Indices:
    """Name -> the `ServedIndex` serving it. `get` hands out the current object;
    `reload_changed` (a background task every few seconds) opens a changed folder again
    beside the old one and swaps the reference whole."""

    def __init__(self, opened: Mapping[str, ServedIndex], opener: Callable[[str, str], ServedIndex]) -> None:
        self._served: dict[str, ServedIndex] = dict(opened)  # replaced, never changed in place
        self._opener = opener
        self._failed: dict[str, Optional[tuple]] = {}  # name -> signature whose open failed (logged once)
        self._missing: set[str] = set()  # names whose index.json was missing at the last check
        self._lock = threading.Lock()  # one reload at a time

    def names(self) -> list[str]:
        return list(self._served)

    def get(self, name: Optional[str] = None) -> ServedIndex:
        """The index called `name` (None or "": the first); KeyError for another name."""
        served = self._served
        if not name:
            return next(iter(served.values()))
        return served[name]

    def all(self) -> list[ServedIndex]:
        return list(self._served.values())

    def reload_changed(self) -> list[str]:
        """Open again every index whose folder changed since it was opened; the names
        reloaded. A failed open is logged in one line (once per change) and the old
        version keeps serving."""
        done = []
        with self._lock:
            for name, old in list(self._served.items()):
                sig = _signature(old.folder)
                if sig is None and name not in self._missing:
                    self._missing.add(name)  # mid-replace (a folder renamed over another): asked again next time
                    continue
                if sig is not None:
                    self._missing.discard(name)
                if sig == old.signature or (name in self._failed and self._failed[name] == sig):
                    continue
                try:
                    fresh = self._opener(name, old.folder)
                except EXPECTED_ERRORS as e:
                    self._failed[name] = sig
                    logger.error("index %s (%s) changed but does not open: %s; still serving version %s",
                                 name, old.folder, strip_controls(one_line(e))[:300], old.version)
                    continue
                self._failed.pop(name, None)
                self._served = {**self._served, name: fresh}
                done.append(name)
                logger.info("index %s reloaded: version %s, %d images (was %s, %d)", name, fresh.version,
                            fresh.count(IMAGES), old.version, old.count(IMAGES))
        return done
