"""The web-scale sources, whose images are held inside the data: WebDataset tars as
img2dataset writes them (`wds:`) and parquet tables with image bytes (`parquet:`).
Their images are streamed out once into the job's cache folder (`SourceSpec.cache_dir`,
under --out) and then handled like files; images of another part of the job are not.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from collections import Counter
from pathlib import Path
from typing import Iterator

from phoclip.data.catalog import expand_urls, shard_name
from phoclip.data.sources import Record, SourceSpec, caption_list, cut_caption
from phoclip.data.tar import read_shards
from phoclip.fileio import atomic_write_bytes, real_dir

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_INLINE_IMAGE_BYTES = 64 << 20  # one image inside a tar or a parquet cell


def _safe_rel(rel: str) -> str:
    """`rel` as a path that stays inside the cache folder: a tar member named
    `../../x.jpg`, `/abs/x.jpg` or a name too long for the filesystem (a hostile tar)
    becomes a name derived from its hash."""
    comps = rel.split("/")
    if all(c not in ("", ".", "..") and "\0" not in c and len(c.encode("utf-8", "replace")) <= 200
           for c in comps):
        return rel
    digest = hashlib.sha256(rel.encode("utf-8", "replace")).hexdigest()[:32]
    return f"_unsafe_names/{digest}{os.path.splitext(comps[-1])[1][:8]}"


def _cache_image(spec: SourceSpec, rel: str, data: bytes) -> Path:
    """Write an image held inside the data to the job's cache, once (atomic; a resumed
    job finds it there). Every folder on the way must be a real folder (not a link
    planted in a shared output folder), and the file is written under an unpredictable
    temporary name, then renamed."""
    if spec.cache_dir is None:
        raise ValueError(f"{spec.format}: no cache folder for the images (make_shards sets one under --out)")
    rel = _safe_rel(rel)
    real_dir(spec.cache_dir.parent)  # OUT/.sources: neither a link
    folder = real_dir(spec.cache_dir)
    for comp in rel.split("/")[:-1]:
        folder = real_dir(folder / comp)
    path = folder / rel.split("/")[-1]
    try:
        cached = stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        cached = False
    if not cached:  # a cache: not fsynced (a file damaged by a power cut is an unusable image, counted)
        atomic_write_bytes(path, data, durable=False)
    return path


def read_wds(spec: SourceSpec) -> Iterator[Record]:
    """WebDataset tars as img2dataset writes them: KEY.jpg (or png/webp) + KEY.txt
    and/or KEY.json (its `caption` field, or ,caption_field=NAME; `url`, `key` and
    `status` recorded). Samples without an image (img2dataset's failed downloads) or
    without a caption are counted. The tars may be local or remote (read with retries)."""
    urls = expand_urls(spec.pattern, flag=f"--source {spec.format}:")[0]
    reads: Counter = Counter()
    for sample in read_shards(({"url": u} for u in urls), reads):
        key = sample.get("__key__", "")
        shard = shard_name(sample.get("__url__", "") or "input.tar")
        meta: dict = {}
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except (ValueError, RecursionError):
                meta = None
            if not isinstance(meta, dict):
                spec.skipped["bad_json"] += 1
                continue
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            spec.skipped["no_image" if meta.get("status", "success") == "success" else "failed_download"] += 1
            continue
        data = sample[ext]
        if len(data) > MAX_INLINE_IMAGE_BYTES:
            spec.skipped["too_large_file"] += 1
            continue
        caps = caption_list(spec, meta.get(spec.caption_field)) if spec.caption_field in meta else []
        if "txt" in sample:
            try:
                txt = sample["txt"].decode("utf-8")
            except UnicodeDecodeError:
                spec.skipped["bad_caption_encoding"] += 1
                txt = ""
            txt = cut_caption(spec, txt)
            if txt.strip() and txt not in caps:
                caps.append(txt)
        if not spec.owns(data):
            continue  # another part's image (its captions counted above, as in one job)
        rel = f"{shard}/{key}.{ext}"
        path = _cache_image(spec, rel, data)
        origin = {"key": meta.get("key", key), "shard": sample.get("__url__", "")}
        if meta.get("url"):
            origin["url"] = meta["url"]
        yield Record(spec.source_name, str(meta.get("key", key)), path, caps, spec.split, rel=rel, origin=origin)
    spec.skipped.update({f"input_{k}": v for k, v in reads.items()})


def read_parquet(spec: SourceSpec) -> Iterator[Record]:
    """A parquet table, one row per image (or per caption: rows of one image group):
    an image column holding a path (relative to IMAGE_DIR) or the image bytes (also
    Hugging Face's {bytes, path} struct), and a caption column (text or list of texts).
    Read in row batches: memory does not grow with the table."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(spec.annotations)
    except Exception as e:  # pyarrow raises its own error types for a non-parquet file
        raise ValueError(f"{spec.annotations}: not a readable parquet file ({e})") from None
    cols = pf.schema_arrow.names
    for c in (spec.image_field, spec.caption_field):
        if c not in cols:
            raise ValueError(f"{spec.annotations}: no column {c!r} in {cols} "
                             "(set ,image_field=NAME / ,caption_field=NAME)")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[spec.image_field, spec.caption_field]):
        images = batch.column(0).to_pylist()
        captions = batch.column(1).to_pylist()
        for img, cap in zip(images, captions):
            row += 1
            if isinstance(img, dict):  # {"bytes": ..., "path": ...}
                img = img.get("bytes") or img.get("path")
            if isinstance(img, (bytes, bytearray)):
                if len(img) > MAX_INLINE_IMAGE_BYTES:
                    spec.skipped["too_large_file"] += 1
                    continue
                caps = caption_list(spec, cap)
                if not spec.owns(bytes(img)):
                    continue  # another part's image (its captions counted, as in one job)
                rel = f"{spec.annotations.stem}/{row:09d}.img"
                yield Record(spec.source_name, str(row), _cache_image(spec, rel, bytes(img)), caps,
                             spec.split, rel=rel, origin={"row": row, "file": spec.annotations.name})
            elif isinstance(img, str):
                rec = spec.record(img, img, caption_list(spec, cap))
                if rec is not None:
                    yield rec
            else:
                spec.skipped["bad_image_field"] += 1
