"""The parallel shard writer: hash and check images, plan shards, write them.

Phase 1 hashes every image file (so byte-identical images under several names or
sources become one sample and cannot leak across splits) and reads only its header.
Phase 2 writes each shard in one worker process: decode → RGB → resize → JPEG →
tar under an unpredictable temporary name → rename; a small `.done` record written after the rename
marks the shard complete, so an interrupted job re-run skips it.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from phoclip.data.images import (MAX_FILE_BYTES, MAX_IMAGE_PIXELS, BadImage, decode_rgb, encode_jpeg, probe_image,
                                 read_file_capped, resize_shorter)
from phoclip.data.text import TextProcessor, create_segmenter, load_tokenizer
from phoclip.fileio import atomic_open, atomic_write_json, real_dir
from phoclip_sharding.output import done_path, publish_shard

logger = logging.getLogger(__name__)

SHARD_PATTERN = "{split}-{index:06d}.tar"


@dataclass
class ImageCheck:
    path: str
    sha: Optional[str] = None
    reason: Optional[str] = None


def check_image(path: str, max_pixels: int = MAX_IMAGE_PIXELS,
                max_bytes: int = MAX_FILE_BYTES) -> ImageCheck:
    """Hash an image file and read its header; classify what is wrong with it (the
    reasons of `read_file_capped` and `probe_image`). A file that could be read has its
    hash even when it is not a usable image: the hash decides its part."""
    try:
        data = read_file_capped(path, max_bytes)
    except BadImage as e:
        return ImageCheck(path, reason=e.reason)
    sha = hashlib.sha256(data).hexdigest()
    try:
        probe_image(data, max_pixels)
    except BadImage as e:
        return ImageCheck(path, sha=sha, reason=e.reason)
    return ImageCheck(path, sha=sha)


@dataclass(frozen=True)
class TextSettings:
    """How a worker prepares captions (normalise → segment → tokenize), built once per
    worker process and reused for every shard it writes."""

    tokenizer: str
    segmenter: str
    vncorenlp_dir: Optional[str]
    max_length: int
    batch: int = 512


_TEXT: dict = {}  # TextSettings -> TextProcessor, per worker process


def text_processor(t: TextSettings):
    if t not in _TEXT:
        _TEXT[t] = TextProcessor(load_tokenizer(t.tokenizer), create_segmenter(t.segmenter, t.vncorenlp_dir),
                                 t.max_length)
    return _TEXT[t]


@dataclass
class ShardTask:
    split: str
    index: int
    out_dir: str
    image_size: int
    quality: int
    # one entry per sample: (key, image path, metadata dict, raw captions) with `text`
    # set (the worker tokenizes), or (key, image path, metadata dict, ids int32 [n, L])
    samples: list
    max_pixels: int = MAX_IMAGE_PIXELS
    max_bytes: int = MAX_FILE_BYTES
    text: Optional[TextSettings] = None
    remote: Optional[str] = None  # --out URL the finished shard is uploaded to

    @property
    def name(self) -> str:
        return SHARD_PATTERN.format(split=self.split, index=self.index)


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


class _TarShard:
    """A WebDataset tar written with fixed owner and mtime, so that the same inputs give
    byte-identical shards. (webdataset's TarWriter would do, but importing webdataset
    imports torch: seconds per spawned worker for nothing.)"""

    def __init__(self, fileobj) -> None:
        import tarfile

        self._tar = tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.USTAR_FORMAT)

    def write(self, sample: dict) -> None:
        import tarfile

        key = sample["__key__"]
        for ext, data in sample.items():
            if ext == "__key__":
                continue
            ti = tarfile.TarInfo(f"{key}.{ext}")
            ti.size, ti.mtime, ti.mode = len(data), 0, 0o444
            ti.uname = ti.gname = "phoclip"
            self._tar.addfile(ti, io.BytesIO(data))

    def __enter__(self) -> "_TarShard":
        return self

    def __exit__(self, *exc) -> None:
        self._tar.close()


def write_shard(task: ShardTask) -> dict:
    """Write one shard atomically; returns {name, count, skipped: {reason: n}}."""
    out = Path(task.out_dir)
    skipped: Counter = Counter()
    lost: list[str] = []  # keys planned for this shard whose image could not be written
    count = 0
    segmented, ids_of, truncated = _prepare_text(task)
    # an unpredictable temporary name, created exclusively, renamed over the final name:
    # a link planted in OUT at either name is never written through
    with atomic_open(out / task.name) as f:
        with _TarShard(f) as tw:
            for (key, path, meta, _), seg, ids in zip(task.samples, segmented, ids_of):
                try:
                    data = read_file_capped(path, task.max_bytes)
                    im = decode_rgb(data, task.max_pixels)  # always decoded: a check of the whole file
                    jpg = data if keeps_bytes(data, im, task.image_size) else None
                    im = resize_shorter(im, task.image_size)
                except BadImage as e:
                    skipped[e.reason] += 1
                    lost.append(key)
                    logger.warning("skipping %s: %s", path, e)
                    continue
                meta = dict(meta, width=im.width, height=im.height)
                if seg is not None:
                    meta["captions_segmented"] = seg
                tw.write({
                    "__key__": key,
                    "jpg": jpg or encode_jpeg(im, task.quality),
                    "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
                    "ids.npy": _npy_bytes(np.ascontiguousarray(ids, dtype=np.int32)),
                })
                count += 1
    record = {"name": task.name, "count": count, "skipped": dict(skipped), "lost_keys": lost,
              "truncated_captions": truncated}
    d = done_path(out, task.name)
    real_dir(d.parent)
    atomic_write_json(d, record)
    if task.remote:  # --out URL: upload the shard, then its record
        publish_shard(task.out_dir, task.remote, task.name)
    return record


def _prepare_text(task: ShardTask) -> tuple[list, list, int]:
    """Every caption of the shard through the worker's TextProcessor, in batches:
    per sample, segmented captions and ids int32 [n, L]; and how many captions were
    truncated at max_length. Samples given with their ids already pass through."""
    if task.text is None:
        return [None] * len(task.samples), [ids for _, _, _, ids in task.samples], 0
    proc = text_processor(task.text)
    flat = [c for _, _, _, caps in task.samples for c in caps]
    seg_all, ids_all = [], []
    for b in range(0, len(flat), task.text.batch):
        seg, ids = proc(flat[b:b + task.text.batch])
        seg_all.extend(seg)
        ids_all.append(ids)
    ids = np.concatenate(ids_all) if ids_all else np.zeros((0, task.text.max_length), np.int32)
    segmented, per_ids, i = [], [], 0
    for _, _, _, caps in task.samples:
        segmented.append(seg_all[i:i + len(caps)])
        per_ids.append(ids[i:i + len(caps)])
        i += len(caps)
    truncated = int((ids[:, -1] != proc.tokenizer.pad_token_id).sum()) if len(ids) else 0
    return segmented, per_ids, truncated


def keeps_bytes(data: bytes, im, size: int) -> bool:
    """An input already in the shard's form - an upright RGB JPEG whose shorter side is at
    most `size` - is stored as it came (no second lossy encode, e.g. img2dataset's
    resized JPEGs); anything else is resized and re-encoded."""
    try:
        head = probe_image(data)
        orientation = head.getexif().get(0x0112, 1)
    except (BadImage, OSError, ValueError, SyntaxError):
        return False
    return head.format == "JPEG" and head.mode == "RGB" and orientation in (None, 1) and min(im.size) <= size


def make_pool(workers: int):
    """One pool of `workers` processes for both phases, or None to work in-process.
    spawn, not fork: the parent may hold a JVM (VnCoreNLP) or threads."""
    if workers <= 1:
        return None
    import multiprocessing as mp

    return mp.get_context("spawn").Pool(workers, initializer=without_torch)


def without_torch() -> None:
    """For a process that only tokenizes (the pure-Python PhobertTokenizer): keep
    transformers from importing torch, which costs seconds and hundreds of MB per spawned
    worker and is never used there. Must run before transformers is imported."""
    os.environ.setdefault("USE_TORCH", "0")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its notice that no torch was found


def run_tasks(tasks: Iterable[ShardTask], pool, total: int) -> int:
    """Write shards in the pool (None: in this process), a shard per task; returns how
    many were written. At most two shards per worker are handed out at a time: `tasks`
    may be a lazy plan of a job far larger than memory."""
    from collections import deque

    from tqdm import tqdm

    n = 0
    with tqdm(total=total, unit="img", desc="shards", disable=None) as bar:
        if pool is None:
            for t in tasks:
                write_shard(t)
                bar.update(len(t.samples))
                n += 1
            return n
        window = 2 * max(1, getattr(pool, "_processes", 1))
        pending: deque = deque()
        for t in tasks:
            pending.append((len(t.samples), pool.apply_async(write_shard, (t,))))
            while len(pending) >= window or (pending and pending[0][1].ready()):
                size, res = pending.popleft()
                res.get()
                bar.update(size)
                n += 1
        while pending:
            size, res = pending.popleft()
            res.get()
            bar.update(size)
            n += 1
    return n


def check_images(paths: list[str], pool, max_pixels: int = MAX_IMAGE_PIXELS,
                 max_bytes: int = MAX_FILE_BYTES) -> dict[str, ImageCheck]:
    """Hash/check many images, in the pool where there is one."""
    from functools import partial

    from tqdm import tqdm

    check = partial(check_image, max_pixels=max_pixels, max_bytes=max_bytes)
    it = map(check, paths) if pool is None else pool.imap(check, paths, chunksize=64)
    out: dict[str, ImageCheck] = {}
    for r in tqdm(it, total=len(paths), unit="img", desc="hashing", disable=None):
        out[r.path] = r
    return out
