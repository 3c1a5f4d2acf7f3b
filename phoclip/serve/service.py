"""The loaded model over the named indices, and the queries the routes ask of them
(called in worker threads: every method may run on several at once). Each query is
given the `ServedIndex` its request took, and uses only that one."""
from __future__ import annotations

import logging
import math
import os
import urllib.parse
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from fastapi import HTTPException

import phoclip
from phoclip.data.text import strip_controls
from phoclip.models.embed import embed_images, embed_texts
from phoclip.search.query import DEFAULT_TEMPLATES, tag_embeddings
from phoclip.serve.indices import CAPTIONS, IMAGES, Indices, ServedIndex
from phoclip.serve.settings import named_indices

logger = logging.getLogger(__name__)

MAX_ITEM_CAPTIONS = 50  # the detail view lists at most so many captions of one image
DEDUP_WINDOW = 1000  # results compared with each other by `deduplicate` (the best ones)
DEDUP_COSINE = 0.94  # clip-retrieval's threshold: a result this close to a better one is dropped
# an item's keys that are never metadata for a client: local paths (shown as recorded
# instead), clip-retrieval's base64 picture, an item's caption list
_NOT_METADATA = frozenset({"path", "shard", "image", "image_path", "captions"})


def _finite(emb: torch.Tensor, what: str) -> torch.Tensor:
    if not bool(torch.isfinite(emb).all()):
        logger.error("the model gave a non-finite %s embedding", what)
        raise HTTPException(500, f"the model gave a non-finite {what} embedding (logged)")
    return emb


def _int_or_none(x: Any) -> Optional[int]:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _text(x: Any) -> str:
    return strip_controls(str(x or ""))


def _scalar(v: Any) -> Any:
    """A metadata value as strict JSON: text cleaned, numbers finite (else null); lists,
    dicts and other objects dropped (None)."""
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, str):
        return strip_controls(v)
    return None


class Service:
    """The model and the named indices, loaded once and probed: a model whose
    embeddings do not fit an index is refused here, not answered with a 500 for every
    query. `index` is a folder, `NAME=PATH` specs or {name: folder} (the first is the
    default); the model is `model`, else the one the first index was built with, loaded
    by `phoclip.load` (a model folder, a run folder or a checkpoint; its ONNX export with
    backend="onnx"). Every index must be built with that model."""

    def __init__(self, index: str | Sequence[str] | Mapping[str, str], model: Optional[str] = None,
                 backend: str = "torch", device: str = "auto", vncorenlp_dir: Optional[str] = None,
                 images_roots: Sequence[str] = ()) -> None:
        for r in images_roots:
            if not os.path.isdir(r):
                raise NotADirectoryError(f"images root {r}: not a folder (serve --images-root)")
        specs = named_indices(index)
        self.backend, self.images_roots = backend, tuple(images_roots)
        names = list(specs)
        first = ServedIndex(names[0], specs[names[0]], self.images_roots)
        name = model or first.index.meta["model"]
        loaded = phoclip.load(name, backend, device, vncorenlp_dir=vncorenlp_dir)
        # onnxruntime takes host tensors (its own providers pick the device): loaded.device is the CPU
        self.model, self.device = loaded.module, loaded.device
        self.proc, self.size = loaded.text_processor, loaded.image_size
        self.dim = first.dim
        opened = {names[0]: self._checked(first)}
        for n in names[1:]:
            opened[n] = self._open(n, specs[n])
        self._probe(name, backend, first)
        # which model answers, and why that one (an index names its model; said once it is loaded)
        logger.info("%s", strip_controls(first.index.model_line(model)))
        self.indices = Indices(opened, self._open)

    @classmethod
    def from_settings(cls, settings) -> "Service":
        return cls(settings.index, settings.model, settings.backend, settings.device, settings.vncorenlp_dir,
                   settings.images_roots)

    def _open(self, name: str, folder: str) -> ServedIndex:
        """Index `name` opened from `folder` and checked against the model (a reload too)."""
        return self._checked(ServedIndex(name, folder, self.images_roots))

    def _checked(self, served: ServedIndex) -> ServedIndex:
        served.index.check_model(self.model)
        served.prepare()
        logger.info("index %s: %d images, %d captions, version %s; pictures served from: %s", served.name,
                    served.count(IMAGES), served.count(CAPTIONS), served.version,
                    strip_controls(", ".join(served.pictures.roots)))
        return served

    def _probe(self, name: str, backend: str, served: ServedIndex) -> None:
        """One text and one image through the encoders: output that does not fit the
        index (width, NaN) is refused now, not answered with a 500 for every query."""
        from PIL import Image

        for what, emb in (("text", embed_texts(self.model, self.proc, ["kiểm tra"], self.device)),
                          ("image", embed_images(self.model, [Image.new("RGB", (self.size, self.size))],
                                                 self.size, self.device))):
            if tuple(emb.shape) != (1, self.dim) or not bool(torch.isfinite(emb).all()):
                raise ValueError(f"{name} ({backend}): its {what} encoder gives {tuple(emb.shape)} "
                                 f"{'finite' if torch.isfinite(emb).all() else 'non-finite'} embeddings "
                                 f"for one probe input; the index {served.folder} holds {self.dim}-wide ones")

    # ------------------------------------------------------------------ embeddings

    def embed_text(self, q: str) -> torch.Tensor:
        return _finite(embed_texts(self.model, self.proc, [q], self.device), "text")

    def embed_image(self, img) -> torch.Tensor:
        return _finite(embed_images(self.model, [img], self.size, self.device), "image")

    # ------------------------------------------------------------------ our own routes

    def _suffix(self, served: ServedIndex) -> str:
        """The query naming `served` in links to its pictures ("" for the default index)."""
        return "" if served.name == self.indices.names()[0] else "?index=" + urllib.parse.quote(served.name)

    def _image_hits(self, served: ServedIndex, emb: torch.Tensor, k: int, offset: int = 0,
                    exclude: Optional[int] = None) -> list[dict]:
        """Ranks offset+1.. of the images nearest `emb`: one hit per picture (an image
        indexed twice, same key and path, is listed once) and never `exclude`."""
        extra = 1 if exclude is not None else 0
        pairs = served.search(emb, (k + offset + extra) * 2, IMAGES)
        items = served.items_for(IMAGES, [j for _, j in pairs])
        seen, hits = set(), []
        for (score, j), it in zip(pairs, items):
            same = (str(it.get("key", "")), str(it.get("path", "")), str(it.get("shard", "")))
            if j == exclude or same in seen:
                continue
            seen.add(same)
            hits.append((score, j, it))
            if len(hits) == k + offset:
                break
        q = self._suffix(served)
        return [{"rank": n + 1, "score": round(sc, 4), "id": j, "key": _text(it.get("key")),
                 "caption": _text(it.get("caption")), "path": served.shown_path(IMAGES, j, it), "thumb": f"/thumb/{j}{q}"}
                for n, (sc, j, it) in enumerate(hits) if n >= offset]

    def search_text(self, served: ServedIndex, q: str, k: int, offset: int) -> list[dict]:
        return self._image_hits(served, self.embed_text(q), k, offset)

    def similar(self, served: ServedIndex, item_id: int, k: int, offset: int) -> list[dict]:
        """Image → image from an indexed picture (its stored row: no model call)."""
        v = served.vectors(IMAGES, [item_id])
        if not np.isfinite(v).all():
            raise HTTPException(404, "this image's index row is damaged")
        return self._image_hits(served, torch.from_numpy(v), k, offset, exclude=item_id)

    def search_image(self, served: ServedIndex, img, k: int) -> dict:
        emb = self.embed_image(img)
        out = {"images": self._image_hits(served, emb, k), "captions": []}
        if served.count(CAPTIONS):  # distinct captions: one caption of several images is listed once
            pairs = served.search(emb, k * 4, CAPTIONS)
            seen: set[str] = set()
            for (score, j), it in zip(pairs, served.items_for(CAPTIONS, [j for _, j in pairs])):
                text = _text(it.get("caption"))
                norm = " ".join(text.split()).casefold()
                if norm in seen:
                    continue
                seen.add(norm)
                out["captions"].append({"rank": len(out["captions"]) + 1, "score": round(score, 4), "caption": text,
                                        "image": _int_or_none(it.get("image"))})
                if len(out["captions"]) == k:
                    break
        return out

    def key(self, served: ServedIndex, i: int) -> str:
        """Indexed image `i`'s key (its name in the index)."""
        return _text(served.items_for(IMAGES, [i])[0].get("key"))

    def item(self, served: ServedIndex, i: int) -> dict:
        """Indexed image `i`: key, path, source and its distinct captions."""
        it = served.items_for(IMAGES, [i])[0]
        caps, seen = [], set()
        for c in served.captions_of(i, it):
            norm = " ".join(c.split()).casefold()
            if norm and norm not in seen:
                seen.add(norm)
                caps.append(c)
        shard = _text(it.get("shard"))
        q = self._suffix(served)
        # a shard's item records its source's path, not a file here: the shard is where it is
        return {"id": i, "key": _text(it.get("key")), "path": "" if shard else served.shown_path(IMAGES, i, it),
                "shard": os.path.basename(shard), "source": _text(it.get("source")),
                "captions": caps[:MAX_ITEM_CAPTIONS], "thumb": f"/thumb/{i}{q}", "photo": f"/photo/{i}{q}"}

    def tags(self, served: ServedIndex, tags: list[str], k: int, img=None, item_id: Optional[int] = None) -> list[dict]:
        W = _finite(tag_embeddings(self.model, tags, self.proc, DEFAULT_TEMPLATES), "text")
        if img is not None:
            emb = self.embed_image(img)[0]
        else:
            v = served.vectors(IMAGES, [item_id])
            if not np.isfinite(v).all():
                raise HTTPException(404, "this image's index row is damaged")
            emb = torch.from_numpy(v[0])
        sc = W @ emb.float()
        top = sc.topk(min(k, len(tags)))
        return [{"tag": tags[int(j)], "score": round(float(v), 4)} for v, j in zip(top.values, top.indices)]

    # ------------------------------------------------------------------ clip-retrieval's API

    def knn(self, served: ServedIndex, emb: torch.Tensor, kind: str, num_result_ids: int, num_images: int,
            deduplicate: bool, base_url: str) -> list[dict]:
        """clip-retrieval's /knn-service answer: up to `num_result_ids` image rows nearest
        `emb` in the `kind` embeddings ([{id, similarity}], ids are image rows, each once,
        at its best), the first `num_images` with their metadata. `deduplicate` drops a
        result within DEDUP_COSINE of a better one among the best DEDUP_WINDOW."""
        pairs = served.search(emb, num_result_ids, kind)
        if kind == CAPTIONS:  # a caption row shows its image: ids are image rows, as /metadata reads them
            items = served.items_for(CAPTIONS, [j for _, j in pairs])
            pairs = [(s, served.image_of(CAPTIONS, j, it)) for (s, j), it in zip(pairs, items)]
        seen: set[int] = set()
        pairs = [(s, j) for s, j in pairs if not (j in seen or seen.add(j))]
        if deduplicate and len(pairs) > 1:
            pairs = self._deduplicated(served, pairs)
        head = served.items_for(IMAGES, [j for _, j in pairs[:num_images]])
        out = []
        for n, (s, j) in enumerate(pairs):
            row = self.metadata_of(served, j, head[n], base_url) if n < len(head) else {}
            row.update(id=j, similarity=round(s, 6))
            out.append(row)
        return out

    def _deduplicated(self, served: ServedIndex, pairs: list[tuple[float, int]]) -> list[tuple[float, int]]:
        window = pairs[:DEDUP_WINDOW]
        v = served.vectors(IMAGES, [j for _, j in window])
        ok = np.isfinite(v).all(axis=1)
        v[~ok] = 0
        sim = v @ v.T
        keep: list[int] = []
        for a in range(len(window)):
            if not ok[a] or not keep or float(sim[a, keep].max()) < DEDUP_COSINE:
                keep.append(a)
        return [window[a] for a in keep] + pairs[DEDUP_WINDOW:]

    def metadata_of(self, served: ServedIndex, i: int, item: dict, base_url: str) -> dict:
        """Image row `i`'s metadata for clip-retrieval's clients: its scalar columns
        (strict JSON), `caption`, `image_path` as recorded, and `url`: this service's
        picture of it when it reads the picture, else the url the item records."""
        out = {k: _scalar(v) for k, v in item.items() if isinstance(k, str) and k not in _NOT_METADATA}
        out["caption"] = _text(item.get("caption"))
        out["image_path"] = served.shown_path(IMAGES, i, item)
        url = item.get("url")
        if served.pictures.serves(item):
            out["url"] = f"{base_url.rstrip('/')}/photo/{i}?index={urllib.parse.quote(served.name)}"
        else:
            out["url"] = _text(url) if isinstance(url, str) and url.startswith(("http://", "https://")) else None
        return out

    def metadata(self, served: ServedIndex, ids: list[int], base_url: str) -> list[dict]:
        """clip-retrieval's /metadata answer: [{id, metadata}] for image rows `ids`."""
        items = served.items_for(IMAGES, ids)
        return [{"id": i, "metadata": self.metadata_of(served, i, it, base_url)} for i, it in zip(ids, items)]
