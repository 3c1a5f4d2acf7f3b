"""Indexed pictures as JPEGs (thumbnails and the detail view's photo): read only from
allowed folders, capped, decoded safely, cached in memory up to a byte budget, and a
failed item remembered for a while instead of re-read on every request."""
from __future__ import annotations

import io
import logging
import os
import shlex
import threading
import time
from collections import Counter, OrderedDict
from typing import Callable, Optional, Sequence

from phoclip.data.images import BadImage
from phoclip.data.remote import is_remote
from phoclip.data.text import strip_controls
from phoclip.errors import one_line
from phoclip.search.gallery import load_item_bytes
from phoclip.serve.settings import PHOTO_SIZE, THUMB_SIZE
from phoclip.serve.uploads import decode_upload

logger = logging.getLogger(__name__)

MAX_CACHED_BYTES = 64 << 20  # JPEGs kept in memory (thumbnails and detail photos)
MAX_FAILED = 100_000  # items whose picture failed, remembered (not re-read on every request)
FAILED_TTL = 600.0  # seconds a failure is remembered (a file put back is served again)


class PictureUnavailable(LookupError):
    """An indexed item's picture cannot be served (outside the allowed folders, missing,
    broken, too large); logged once, when it first failed."""


def default_roots(index) -> list[str]:
    """The folders an index's pictures are served from when no --images-root is given:
    the index folder, and the images folder `index.json` records only when it lies inside
    the index folder (an index handed over must not open a folder of the host's by
    naming it). One recorded outside is logged once, naming it and the flag that serves it."""
    home = os.path.realpath(index.folder)
    roots = []
    for r in index.image_roots():
        real = os.path.realpath(r)
        if real == home or real.startswith(home.rstrip(os.sep) + os.sep):
            roots.append(r)
        else:
            logger.warning("%s: its pictures in %s (the images folder index.json names, outside the index folder) "
                           "are not served; to serve them, add --images-root %s", strip_controls(str(index.folder)),
                           strip_controls(r), shlex.quote(strip_controls(r)))
    return roots or [os.path.abspath(index.folder)]


class PictureCache:
    """JPEGs of one index's items, looked up by id through `item_of` (the item's dict:
    `path`, or `shard` + `key`); files are read only from under `roots` (real paths: a
    link inside one that points elsewhere is outside). Safe from several threads."""

    def __init__(self, item_of: Callable[[int], dict], roots: Sequence[str]) -> None:
        self.item_of = item_of
        self.roots = [os.path.realpath(r) for r in roots]
        self._pictures: OrderedDict = OrderedDict()  # (id, size) -> JPEG bytes, oldest first
        self._lock = threading.Lock()
        self._cached_bytes = 0
        self._failed: OrderedDict = OrderedDict()  # item id -> (monotonic time, reason)
        self.failures: Counter = Counter()  # reason -> items refused

    def cached(self, i: int, size: int = THUMB_SIZE) -> Optional[bytes]:
        """Item `i`'s JPEG at `size` when it is in memory, else None (no file read)."""
        with self._lock:
            if (i, size) in self._pictures:
                self._pictures.move_to_end((i, size))
                return self._pictures[(i, size)]
        return None

    def picture(self, i: int, max_source: int, max_decode_bytes: int, size: int = THUMB_SIZE) -> bytes:
        """A JPEG of item `i`, at most `size` pixels a side, its source read up to
        `max_source` bytes and refused over `max_decode_bytes` to decode."""
        data = self.cached(i, size)
        if data is not None:
            return data
        with self._lock:
            failed = self._failed.get(i)
            if failed is not None and time.monotonic() - failed[0] < FAILED_TTL:
                raise PictureUnavailable(failed[1])
        try:
            item = self.item_of(i)
            self._check_root(item)
            im = decode_upload(load_item_bytes(item, max_bytes=max_source), max_decode_bytes)
        except Exception as e:  # noqa: BLE001 -- a moved, broken, oversized or foreign file: this item fails
            self._remember_failure(i, e, size)
            raise PictureUnavailable(self._failed[i][1]) from None
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85 if size <= THUMB_SIZE else 90)
        data = buf.getvalue()
        with self._lock:
            if (i, size) not in self._pictures:
                self._pictures[(i, size)] = data
                self._cached_bytes += len(data)
            while self._cached_bytes > MAX_CACHED_BYTES:  # oldest first
                self._cached_bytes -= len(self._pictures.popitem(last=False)[1])
        return data

    def photo(self, i: int, max_source: int, max_decode_bytes: int) -> bytes:
        return self.picture(i, max_source, max_decode_bytes, PHOTO_SIZE)

    def serves(self, item: dict) -> bool:
        """Whether `item` names a local file or shard this cache would read (not whether
        it is readable: that is known only when it is read)."""
        f = item.get("shard") or item.get("path")
        return isinstance(f, str) and bool(f) and not is_remote(f)

    def _remember_failure(self, i: int, e: Exception, size: int) -> None:
        r = getattr(e, "reason", None)  # BadImage's reason, else the error's type
        reason = r if isinstance(r, str) and r else type(e).__name__
        why = one_line(e) if isinstance(r, str) else f"{type(e).__name__}: {one_line(e)}"
        why = strip_controls(why).replace("\n", " ")[:300]
        with self._lock:
            self._failed[i] = (time.monotonic(), why)
            self._failed.move_to_end(i)
            while len(self._failed) > MAX_FAILED:
                self._failed.popitem(last=False)
            self.failures[reason] += 1
        logger.warning("no %s for item %d: %s (not retried for %.0f s)", "thumbnail" if size <= THUMB_SIZE else "photo",
                       i, why, FAILED_TTL)

    def _check_root(self, item: dict) -> None:
        """Refuse `item` when its file (or shard) is not under one of `self.roots`."""
        f = item.get("shard") or item.get("path")
        if not isinstance(f, str) or not f or is_remote(f):
            return  # nothing local to read here (load_item_bytes refuses remote and pipe: shards)
        real = os.path.realpath(f)
        if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in self.roots):
            raise BadImage("outside_roots", f"{f} is outside the folders pictures are served from "
                                            "(serve --images-root)")
