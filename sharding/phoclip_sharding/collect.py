"""Phase 1 of a make_shards job: read every source, hash every image, merge
byte-identical images, keep this part's images and give each a split, all streamed
through the job store (memory does not grow with the job)."""
from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter

from phoclip.data.images import MAX_FILE_BYTES
from phoclip.data.text import normalize_text, strip_controls
from phoclip.data.datasets import read_source
from phoclip.data.sources import SourceSpec, part_of
from phoclip_sharding.store import JobStore
from phoclip_sharding.writer import check_images

logger = logging.getLogger("make_shards")


def split_of(sha: str, seed: int, val_fraction: float) -> str:
    """train or val, from the image's content hash and the seed: split by image, never by caption."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{sha}".encode()).digest()[:8], "big")
    return "val" if h / 2**64 < val_fraction else "train"


RECORD_BATCH = 10_000  # records read from the sources per store transaction
HASH_PAGE = 8_192      # image paths hashed per page


def _hash_images(store: JobStore, pool, max_pixels: int, max_bytes: int) -> None:
    """Give every image path of the records a current entry in the store's hash journal:
    files whose (size, mtime) match their entry are not read again; the rest are hashed
    in the pool, a page at a time."""
    new = total = 0
    for paths in store.path_pages(HASH_PAGE):
        known = store.journal(paths)
        stamps, todo = {}, []
        for p in paths:
            try:
                st = os.stat(p)
                stamps[p] = (st.st_size, st.st_mtime_ns)
            except OSError:
                stamps[p] = (None, None)
            old = known.get(p)
            if stamps[p][0] is None or old is None or tuple(old[:2]) != stamps[p]:
                todo.append(p)
        total += len(paths)
        new += len(todo)
        checks = check_images(todo, pool, max_pixels, max_bytes)
        store.put_hashes((p, *stamps[p], c.sha, c.reason) for p, c in checks.items())
    if new < total:
        logger.info("hashed %d new or changed of %d images (the rest: unchanged since %s)", new, total, store.path)


def collect(specs: list[SourceSpec], pool, store: JobStore, max_pixels: int, max_bytes: int = MAX_FILE_BYTES,
            num_parts: int = 1, part: int = 0, seed: int = 0, val_fraction: float = 0.0):
    """Read every source, hash every image, merge byte-identical images; keep the images
    of `part` (of `num_parts`, by content hash), count only their skips, and give each a
    split. Everything streams through `store`: memory does not grow with the job.

    Returns (number of samples, skipped Counter, number of merged duplicate images)."""
    store.begin_run([max_pixels, max_bytes])
    skipped: Counter = Counter()
    for spec in specs:
        n, batch = 0, []
        for r in read_source(spec):
            batch.append((r.source, r.image_id, str(r.path), r.rel or r.path.name, r.captions, r.split, r.origin))
            if len(batch) >= RECORD_BATCH:
                store.add_records(batch)
                n, batch = n + len(batch), []
        store.add_records(batch)
        n += len(batch)
        if part == 0:  # annotation-level skips (no image yet): counted by part 0 only
            skipped.update(spec.skipped)
        logger.info("%s: %d images in %s", spec.source_name, n, spec.annotations)
    store.index_records()
    _hash_images(store, pool, max_pixels, max_bytes)
    for path, source, reason, sha in store.bad_records():
        if part_of(sha or path, num_parts) == part:
            skipped[reason] += 1
            logger.warning("skipping image %s (%s): %s", path, source, reason)

    merged, rows = 0, []
    for sha, group in store.record_groups():
        if part_of(sha, num_parts) != part:
            continue  # another part's image (all of its records go there)
        s = {"sources": [], "image_ids": [], "paths": [], "rel_paths": [], "captions": [], "pins": set(),
             "origins": []}
        seen: set = set()
        for source, image_id, path, rel, captions, pin, origin in group:
            if origin:
                s["origins"].append(origin)
            s["sources"].append(source)
            s["image_ids"].append(image_id)
            s["paths"].append(path)
            s["rel_paths"].append(rel)
            if pin:
                s["pins"].add(pin)
            for raw in captions:
                norm = normalize_text(raw)
                if not norm:
                    skipped["empty_caption"] += 1
                elif norm in seen:
                    skipped["duplicate_caption"] += 1
                else:
                    seen.add(norm)
                    s["captions"].append(raw)
        if not s["captions"]:
            skipped["no_caption"] += 1
            logger.warning("skipping image %s: it has no non-empty caption", s["paths"][0])
            continue
        merged += len(s["paths"]) - 1
        # split by image: a pinned source wins (val over train), else the seeded hash
        split = ("val" if "val" in s["pins"] else "train" if "train" in s["pins"]
                 else split_of(sha, seed, val_fraction))
        # paths relative to each source's image folder: shards travel between machines,
        # and a machine's absolute paths are nobody else's business
        meta = {"key": sha[:24], "sha256": sha, "split": split, "source": s["sources"],
                "image_id": s["image_ids"], "path": s["rel_paths"],
                "captions": [normalize_text(c) for c in s["captions"]],
                "captions_raw": [strip_controls(c) for c in s["captions"]]}
        if s["origins"]:  # web-scale inputs: the original key and URL
            meta["origin"] = s["origins"]
        rows.append((sha, split, shard_order(sha, seed, split), len(s["captions"]), s["paths"][0], meta,
                     s["captions"]))
        if len(rows) >= RECORD_BATCH:
            store.add_samples(rows)
            rows = []
    store.add_samples(rows)
    store.index_samples()
    if merged:
        logger.info("merged %d byte-identical duplicate images", merged)
    return store.count(), skipped, merged


def shard_order(sha: str, seed: int, split: str) -> str:
    """A sample's place in its split's shard sequence: a seeded hash, i.e. a shuffle
    (mixing sources) that needs no list of the whole split in memory."""
    return hashlib.sha256(f"{seed}:{split}:order:{sha}".encode()).hexdigest()
