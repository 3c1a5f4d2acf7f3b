"""The loaded model and index, and what the routes ask of them (called in worker
threads: every method may run on several at once)."""
from __future__ import annotations

import io
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from fastapi import HTTPException

from phoclip.errors import one_line
from phoclip.search.gallery import load_item_bytes
from phoclip.data.images import decode_rgb
from phoclip.search.index import EmbeddingIndex
from phoclip.search.query import DEFAULT_TEMPLATES, caption_matches, embed_images, embed_texts, tag_embeddings
from phoclip.serve.settings import MAX_UPLOAD_PIXELS, PHOTO_SIZE, THUMB_SIZE, Settings
from phoclip.data.text import strip_controls

logger = logging.getLogger(__name__)

MAX_CACHED_BYTES = 64 << 20  # JPEGs kept in memory (thumbnails and detail photos)
MAX_ITEM_CAPTIONS = 50  # the detail view lists at most so many captions of one image
MAX_FAILED = 100_000  # items whose picture failed, remembered (not re-read on every request)
FAILED_TTL = 600.0  # seconds a failure is remembered (a file put back is served again)


class PictureUnavailable(LookupError):
    """An indexed item's picture cannot be served (outside the allowed folders, missing,
    broken, too large); logged once, when it first failed."""


def decode_upload(data: bytes, max_decode_bytes: int):
    """An RGB image from untrusted bytes: the upload pixel cap and the decoded-bytes cap,
    both from the header alone, then the decode (`decode_rgb`). Raises BadImage."""
    return decode_rgb(data, MAX_UPLOAD_PIXELS, max_decode_bytes)


def _finite(emb: torch.Tensor, what: str) -> torch.Tensor:
    if not bool(torch.isfinite(emb).all()):
        logger.error("the model gave a non-finite %s embedding", what)
        raise HTTPException(500, f"the model gave a non-finite {what} embedding (logged)")
    return emb


def _int_or_none(x: Any) -> Optional[int]:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _text(x: Any) -> str:
    return strip_controls(str(x or ""))


class Service:
    """The model, index and query processor, loaded once and probed: a model whose
    embeddings do not fit the index is refused here, not answered with a 500 for every
    query. The model is loaded by `phoclip.load` (a model folder, a run folder or a
    checkpoint; its ONNX export with backend="onnx")."""

    def __init__(self, index_dir: str, model: Optional[str] = None, backend: str = "torch",
                 device: str = "auto", vncorenlp_dir: Optional[str] = None,
                 images_roots: Sequence[str] = ()) -> None:
        import phoclip

        for r in images_roots:
            if not os.path.isdir(r):
                raise NotADirectoryError(f"images root {r}: not a folder (serve --images-root)")
        self.backend = backend
        self.index = EmbeddingIndex(index_dir)
        name = model or self.index.meta["model"]
        loaded = phoclip.load(name, backend, device, vncorenlp_dir=vncorenlp_dir)
        # onnxruntime takes host tensors (its own providers pick the device): loaded.device is the CPU
        self.model, self.device = loaded.module, loaded.device
        self.index.check_model(self.model)
        self.proc = loaded.text_processor
        self.size = loaded.image_size
        self.items = self.index.items("images")
        self.has_captions = self.index.meta["count"].get("captions", 0) > 0
        self.index.embeddings("images")  # load (and check) now, not at the first query
        self._captions_of: dict[int, list[str]] = {}
        if self.has_captions:
            self.index.embeddings("captions")
            for it in self.index.items("captions"):
                i = _int_or_none(it.get("image"))
                if i is not None and 0 <= i < len(self.items):
                    self._captions_of.setdefault(i, []).append(_text(it.get("caption")))
        self.index_bytes = sum(f.stat().st_size for f in Path(index_dir).glob("*.npy") if f.is_file())
        self._probe(name, backend)
        # which model answers, and why that one (an index names its model; said once it is loaded)
        logger.info("%s", strip_controls(self.index.model_line(model)))
        self._pictures: OrderedDict = OrderedDict()
        self._pictures_lock = threading.Lock()
        self._cached_bytes = 0
        # pictures are read only from under these folders (real paths: a link inside one
        # that points elsewhere is outside); default: the index folder and the images folder
        self.roots = [os.path.realpath(r) for r in (images_roots or self.index.image_roots())]
        logger.info("pictures served from: %s", strip_controls(", ".join(self.roots)))
        self._failed: OrderedDict = OrderedDict()  # item id -> (monotonic time, reason)
        self.picture_failures: Counter = Counter()  # reason -> items refused

    @classmethod
    def from_settings(cls, settings: Settings) -> "Service":
        return cls(settings.index, settings.model, settings.backend, settings.device, settings.vncorenlp_dir,
                   settings.images_roots)

    def _probe(self, name: str, backend: str) -> None:
        """One text and one image through the encoders: output that does not fit the
        index (width, NaN) is refused now, not answered with a 500 for every query."""
        from PIL import Image

        dim = self.index.meta["dim"]
        for what, emb in (("text", embed_texts(self.model, self.proc, ["kiểm tra"], self.device)),
                          ("image", embed_images(self.model, [Image.new("RGB", (self.size, self.size))],
                                                 self.size, self.device))):
            if tuple(emb.shape) != (1, dim) or not bool(torch.isfinite(emb).all()):
                raise ValueError(f"{name} ({backend}): its {what} encoder gives {tuple(emb.shape)} "
                                 f"{'finite' if torch.isfinite(emb).all() else 'non-finite'} embeddings "
                                 f"for one probe input; the index {self.index.folder} holds {dim}-wide ones")

    # ------------------------------------------------------------------ what the routes ask

    @property
    def skipped(self) -> int:
        return len(self.index.bad_ids("images"))

    def usable(self, item_id: int) -> bool:
        """Whether indexed image `item_id` has an embedding (its row was not skipped)."""
        return 0 <= item_id < len(self.items) and not bool((self.index.bad_ids("images") == item_id).any())

    def _image_hit(self, rank: int, score: float, i: int) -> dict:
        it = self.items[i]
        return {"rank": rank, "score": round(score, 4), "id": i, "key": _text(it.get("key")),
                "caption": _text(it.get("caption")), "path": self._shown_path(i), "thumb": f"/thumb/{i}"}

    def _shown_path(self, i: int) -> str:
        """Item `i`'s file as the index recorded it (relative to the index folder), never
        the server's absolute path (a shard's item: its name in the source dataset)."""
        it = self.items[i]
        return _text(it.get("path") if it.get("shard") else self.index.recorded("images", i).get("path"))

    def _image_hits(self, emb: torch.Tensor, k: int, offset: int = 0, exclude: Optional[int] = None) -> list[dict]:
        """Ranks offset+1.. of the images nearest `emb`: one hit per picture (an image
        indexed twice, same key and path, is listed once) and never `exclude`."""
        extra = 1 if exclude is not None else 0
        s, i = self.index.search(emb, (k + offset + extra) * 2, "images")
        seen, hits = set(), []
        for r in range(s.shape[1]):
            j = int(i[0, r])
            it = self.items[j]
            same = (str(it.get("key", "")), str(it.get("path", "")), str(it.get("shard", "")))
            if j == exclude or same in seen:
                continue
            seen.add(same)
            hits.append((float(s[0, r]), j))
            if len(hits) == k + offset:
                break
        return [self._image_hit(n + 1, sc, j) for n, (sc, j) in enumerate(hits) if n >= offset]

    def search_text(self, q: str, k: int, offset: int) -> list[dict]:
        emb = _finite(embed_texts(self.model, self.proc, [q], self.device), "text")
        return self._image_hits(emb, k, offset)

    def similar(self, item_id: int, k: int, offset: int) -> list[dict]:
        """Image → image from an indexed picture (its stored embedding: no model call)."""
        return self._image_hits(self.index.embeddings("images")[item_id][None], k, offset, exclude=item_id)

    def search_image(self, img, k: int) -> dict:
        emb = _finite(embed_images(self.model, [img], self.size, self.device), "image")
        out = {"images": self._image_hits(emb, k), "captions": []}
        if self.has_captions:  # distinct captions: one caption of several images is listed once
            out["captions"] = [{"rank": m.rank, "score": round(m.score, 4), "caption": _text(m.item.get("caption")),
                                "image": _int_or_none(m.item.get("image"))}
                               for m in caption_matches(self.index, emb, k)[0]]
        return out

    def key(self, i: int) -> str:
        """Indexed image `i`'s key (its name in the index)."""
        return _text(self.items[i].get("key"))

    def item(self, i: int) -> dict:
        """Indexed image `i`: key, path, source and its distinct captions."""
        it = self.items[i]
        caps, seen = [], set()
        for c in [_text(it.get("caption")), *self._captions_of.get(i, [])]:
            norm = " ".join(c.split()).casefold()
            if norm and norm not in seen:
                seen.add(norm)
                caps.append(c)
        shard = _text(it.get("shard"))
        # a shard's item records its source's path, not a file here: the shard is where it is
        return {"id": i, "key": _text(it.get("key")), "path": "" if shard else self._shown_path(i),
                "shard": os.path.basename(shard), "source": _text(it.get("source")),
                "captions": caps[:MAX_ITEM_CAPTIONS],
                "thumb": f"/thumb/{i}", "photo": f"/photo/{i}"}

    def tags(self, tags: list[str], k: int, img=None, item_id: Optional[int] = None) -> list[dict]:
        W = _finite(tag_embeddings(self.model, tags, self.proc, DEFAULT_TEMPLATES), "text")
        if img is not None:
            emb = _finite(embed_images(self.model, [img], self.size, self.device)[0], "image")
        else:
            emb = self.index.embeddings("images")[item_id]
        sc = W @ emb.float()
        top = sc.topk(min(k, len(tags)))
        return [{"tag": tags[int(j)], "score": round(float(v), 4)} for v, j in zip(top.values, top.indices)]

    # ------------------------------------------------------------------ pictures

    def cached_picture(self, i: int, size: int = THUMB_SIZE) -> Optional[bytes]:
        with self._pictures_lock:
            if (i, size) in self._pictures:
                self._pictures.move_to_end((i, size))
                return self._pictures[(i, size)]
        return None

    def cached_thumbnail(self, i: int) -> Optional[bytes]:
        return self.cached_picture(i, THUMB_SIZE)

    def thumbnail(self, i: int, max_source: int, max_decode_bytes: int, size: int = THUMB_SIZE) -> bytes:
        """A JPEG of indexed image `i`, at most `size` pixels a side, its source read up to
        `max_source` bytes and refused over `max_decode_bytes` to decode."""
        data = self.cached_picture(i, size)
        if data is not None:
            return data
        with self._pictures_lock:
            failed = self._failed.get(i)
            if failed is not None and time.monotonic() - failed[0] < FAILED_TTL:
                raise PictureUnavailable(failed[1])
        try:
            self._check_root(i)
            im = decode_upload(load_item_bytes(self.items[i], max_bytes=max_source), max_decode_bytes)
        except Exception as e:  # noqa: BLE001 -- a moved, broken, oversized or foreign file: this item fails
            r = getattr(e, "reason", None)  # BadImage's reason, else the error's type
            reason = r if isinstance(r, str) and r else type(e).__name__
            why = one_line(e) if isinstance(r, str) else f"{type(e).__name__}: {one_line(e)}"
            why = strip_controls(why).replace("\n", " ")[:300]
            with self._pictures_lock:
                self._failed[i] = (time.monotonic(), why)
                self._failed.move_to_end(i)
                while len(self._failed) > MAX_FAILED:
                    self._failed.popitem(last=False)
                self.picture_failures[reason] += 1
            logger.warning("no %s for item %d: %s (not retried for %.0f s)", "thumbnail" if size <= THUMB_SIZE else "photo",
                           i, why, FAILED_TTL)
            raise PictureUnavailable(why) from None
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85 if size <= THUMB_SIZE else 90)
        data = buf.getvalue()
        with self._pictures_lock:
            if (i, size) not in self._pictures:
                self._pictures[(i, size)] = data
                self._cached_bytes += len(data)
            while self._cached_bytes > MAX_CACHED_BYTES:  # oldest first
                self._cached_bytes -= len(self._pictures.popitem(last=False)[1])
        return data

    def _check_root(self, i: int) -> None:
        """Refuse item `i` when its file (or shard) is not under one of `self.roots`."""
        from phoclip.data.images import BadImage
        from phoclip.data.remote import is_remote

        it = self.items[i]
        f = it.get("shard") or it.get("path")
        if not isinstance(f, str) or not f or is_remote(f):
            return  # nothing local to read here (load_item_bytes refuses remote and pipe: shards)
        real = os.path.realpath(f)
        if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in self.roots):
            raise BadImage("outside_roots", f"{f} is outside the folders pictures are served from "
                                            "(serve --images-root)")

    def photo(self, i: int, max_source: int, max_decode_bytes: int) -> bytes:
        return self.thumbnail(i, max_source, max_decode_bytes, PHOTO_SIZE)
