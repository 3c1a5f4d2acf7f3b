"""Where a make_shards job writes: a local folder, or an fsspec URL (s3://, gs://,
file://, ...) fed from a local staging folder.

With a URL, each shard is written and checked in the staging folder as usual, then
uploaded by the worker that wrote it, then its `.done` record; only then is the local
copy removed. The upload is atomic: on a filesystem with a rename (file://, local
mounts) it goes to a temporary name and is renamed; on an object store a PUT makes the
object visible only once it is complete, so it goes straight to its name. A reader of
the bucket never sees half a shard, and a shard without its `.done` record (the job
died between the two) is written again by the next run. The remote side is the truth:
a resumed job, on this machine or another, asks the bucket which shards are done.

A shard is complete when its `.done` record (`.done/NAME.json`, written by the worker
after the shard's rename) reads back well-formed and the shard itself is a regular file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Optional

from phoclip.fileio import atomic_open, atomic_write_json, atomic_write_text, read_regular

MAX_META_BYTES = 256 << 20  # a manifest, sizes.json, .plan or .done record of the output
MAX_DONE_BYTES = 64 << 20  # a completion record (its lost_keys list may be long)

logger = logging.getLogger(__name__)


def is_url(out: str) -> bool:
    """An output given as a URL (anything with a scheme), not a local path."""
    return "://" in str(out)


def _fs(url: str):
    try:
        from fsspec.core import url_to_fs
    except ImportError as e:  # pragma: no cover - fsspec is a requirement
        raise OSError(f"{url}: writing to a URL needs fsspec") from e
    try:
        return url_to_fs(url)
    except (ImportError, ValueError) as e:  # e.g. s3:// without s3fs installed
        raise OSError(f"{url}: cannot write there ({e}); install the matching fsspec package "
                      "(s3fs, gcsfs, adlfs)") from None


def _has_rename(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return bool({"file", "local"} & set(protocols))


def upload_atomic(fs, local: str, remote: str) -> None:
    """Upload one file so that `remote` appears whole or not at all. On a local
    filesystem (file://) it is copied to an unpredictable, exclusively created temporary
    name, fsynced and renamed: a link planted at a temporary or final name is never
    written through."""
    if _has_rename(fs):
        fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
        _copy_atomic(Path(local), Path(remote))
    else:
        fs.put_file(local, remote)


def _copy_atomic(src: Path, dst: Path) -> None:
    """`dst` becomes a copy of the regular file `src` (not followed if it is a link)."""
    import shutil

    fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f, atomic_open(dst) as out:
        shutil.copyfileobj(f, out, 1 << 20)


def default_staging(url: str, part: int) -> Path:
    """A stable local folder per (URL, part): a re-run on this machine finds its hash
    journal and source cache there again."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "phoclip" / "make_shards"
    return base / hashlib.sha256(f"{url}#{part}".encode()).hexdigest()[:16]


def done_path(out_dir: Path | str, shard_name: str) -> Path:
    return Path(out_dir) / ".done" / (shard_name + ".json")


def read_done(out_dir: Path | str, shard_name: str) -> Optional[dict]:
    """A shard's completion record, or None when it is missing or unreadable (a shard
    whose record cannot be trusted is written again, never assumed done)."""
    try:  # never through a link, nor from a FIFO or device planted in the output folder
        rec = json.loads(read_regular(done_path(out_dir, shard_name), MAX_DONE_BYTES, follow_links=False))
    except (OSError, ValueError, RecursionError):
        return None
    return rec if valid_done(rec, shard_name) else None


def valid_done(rec, shard_name: str) -> bool:
    """Whether `rec` is a well-formed completion record of `shard_name`."""
    return (isinstance(rec, dict) and rec.get("name") == shard_name and isinstance(rec.get("count"), int)
            and isinstance(rec.get("skipped"), dict) and isinstance(rec.get("lost_keys", []), list))


def is_complete(out_dir: Path | str, shard_name: str) -> bool:
    """A shard with its completion record, itself a regular file (not a link to one)."""
    if read_done(out_dir, shard_name) is None:
        return False
    try:
        return stat.S_ISREG(os.lstat(Path(out_dir) / shard_name).st_mode)
    except OSError:
        return False


class Output:
    """A job's output folder: `local` is where shards are written (the folder itself, or
    the staging folder of a URL); `url` is set when they are published elsewhere."""

    def __init__(self, local: Path, url: Optional[str] = None) -> None:
        self.local = Path(local)
        self.url = url.rstrip("/") if url else None
        self._listing: Optional[set] = None
        if self.url:
            self.fs, self.root = _fs(self.url)
            self.root = self.root.rstrip("/")

    def __str__(self) -> str:
        return self.url or str(self.local)

    def _remote(self, name: str) -> str:
        return f"{self.root}/{name}"

    def refresh(self) -> None:
        """List the remote folder once (shards and .done records): `is_complete` then
        asks this listing, not the store, once per shard."""
        if not self.url:
            return
        found = set()
        self.fs.invalidate_cache()  # fsspec caches listings per process; the bucket is the truth
        for sub in ("", ".done"):
            try:
                paths = self.fs.ls(f"{self.root}/{sub}" if sub else self.root, detail=False)
            except FileNotFoundError:
                continue
            found |= {(f"{sub}/" if sub else "") + p.rstrip("/").rsplit("/", 1)[-1] for p in paths}
        self._listing = found

    def is_complete(self, name: str) -> bool:
        if not self.url:
            return is_complete(self.local, name)
        if self._listing is None:
            self.refresh()
        return name in self._listing and f".done/{name}.json" in self._listing

    def read_done(self, names: list[str]) -> dict[str, Optional[dict]]:
        """The `.done` records of `names` (None where missing or unreadable)."""
        if not self.url:
            return {n: read_done(self.local, n) for n in names}
        paths = {self._remote(f".done/{n}.json"): n for n in names}
        got = self.fs.cat(list(paths), on_error="return") if paths else {}
        out = {}
        for path, name in paths.items():
            data = got.get(path)
            try:
                rec = json.loads(data) if isinstance(data, bytes) else None
            except ValueError:
                rec = None
            out[name] = rec if valid_done(rec, name) else None
        return out

    def read(self, name: str) -> Optional[bytes]:
        """The bytes of a file of the output (`name` may hold a folder), or None."""
        try:
            if self.url:
                return self.fs.cat_file(self._remote(name))
            # a file of a folder others may write: no link, FIFO or device, a size cap
            return read_regular(self.local / name, MAX_META_BYTES, follow_links=False)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read_text(self, name: str) -> Optional[str]:
        data = self.read(name)
        return None if data is None else data.decode()

    def parts(self) -> list[str]:
        """The part-NNNN folders of a job made in parts; locally, one that is a link (to
        a folder elsewhere) is refused."""
        pat = "part-[0-9][0-9][0-9][0-9]"
        if self.url:
            self.fs.invalidate_cache()
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.glob(f"{self.root}/{pat}"))
        found = sorted(self.local.glob(pat))
        for p in found:
            if p.is_symlink():
                raise ValueError(f"{p}: a link, not a part folder; refused")
        return [p.name for p in found]

    def link(self, src: str, dst: str) -> None:
        """`dst` becomes `src`'s content: a hard link locally (no copy on one
        filesystem), a server-side copy at a URL. Locally `src` must be a regular file
        (not a link), and `dst` is replaced by a rename, never written through: a link
        planted at `dst` is replaced, its target untouched."""
        if self.url:
            self.fs.copy(self._remote(src), self._remote(dst))
            return
        s, d = self.local / src, self.local / dst
        st = os.lstat(s)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{s}: not a regular file (a link?); refused")
        try:
            if os.path.samestat(os.lstat(d), st):
                return  # an earlier merge's link to this very file
        except FileNotFoundError:
            pass
        tmp = d.with_name(f".{d.name}.{secrets.token_hex(8)}.tmp")
        try:
            os.link(s, tmp, follow_symlinks=False)  # link() creates tmp exclusively
        except OSError:  # another filesystem, or links not supported: an atomic copy
            _copy_atomic(s, d)
            return
        try:
            os.replace(tmp, d)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self.local / name, text)
        if self.url:
            upload_atomic(self.fs, str(self.local / name), self._remote(name))

    def write_json(self, name: str, obj) -> None:
        (self.local / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.local / name, obj, indent=2, sort_keys=True)
        if self.url:
            upload_atomic(self.fs, str(self.local / name), self._remote(name))


def publish_shard(local_dir: str, url: str, name: str) -> None:
    """In the worker that wrote it: upload a finished shard, then its `.done` record, then
    drop the local copy of the shard."""
    fs, root = _fs(url)
    root = root.rstrip("/")
    local = Path(local_dir)
    upload_atomic(fs, str(local / name), f"{root}/{name}")
    upload_atomic(fs, str(local / ".done" / f"{name}.json"), f"{root}/.done/{name}.json")
    (local / name).unlink()
