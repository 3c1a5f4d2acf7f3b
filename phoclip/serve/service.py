"""The loaded model and index, and what the routes ask of them (called in worker
threads: every method may run on several at once)."""
from __future__ import annotations

import io
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import torch
from fastapi import HTTPException

from phoclip.gallery import load_item_bytes
from phoclip.images import decode_rgb
from phoclip.index import EmbeddingIndex
from phoclip.search import DEFAULT_TEMPLATES, caption_matches, embed_images, embed_texts, tag_embeddings
from phoclip.serve.settings import MAX_UPLOAD_PIXELS, PHOTO_SIZE, THUMB_SIZE, Settings
from phoclip.text import strip_controls

logger = logging.getLogger(__name__)

MAX_CACHED_BYTES = 64 << 20  # JPEGs kept in memory (thumbnails ~10 kB, detail photos ~100 kB)
MAX_ITEM_CAPTIONS = 50  # the detail view lists at most so many captions of one image


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
                 device: str = "auto", vncorenlp_dir: Optional[str] = None) -> None:
        import phoclip

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
        self._pictures: OrderedDict = OrderedDict()
        self._pictures_lock = threading.Lock()
        self._cached_bytes = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> "Service":
        return cls(settings.index, settings.model, settings.backend, settings.device, settings.vncorenlp_dir)

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
                "caption": _text(it.get("caption")), "path": _text(it.get("path")), "thumb": f"/thumb/{i}"}

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
        return {"id": i, "key": _text(it.get("key")), "path": "" if shard else _text(it.get("path")),
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
        im = decode_upload(load_item_bytes(self.items[i], max_bytes=max_source), max_decode_bytes)
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

    def photo(self, i: int, max_source: int, max_decode_bytes: int) -> bytes:
        return self.thumbnail(i, max_source, max_decode_bytes, PHOTO_SIZE)
