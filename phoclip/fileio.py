"""Atomic file writes: the one helper every manifest, record, index and checkpoint file
goes through. The bytes go to a temporary file in the same folder, are flushed and
fsynced, then renamed over the target (atomic), and the folder is fsynced so the rename
itself survives a power cut. A reader sees the old file or the new one, never half.

The temporary name is unpredictable and created exclusively (O_EXCL | O_NOFOLLOW): in a
folder others can write (shared scratch), a link planted at a name we would use is never
followed, so a job cannot be made to overwrite a file outside its folder. The final name
is never opened for writing; the rename replaces whatever is there, a link included (the
link itself, not its target)."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import IO, Any, Iterator

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new file in `path` durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def create_temp(path: str | os.PathLike, mode: int = 0o644) -> tuple[int, Path]:
    """A new, empty temporary file beside `path` (same folder, so a rename onto `path` is
    atomic), created exclusively under a random name that no link can be planted at:
    (open write-only fd, its path). The caller renames it into place or unlinks it."""
    path = Path(path)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode)
        except FileExistsError:
            continue
        return fd, tmp
    raise FileExistsError(f"{path.parent}: could not create a temporary file for {path.name}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: int = 0o644, durable: bool = True) -> Iterator[IO[bytes]]:
    """`with atomic_open(p) as f: f.write(...)`: a binary file that becomes `p` (flushed,
    fsynced, renamed, folder fsynced) only when the block ends without an exception; on
    an exception the temporary file is removed and `p` is untouched. `durable=False`
    skips the fsyncs (a cache that may be lost in a power cut, written by the thousand)."""
    path = Path(path)
    fd, tmp = create_temp(path, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644, durable: bool = True) -> Path:
    """Write `data` to `path` atomically and (unless `durable=False`) durably."""
    path = Path(path)
    with atomic_open(path, mode, durable) as f:
        f.write(data)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, **kw: Any) -> Path:
    kw.setdefault("ensure_ascii", False)
    return atomic_write_text(path, json.dumps(obj, **kw))


def real_dir(path: str | os.PathLike) -> Path:
    """`path` as a folder of our own to write into: created if missing (parents too); a
    link or a non-folder there is refused (OSError naming it), so that files meant for
    it cannot land in a folder elsewhere."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    import stat

    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        kind = "a link" if stat.S_ISLNK(st.st_mode) else "not a folder"
        raise OSError(f"{path}: {kind}; refusing to write into it (remove it, or use another output folder)")
    return path


def read_regular(path: str | os.PathLike, max_bytes: int, follow_links: bool = True) -> bytes:
    """The bytes of a regular file of at most `max_bytes`, else OSError naming the file:
    a folder, a FIFO (which would block forever), a device such as /dev/zero (which never
    ends) or a file over the cap is refused without being read. With `follow_links` off,
    a link is refused too (files of an output folder others can write)."""
    import stat

    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | _CLOEXEC | (0 if follow_links else _NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError:
        if not follow_links and os.path.islink(path):
            raise OSError(f"{path}: a link, not a file; refused") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, FIFO or socket)"
            raise OSError(f"{path}: {kind}; refused")
        if st.st_size > max_bytes:
            raise OSError(f"{path}: {st.st_size} bytes, over the {max_bytes}-byte cap; refused unread")
        chunks, n = [], 0
        while True:  # the size may change while we read: the cap holds regardless
            b = os.read(fd, min(1 << 24, max_bytes + 1 - n))
            if not b:
                break
            chunks.append(b)
            n += len(b)
            if n > max_bytes:
                raise OSError(f"{path}: grew over the {max_bytes}-byte cap while read; refused")
        return b"".join(chunks)
    finally:
        os.close(fd)
