"""Tar shards read into samples: members capped in size (a hostile tar cannot make a
reader hold gigabytes), a shard cut short counted against its sizes.json, a remote read
that fails opened again with back-off and resumed after the samples already given."""
from __future__ import annotations

import http.client
import logging
import re
import tarfile
import time
import zlib
from collections import Counter
from typing import Callable, Iterable, Iterator, Optional

from phoclip.data.catalog import shard_size
from phoclip.data.images import MAX_FILE_BYTES, BadImage
from phoclip.data.remote import is_missing, is_remote, local_path, open_local, open_url

logger = logging.getLogger(__name__)

RETRIES = 3                      # a failed remote shard read is retried this often, with back-off
BACKOFF_S = 1.0                  # ... waiting 1, 2, 4 s
MAX_MEMBER_BYTES = MAX_FILE_BYTES  # no member of a shard (image, ids, json) is larger
MAX_HEADER_BYTES = 1 << 20       # a GNU long name/link or pax header, which tarfile reads whole into memory
MAX_SHARD_HEADERS = 100_000      # tar headers read looking for one member (a shard of 1000 samples has 3000)
_WHOLE_HEADERS = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                  tarfile.SOLARIS_XHDTYPE)


class CappedTarInfo(tarfile.TarInfo):
    """tarfile's header parsing, except that a header tarfile would read whole into memory
    (a GNU long name or link, a pax record) is refused over MAX_HEADER_BYTES from its
    size field, unread: a sparse or crafted shard cannot make a reader hold gigabytes
    before any member cap applies. Pass as `tarfile.open(..., tarinfo=CappedTarInfo)`."""

    def _proc_member(self, tarfile_):  # tarfile's hook: called on every header it parses
        if self.type in _WHOLE_HEADERS and self.size > MAX_HEADER_BYTES:
            raise tarfile.ReadError(f"a tar header record of {self.size} bytes (over {MAX_HEADER_BYTES}) "
                                    f"at offset {self.offset}")
        return super()._proc_member(tarfile_)


def read_member(shard: str, name: str, cap: int) -> bytes:
    """Member `name` of a local, uncompressed tar shard (ours never are compressed: a
    .tar.gz/.xz is refused, not inflated), at most `cap` bytes: its size is checked from
    its header before a byte of it is read, and the headers on the way are capped
    (`CappedTarInfo`). Only a regular file is opened, without blocking (a FIFO must not
    hang the reader); headers are walked one by one up to MAX_SHARD_HEADERS, none kept,
    so a shard of millions of empty members costs a bounded read. Raises BadImage (too
    large, not a file, too many members), KeyError (absent), OSError or tarfile.TarError."""
    with open_local(shard) as f, tarfile.open(fileobj=f, mode="r:", tarinfo=CappedTarInfo) as tf:
        for _ in range(MAX_SHARD_HEADERS):
            m = tf.next()
            if m is None:
                raise KeyError(f"{name} not in {shard}")
            tf.members.clear()  # the walk keeps no list of what it passed
            if m.name != name:
                continue
            if not m.isreg():
                raise BadImage("not_a_file", f"{shard}/{m.name} is not a regular member")
            if m.size > cap:  # a sparse or crafted member would cost its whole size
                raise BadImage("too_large_file", f"{shard}/{m.name}: {m.size} bytes > {cap}")
            return tf.extractfile(m).read(cap + 1)
    raise BadImage("too_many_members", f"{shard}: {name} not within its first {MAX_SHARD_HEADERS} members")


class Skips:
    """Handler for webdataset's tar stages: count the error, keep going."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    def __call__(self, exn: BaseException) -> bool:
        self.counter["corrupt_shard"] += 1
        logger.warning("skipping unreadable shard data: %r", exn)
        return True


def tar_files(stream, url: str, skips: Counter, raise_errors: bool = False,
              max_bytes: Optional[int] = None) -> Iterator[dict]:
    """A tar stream's regular files as webdataset's `{fname, data, __url__}` records (its
    `tar_file_expander`, whose `group_by_keys` groups them into samples), except that a
    member larger than `max_bytes` (default MAX_MEMBER_BYTES) is passed over unread and
    counted (`oversized_member`): a hostile tar cannot make a reader hold gigabytes. A
    damaged stream ends the shard, counted (`corrupt_shard`), or raises with
    `raise_errors` (the remote reader retries)."""
    cap = MAX_MEMBER_BYTES if max_bytes is None else max_bytes
    try:
        # CappedTarInfo: a long-name or pax header is refused from its size, never read whole
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=CappedTarInfo) as tar:
            for m in tar:
                if not m.isreg() or re.match(r"__[^/]*__($|/)", m.name):
                    continue
                if m.size > cap:
                    skips["oversized_member"] += 1
                    logger.warning("%s: member %s is %d bytes, over the %d-byte cap; skipped unread",
                                   url, m.name, m.size, cap)
                    continue
                data = tar.extractfile(m).read()
                tar.members = []  # stream mode would keep every header of the shard
                yield {"fname": m.name, "data": data, "__url__": url}
    except (tarfile.TarError, EOFError, zlib.error) as e:
        if raise_errors:
            raise
        Skips(skips)(e)


def read_shards(shards: Iterable[dict], skips: Counter, manifest: Optional[str] = None,
                retries: Optional[int] = None, backoff_s: Optional[float] = None,
                max_member_bytes: Optional[int] = None,
                gave_up: Optional[Callable[[dict, int], None]] = None) -> Iterator[dict]:
    """Tar shards → samples. A shard that yields fewer samples than its sizes.json entry
    is counted as truncated (tarfile ends a cut-off stream silently). A remote shard
    whose read fails (connection refused or dropped, a pipe command failing) is opened
    again after 1, 2, 4 s, skipping the samples already given (`shard_retries`); after
    `retries` it is skipped and counted (`unreadable_shard`): a flaky connection does
    not end a run, and a read that recovers loses nothing. A shard that does not exist
    (`remote.is_missing`: HTTP 404, a pipe: command failing at once without a byte) is
    skipped and counted at its first attempt. A tar member over
    `max_member_bytes` (default MAX_MEMBER_BYTES) is skipped unread (`oversized_member`).

    `gave_up(src, samples_given)` is told of each remote shard skipped after its retries
    or as missing (the stream remembers it, `phoclip.data.health.ShardMemory`); a shard
    whose `src["max_samples"]` is set is read only that far (a resumed stream replaying a
    shard that was given up after that many samples). `retries` and `backoff_s` default
    to RETRIES and BACKOFF_S as they are when the read starts."""
    from webdataset.tariterators import group_by_keys  # lazy: webdataset imports torch (~1 s), paid by a read only

    retries = RETRIES if retries is None else retries
    backoff_s = BACKOFF_S if backoff_s is None else backoff_s
    cache: dict = {}
    for src in shards:
        url = src["url"]
        limit = src.get("max_samples")
        n = 0
        if is_remote(url):
            try:
                want = shard_size(url, cache, manifest)
            except ValueError:
                want = None
            on_give_up = (lambda given, src=src: gave_up(src, given)) if gave_up else None
            remote = _read_remote(url, skips, retries, backoff_s, want, max_member_bytes, on_give_up)
            try:
                for sample in remote:
                    n += 1
                    yield sample
                    if limit is not None and n >= limit:
                        break
            finally:
                remote.close()  # a limited read ends its connection here, not when collected
        else:
            path = local_path(url)
            try:
                with open_local(path) as f:
                    for sample in group_by_keys(tar_files(f, path, skips, max_bytes=max_member_bytes),
                                                handler=Skips(skips)):
                        n += 1
                        yield sample
                        if limit is not None and n >= limit:
                            break
            except OSError as e:  # a missing or unreadable shard file
                Skips(skips)(e)
        if limit is not None or (url.startswith("pipe:") and manifest is None):
            continue  # no catalogue to check against (make_shards --source wds:'pipe:...')
        try:
            want = shard_size(url, cache, manifest)
        except ValueError as e:  # an unreachable sizes.json costs the check, not the run
            logger.warning("cannot check the size of %s: %s", url, e)
            want = None
        if want is not None and n < want:
            skips["truncated_shard"] += 1
            logger.warning("shard %s ended after %d of its %d samples (truncated?)", url, n, want)


def _read_remote(url: str, skips: Counter, retries: int, backoff_s: float,
                 want: Optional[int] = None, max_member_bytes: Optional[int] = None,
                 on_give_up: Optional[Callable[[int], None]] = None) -> Iterator[dict]:
    from webdataset.handlers import reraise_exception  # lazy: webdataset imports torch (~1 s), paid by a read only
    from webdataset.tariterators import group_by_keys

    given = 0  # samples of this shard already yielded: skipped after a reopen
    for attempt in range(retries + 1):
        try:
            with open_url(url) as stream:
                files = tar_files(stream, url, skips, raise_errors=True, max_bytes=max_member_bytes)
                for i, sample in enumerate(group_by_keys(files, handler=reraise_exception)):
                    if i < given:
                        continue
                    given += 1
                    yield sample
            if want is not None and given < want:  # a stream cut at a member boundary ends "cleanly"
                raise EOFError(f"the stream ended after {given} of the {want} samples sizes.json lists")
            return
        except (OSError, http.client.HTTPException, tarfile.TarError, EOFError, ValueError) as e:
            if is_missing(e) and not given:  # a missing object is not a slow one
                skips["unreadable_shard"] += 1
                logger.warning("skipping shard %s: it does not exist (%s)", url, e)
                if on_give_up:
                    on_give_up(given)
                return
            if attempt == retries:
                skips["unreadable_shard"] += 1
                logger.warning("skipping shard %s after %d attempts (%d samples read): %s",
                               url, attempt + 1, given, e)
                if on_give_up:
                    on_give_up(given)
                return
            skips["shard_retries"] += 1
            logger.warning("reading %s failed (%s); retrying in %.0f s", url, e, backoff_s * 2 ** attempt)
            time.sleep(backoff_s * 2 ** attempt)
