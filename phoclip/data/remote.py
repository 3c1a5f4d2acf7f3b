"""Reading bytes from where shards and their catalogue live: a local path, file://,
`pipe:CMD`, http(s):// or an fsspec URL (s3://, gs://, ...). Remote streams are held to a
low-speed floor (a server that trickles is given up, not waited on for ever), and a
`pipe:` command runs as a child that takes the job's signals and dies with its reader."""
from __future__ import annotations

import io
import os
import re
import select
import signal
import stat
import subprocess
import sys
import tempfile
import time
from typing import Optional

MAX_CATALOGUE_BYTES = 64 << 20  # a manifest.json or sizes.json larger than this is refused


def is_remote(url: str) -> bool:
    """`pipe:CMD`, http(s):// and fsspec URLs (s3://, gs://, ...); a path or file:// is local."""
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file://"))


def local_path(url: str) -> str:
    """The path of a local url (a path, or file://PATH)."""
    return url[len("file://"):] if url.startswith("file://") else url


def url_dirname(url: str) -> str:
    """The folder of a path or URL (a URL's query dropped)."""
    if is_remote(url):
        return url.split("?", 1)[0].rsplit("/", 1)[0]
    return os.path.dirname(local_path(url)) or "."


def join_url(d: str, name: str) -> str:
    """`name` inside the folder `d` (a local path or a URL)."""
    return f"{d}/{name}" if is_remote(d) else os.path.join(d, name)


# A remote read slower than LOW_SPEED_BYTES per second over LOW_SPEED_TIME_S is given up
# (curl's --speed-limit / --speed-time): a server that trickles a byte every 20 s never
# trips a per-read timeout, and would hold a rank without a step, or a warning, for ever.
# The reader then retries and, in the end, skips and counts the shard.
LOW_SPEED_BYTES = 1024
LOW_SPEED_TIME_S = 60.0


class TooSlow(TimeoutError):
    """A shard's bytes arrive too slowly (see LOW_SPEED_BYTES / LOW_SPEED_TIME_S)."""


class _LowSpeedGuard:
    """Measures a stream's rate in windows of LOW_SPEED_TIME_S; raises TooSlow when a
    window brought fewer than LOW_SPEED_BYTES per second."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.t0, self.n = time.monotonic(), 0

    def left(self) -> float:
        """Seconds until the current window closes."""
        return max(0.0, LOW_SPEED_TIME_S - (time.monotonic() - self.t0))

    def got(self, n: int) -> None:
        self.n += n
        dt = time.monotonic() - self.t0
        if dt >= LOW_SPEED_TIME_S:
            if self.n < LOW_SPEED_BYTES * dt:
                raise TooSlow(f"{self.what}: {self.n} bytes in {dt:.0f} s, under the "
                              f"{LOW_SPEED_BYTES} bytes/s floor (phoclip.data.remote.LOW_SPEED_BYTES)")
            self.t0, self.n = time.monotonic(), 0


def _pipe_child_setup() -> None:  # runs in the child between fork and exec
    # a DataLoader worker ignores SIGTERM (the main process owns the shutdown), and ignored
    # signals survive exec: give the command the default dispositions back, so that the
    # job's SIGTERM ends it, and make it die with the worker that reads it
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def _load_prctl():
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


MISSING_WITHIN_S = 5.0
"""A pipe: command that exits non-zero within this many seconds without a byte, saying
so on stderr (MISSING_WORDS), found no object (`aws s3 cp` of a missing key, `curl -f` of
a 404, `cat` of no file): not a slow read to retry. Any other quick failure (a refused
connection, a timeout) may pass, and is retried."""
MISSING_WORDS = re.compile(r"\b(404|410)\b|not found|no such|does not exist|nosuchkey|not exist", re.IGNORECASE)


class MissingObject(FileNotFoundError):
    """A remote shard that does not exist: reading it again will not help."""


def is_missing(e: BaseException) -> bool:
    """Whether a remote read failed because the object does not exist (HTTP 404/410, an
    fsspec FileNotFoundError, a pipe: command that failed at once without a byte)."""
    return isinstance(e, FileNotFoundError) or getattr(e, "code", None) in (404, 410)


class _PipeStream(io.RawIOBase):
    """stdout of a shell command; a non-zero exit is an error at the end of the stream
    (MissingObject when it came within MISSING_WITHIN_S without a byte). A command that
    sends nothing (or too little) for LOW_SPEED_TIME_S is killed (TooSlow); its stderr goes
    to a temporary file (a chatty command cannot block on a full pipe)."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd
        self.started, self.got_bytes = time.monotonic(), 0
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=self.err, bufsize=0,
                                     stdin=subprocess.DEVNULL, preexec_fn=_pipe_child_setup)
        self.guard = _LowSpeedGuard(f"pipe:{cmd}")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        fd = self.proc.stdout.fileno()
        while not select.select([fd], [], [], self.guard.left())[0]:
            self.guard.got(0)  # the window closed with no byte: raises unless it was fast enough
        n = self.proc.stdout.readinto(b)
        if not n:
            rc = self.proc.wait()
            if rc != 0:
                self.err.seek(0, os.SEEK_END)
                self.err.seek(max(0, self.err.tell() - 2000))
                err = self.err.read().decode(errors="replace").strip().splitlines()
                if (not self.got_bytes and time.monotonic() - self.started < MISSING_WITHIN_S
                        and err and MISSING_WORDS.search(err[-1])):
                    raise MissingObject(f"pipe:{self.cmd} exited with {rc} at once, without a byte (no such "
                                        f"object?): {err[-1] if err else ''}")
                raise OSError(f"pipe:{self.cmd} exited with {rc}: {err[-1] if err else ''}")
            return 0
        self.got_bytes += n
        self.guard.got(n)
        return n

    def close(self) -> None:
        if self.proc.poll() is None:
            _kill_tree(self.proc.pid)  # the shell and what it started (curl | ..., sleep)
        self.proc.wait()
        self.proc.stdout.close()
        self.err.close()
        super().close()


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants (Linux: found through /proc; elsewhere the
    process alone)."""
    children: dict[int, list[int]] = {}
    try:
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat", "rb") as f:
                        ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                children.setdefault(ppid, []).append(int(d))
    except OSError:
        pass
    todo, tree = [pid], []
    while todo:
        q = todo.pop()
        tree.append(q)
        todo.extend(children.get(q, ()))
    for q in tree:
        try:
            os.kill(q, signal.SIGKILL)
        except OSError:
            pass


class _HTTPBody(io.RawIOBase):
    """An HTTP response body that raises when the connection ends before Content-Length
    (http.client returns a short read silently there), or when it arrives too slowly."""

    def __init__(self, resp, url: str = "") -> None:
        self.resp, self.got = resp, 0
        n = resp.headers.get("Content-Length")
        self.want = int(n) if n and n.isdigit() else None
        self.guard = _LowSpeedGuard(url or "HTTP body")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.resp.read1(len(b))  # one socket read: readinto waits to fill all of b
        n = len(data)
        b[:n] = data
        self.got += n
        if not n and self.want is not None and self.got < self.want:
            raise OSError(f"connection closed after {self.got} of {self.want} bytes")
        if n:
            self.guard.got(n)
        return n

    def close(self) -> None:
        self.resp.close()
        super().close()


class _Guarded(io.RawIOBase):
    """Any binary stream (an fsspec file), measured by the low-speed rule."""

    def __init__(self, f, what: str) -> None:
        self.f, self.guard = f, _LowSpeedGuard(what)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        n = len(data)
        b[:n] = data
        if n:
            self.guard.got(n)
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


def open_url(url: str, timeout: Optional[float] = None):
    """A binary stream of a local path, file://, `pipe:CMD`, http(s):// (urllib) or an
    fsspec URL (s3://, gs://, ... when the matching fsspec package is installed). Remote
    streams slower than the low-speed floor raise TooSlow (see LOW_SPEED_BYTES)."""
    if url.startswith("pipe:"):
        return io.BufferedReader(_PipeStream(url[5:]), 1 << 20)
    if url.startswith(("http://", "https://")):
        import urllib.request

        resp = urllib.request.urlopen(url, timeout=timeout or LOW_SPEED_TIME_S)
        return io.BufferedReader(_HTTPBody(resp, url), 1 << 20)
    if is_remote(url):
        try:
            import fsspec
        except ImportError as e:
            raise OSError(f"{url}: reading this URL needs fsspec (pip install fsspec s3fs/gcsfs)") from e
        try:
            return io.BufferedReader(_Guarded(fsspec.open(url, "rb").open(), url), 1 << 20)
        except (ImportError, ValueError) as e:  # the scheme's package is missing
            raise OSError(f"{url}: {e}") from e
    return open_local(local_path(url))


def open_local(path: str):
    """A local file (shard, manifest) opened for reading; a FIFO (which would block for ever), a
    device or a folder at its name is an OSError naming it, found without blocking."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path}: not a regular file (a FIFO, device or folder); skipped unread")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_small(url: str, max_bytes: int = MAX_CATALOGUE_BYTES) -> bytes:
    """The bytes of a small file (manifest.json, sizes.json) wherever it is, capped."""
    with open_url(url) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{url}: larger than {max_bytes} bytes")
    return data


def read_optional(url: str) -> Optional[bytes]:
    """`read_small`, or None where the file does not exist (a local path that is not a
    regular file, HTTP 404, an fsspec FileNotFoundError). Read once: a remote file is not
    fetched to test that it exists. Other failures (refused, timed out) raise OSError."""
    if not is_remote(url):
        return read_small(url) if os.path.isfile(local_path(url)) else None
    try:
        return read_small(url)
    except FileNotFoundError:
        return None
    except OSError as e:
        if getattr(e, "code", None) == 404:  # urllib's HTTPError
            return None
        raise
