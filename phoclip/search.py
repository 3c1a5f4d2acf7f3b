"""Embedding index and search: text → image, image → text, zero-shot tagging.

An index folder holds fp16 embeddings (`images.npy`, `captions.npy`), one JSON line
per item (`images.jsonl`, `captions.jsonl`) and `index.json` with the model's
fingerprint: searching with another model is refused, since its embeddings would live
in another space."""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

INDEX_META = "index.json"
DEFAULT_TEMPLATES = ("một bức ảnh về {}", "ảnh chụp {}", "{}")


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
        try:
            self.meta = json.loads(meta_f.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise ValueError(f"{meta_f}: unreadable ({type(e).__name__}: {e})") from None
        m = self.meta
        if (not isinstance(m, dict) or not isinstance(m.get("model_fingerprint"), str)
                or not isinstance(m.get("model"), str) or not isinstance(m.get("dim"), int)
                or not isinstance(m.get("count"), dict)):
            raise ValueError(f"{meta_f}: not an index description (model_fingerprint, model, dim, count)")
        self._emb: dict[str, torch.Tensor] = {}
        self._items: dict[str, list[dict]] = {}
        self._faiss: dict = {}

    @property
    def fingerprint(self) -> str:
        return self.meta["model_fingerprint"]

    def kinds(self) -> list[str]:
        return [k for k in ("images", "captions") if (self.folder / f"{k}.npy").is_file()]

    def embeddings(self, kind: str) -> torch.Tensor:
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
            except (OSError, ValueError) as e:
                raise ValueError(f"{f}: not a readable embedding array ({e})") from None
            want = self.meta["count"].get(kind)
            if a.ndim != 2 or a.shape[1] != self.meta["dim"] or a.shape[0] != want or a.dtype.kind != "f":
                raise ValueError(f"{f}: shape {a.shape} {a.dtype}, but {INDEX_META} says "
                                 f"{want} x {self.meta['dim']} floats")
            if len(self.items(kind)) != a.shape[0]:
                raise ValueError(f"{self.folder / (kind + '.jsonl')}: {len(self.items(kind))} lines for "
                                 f"{a.shape[0]} embeddings; the index is damaged: rebuild it")
            # fp16 on disk; fp32 in memory on CPU, where fp16 matmuls are slow
            self._emb[kind] = torch.from_numpy(np.array(a, dtype=np.float32))
        return self._emb[kind]

    def items(self, kind: str) -> list[dict]:
        if kind not in self._items:
            f = self.folder / f"{kind}.jsonl"
            out = []
            try:
                with open(f, encoding="utf-8") as fh:
                    for i, line in enumerate(fh, 1):
                        it = json.loads(line)
                        if not isinstance(it, dict):
                            raise ValueError("not an object")
                        out.append(it)
            except (OSError, ValueError, RecursionError) as e:
                raise ValueError(f"{f}: unreadable ({type(e).__name__}: {e})") from None
            self._items[kind] = out
        return self._items[kind]

    def check_model(self, model) -> None:
        from phoclip.model import model_fingerprint

        fp = getattr(model, "fingerprint", None) or model_fingerprint(model)  # ONNX: recorded at export
        if fp != self.fingerprint:
            raise ValueError(f"index {self.folder} was built with model {self.fingerprint} "
                             f"({self.meta.get('model')}), not {fp}: rebuild the index or search "
                             "with the model that built it")

    def search(self, queries: torch.Tensor, k: int = 25, kind: str = "images",
               backend: str = "exact", chunk: int = 262144) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k scores and ids for each query row; exact by default."""
        emb = self.embeddings(kind)
        q = queries.float()
        k = min(k, emb.shape[0])
        if backend == "faiss":
            return self._search_faiss(q, k, kind)
        return exact_topk(q, emb, k, chunk)

    def _search_faiss(self, q, k, kind):
        import faiss

        if kind not in self._faiss:
            emb = self.embeddings(kind).numpy()
            ix = faiss.IndexFlatIP(emb.shape[1])
            ix.add(emb)
            self._faiss[kind] = ix
        s, i = self._faiss[kind].search(np.ascontiguousarray(q.numpy()), k)
        return torch.from_numpy(s), torch.from_numpy(i)


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


# ----------------------------------------------------------------------------- building

def write_index(folder: str | os.PathLike, model, model_name: str, images: Optional[torch.Tensor],
                image_items: list[dict], captions: Optional[torch.Tensor] = None,
                caption_items: Optional[list[dict]] = None, source: str = "") -> Path:
    """Write an index folder (fp16 embeddings + items + fingerprint), whole or not at all:
    into a temporary folder beside it, fsynced, then renamed over the old index."""
    import shutil

    from phoclip.fileio import atomic_write_bytes, atomic_write_json, fsync_dir
    from phoclip.model import model_fingerprint

    out = Path(folder)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / INDEX_META).is_file())):
        raise ValueError(f"{out} exists and is not an index: refusing to replace it (choose an "
                         "empty or new --out folder)")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for kind, emb, items in (("images", images, image_items), ("captions", captions, caption_items)):
        if emb is None:
            continue
        if len(items) != emb.shape[0]:
            raise ValueError(f"{len(items)} {kind} items for {emb.shape[0]} embeddings")
        buf = io.BytesIO()
        np.save(buf, emb.to(torch.float16).numpy(), allow_pickle=False)
        atomic_write_bytes(tmp / f"{kind}.npy", buf.getvalue())
        atomic_write_bytes(tmp / f"{kind}.jsonl", "".join(
            json.dumps(it, ensure_ascii=False) + "\n" for it in items).encode("utf-8"))
    meta = {"model_fingerprint": model_fingerprint(model), "model": model_name,
            "dim": int(model.config["embed_dim"]), "source": source,
            "count": {"images": 0 if images is None else int(images.shape[0]),
                      "captions": 0 if captions is None else int(captions.shape[0])}}
    atomic_write_json(tmp / INDEX_META, meta, indent=2)
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(out.parent)
    return out


# ----------------------------------------------------------------------------- queries

def query_processor(model, tokenizer_name: str, segmenter: Optional[str] = None,
                    vncorenlp_dir: Optional[str] = None):
    """The TextProcessor that prepares queries as the model's training captions were:
    the segmenter and max length the model records (`segmenter` overrides the name;
    VnCoreNLP's folder: `vncorenlp_dir`, else $VNCORENLP_DIR)."""
    from phoclip.text import TextProcessor, create_segmenter, load_tokenizer

    tc = model.config["text"]
    name = segmenter or tc.get("segmenter")
    if not name:
        raise ValueError("the model does not record which segmenter its captions were made with "
                         "(exported before that was recorded): pass --segmenter NAME, the one "
                         "its shards' manifest.json names")
    seg = create_segmenter(name, vncorenlp_dir)
    want = tc.get("segmenter_version")
    if name == tc.get("segmenter") and want and want != seg.version:
        logger.warning("the model's captions were segmented with %s %s, queries now with %s: "
                       "results may differ slightly", name, want, seg.version)
    return TextProcessor(load_tokenizer(tokenizer_name), seg, int(tc.get("max_length", 70)))


@torch.no_grad()
def embed_texts(model, text_processor, texts: Sequence[str], device="cpu") -> torch.Tensor:
    """Normalise and segment as at sharding time, tokenize, embed."""
    from phoclip.model import trim_padding

    _, ids = text_processor(list(texts))
    model.eval()
    x = torch.from_numpy(ids.astype(np.int64))
    if hasattr(model, "pad_id"):  # no compute on padding (exact)
        x = trim_padding(x, model.pad_id, 8)
    return model.encode_text(x.to(device)).float().cpu()


@torch.no_grad()
def embed_images(model, images: Sequence, image_size: int, device="cpu") -> torch.Tensor:
    from phoclip.transforms import image_to_tensor
    from phoclip.images import to_rgb

    model.eval()
    x = torch.stack([image_to_tensor(to_rgb(im), image_size, train=False) for im in images])
    return model.encode_image(x.to(device)).float().cpu()


def find_matches(model, index: EmbeddingIndex, queries: Sequence[str], text_processor,
                 k: int = 25, backend: str = "exact") -> list[list[Match]]:
    """Text → image: the k best images of the index for each Vietnamese query."""
    index.check_model(model)
    q = embed_texts(model, text_processor, queries)
    return _matches(index, q, k, "images", backend)


def find_captions(model, index: EmbeddingIndex, images: Sequence, k: int = 25,
                  backend: str = "exact") -> list[list[Match]]:
    """Image → text: the k best captions of the index for each PIL image."""
    index.check_model(model)
    q = embed_images(model, images, model.config["vision"].get("image_size", 224))
    return _matches(index, q, k, "captions", backend)


def _matches(index, q, k, kind, backend):
    s, i = index.search(q, k, kind, backend)
    items = index.items(kind)
    return [[Match(r + 1, float(s[a, r]), int(i[a, r]), items[int(i[a, r])]) for r in range(s.shape[1])]
            for a in range(s.shape[0])]


def zero_shot_tags(model, index: EmbeddingIndex, tags: Sequence[str], text_processor,
                   templates: Sequence[str] = DEFAULT_TEMPLATES, k: int = 3) -> list[list[tuple[str, float]]]:
    """Top-k tags for every image of the index; each tag's embedding is the normalised
    mean of its prompt templates' embeddings (as open_clip builds zero-shot classifiers)."""
    index.check_model(model)
    W = tag_embeddings(model, tags, text_processor, templates)
    sc = index.embeddings("images") @ W.T
    top = sc.topk(min(k, len(tags)), dim=1)
    return [[(tags[int(j)], float(v)) for v, j in zip(vs, js)] for vs, js in zip(top.values, top.indices)]


def tag_embeddings(model, tags, text_processor, templates=DEFAULT_TEMPLATES) -> torch.Tensor:
    rows = []
    for t in tags:
        e = embed_texts(model, text_processor, [tpl.format(t) for tpl in templates]).mean(0)
        rows.append(torch.nn.functional.normalize(e, dim=0))
    return torch.stack(rows)


def zero_shot_accuracy(predicted: Sequence[str], labels: Sequence[str]) -> float:
    """Top-1 accuracy (percent) of predicted tags against class labels."""
    if not labels:
        return 0.0
    return 100.0 * sum(p == l for p, l in zip(predicted, labels)) / len(labels)


# ----------------------------------------------------------------------------- pictures

def load_item_image(item: dict):
    """The picture behind an index item: a file path or a member of a shard."""
    import stat

    from phoclip.images import BadImage, decode_rgb, read_image_file

    if item.get("shard"):
        # only a regular file is opened: an index naming a FIFO must not hang the
        # service's thumbnail route
        if not stat.S_ISREG(os.stat(item["shard"]).st_mode):
            raise BadImage("not_a_file", f"{item['shard']} is not a regular file")
        with tarfile.open(item["shard"]) as tf:
            data = tf.extractfile(tf.getmember(item["key"] + ".jpg")).read()
        return decode_rgb(data)
    return read_image_file(item["path"])


def _thumb_b64(item: dict, size: int = 160) -> str:
    try:
        im = load_item_image(item)
    except Exception as e:  # a moved or deleted file must not break the gallery
        logger.warning("no thumbnail for %s: %s", item, e)
        return ""
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode()


def write_gallery(path: str | os.PathLike, queries: Sequence[str], results: list[list[Match]]) -> Path:
    """A self-contained HTML page: thumbnails inlined as data URIs, with scores."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>PhoCLIP search</title>",
             "<style>body{font-family:sans-serif}figure{display:inline-block;margin:4px;"
             "text-align:center;font-size:12px}img{display:block;max-width:160px}</style></head><body>"]
    for q, res in zip(queries, results):
        parts.append(f"<h2>{html.escape(q)}</h2><div>")
        for m in res:
            b64 = _thumb_b64(m.item)
            label = html.escape(m.item.get("caption") or m.item.get("key") or m.item.get("path", ""))
            src = html.escape(m.item.get("path") or m.item.get("key", ""))
            parts.append(f"<figure data-src='{src}'><img src='data:image/jpeg;base64,{b64}' "
                         f"alt='{label}'><figcaption>#{m.rank} {m.score:.3f}<br>{label}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>")
    out = Path(path)
    out.write_text("".join(parts), encoding="utf-8")
    return out


def write_embedding_map(path: str | os.PathLike, emb: torch.Tensor, labels: Sequence[str],
                        title: str = "PhoCLIP image embeddings", seed: int = 0) -> Path:
    """A 2-D t-SNE map of the embeddings as a PNG, coloured by label (e.g. the source)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    x = emb.float().numpy()
    perplexity = max(2.0, min(30.0, (len(x) - 1) / 3))
    xy = TSNE(2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(x)
    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    for lab in sorted(set(labels)):
        m = np.array([l == lab for l in labels])
        ax.scatter(xy[m, 0], xy[m, 1], s=8, label=lab)
    ax.set_title(title)
    ax.legend(markerscale=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
