"""Pictures of search results: the image behind an index item, a self-contained HTML
gallery, and a 2-D map of embeddings."""
from __future__ import annotations

import base64
import html
import io
import logging
import os
import tarfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from phoclip.data.images import MAX_FILE_BYTES, BadImage, decode_rgb, read_file_capped
from phoclip.data.remote import is_remote, open_url
from phoclip.data.tar import read_member
from phoclip.data.text import strip_controls
from phoclip.fileio import atomic_write_text
from phoclip.search.index import Match

logger = logging.getLogger(__name__)


def load_item_image(item: dict, allow_remote: bool = False, max_bytes: Optional[int] = None):
    """The picture behind an index item: a file path or a member of a shard, decoded
    safely (`load_item_bytes` + `decode_rgb`). Raises BadImage (or OSError, KeyError)."""

    return decode_rgb(load_item_bytes(item, allow_remote, max_bytes))


def load_item_bytes(item: dict, allow_remote: bool = False, max_bytes: Optional[int] = None) -> bytes:
    """The encoded bytes of an index item's picture, at most `max_bytes` (default
    `phoclip.data.images.MAX_FILE_BYTES`): a file path or a member of a shard; a larger file or
    member is refused from its size, unread. A remote shard (http(s)/fsspec) is read only
    with `allow_remote` (the trainer's own shards; an index handed to the service may not
    make it fetch URLs), and a `pipe:` command is never run from here."""

    cap = MAX_FILE_BYTES if max_bytes is None else max_bytes
    shard = item.get("shard")
    if shard and is_remote(shard):
        if not allow_remote or shard.startswith("pipe:"):
            raise BadImage("remote_shard", f"{shard}: not opened from here")
        return _remote_member(shard, item["key"] + ".jpg", cap)
    if shard:
        return read_member(shard, str(item["key"]) + ".jpg", cap)  # its headers capped too
    return read_file_capped(item["path"], cap)


def _remote_member(url: str, name: str, max_bytes: int = 64 << 20) -> bytes:
    """One member of a remote tar, streamed (no seeking over HTTP)."""

    with open_url(url) as f, tarfile.open(fileobj=f, mode="r|*") as tf:
        for m in tf:
            if m.name == name and m.isreg():
                if m.size > max_bytes:
                    raise ValueError(f"{url}/{name}: {m.size} bytes")
                return tf.extractfile(m).read()
    raise KeyError(f"{name} not in {url}")


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


def page_style() -> str:
    """The search page's style sheet (phoclip/serve/static/style.css, package data): the
    gallery looks like the service's page."""
    from importlib import resources

    return (resources.files("phoclip") / "serve" / "static" / "style.css").read_text(encoding="utf-8")


def _card(m: Match) -> str:
    """One result as the page draws it: the picture, its rank and score, its caption."""

    def text(x) -> str:
        return html.escape(strip_controls(str(x or "")))

    b64 = _thumb_b64(m.item)
    label = text(m.item.get("caption") or m.item.get("key") or m.item.get("path"))
    pic = f"<img class='thumb' src='data:image/jpeg;base64,{b64}' alt='{label}'>" if b64 else ""
    src = text(m.item.get("path") or m.item.get("key"))
    return (f"<figure class='card' data-src='{src}' title='{src}'><div class='pic'>{pic}</div>"
            f"<figcaption><div class='score'><span>#{m.rank}</span><span>{m.score:.3f}</span></div>"
            f"<div class='caption'>{label}</div></figcaption></figure>")


def write_gallery(path: str | os.PathLike, queries: Sequence[str], results: list[list[Match]]) -> Path:
    """A self-contained HTML page of text → image results that looks like the service's
    search page (its style sheet inlined, the same cards): thumbnails inlined as data
    URIs, no script, every index text escaped. Written atomically."""

    parts = ["<!doctype html><html lang='vi'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>PhoCLIP — {html.escape(' · '.join(queries))}</title><style>{page_style()}</style></head><body>",
             "<header class='top'><span class='brand'>PhoCLIP <span>tìm ảnh bằng tiếng Việt</span></span>",
             f"<span class='meta'>{len(queries)} truy vấn</span></header><main class='gallery'>"]
    for q, res in zip(queries, results):
        parts.append(f"<section><h2>«{html.escape(q)}»</h2>")
        parts.append(f"<div class='grid'>{''.join(_card(m) for m in res)}</div>" if res else
                     "<p class='none'>Không có kết quả</p>")
        parts.append("</section>")
    parts.append("</main></body></html>")
    return atomic_write_text(path, "".join(parts))


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
