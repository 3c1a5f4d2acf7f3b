"""Our WebDataset shards: the catalogue (brace patterns, shard folders, sizes.json; the
manifest through `phoclip.data.manifest`), tar reading with truncation counted, and the safe decoding of one sample
(.npy ids parsed by hand, JSON capped, images through `phoclip.data.images`). Bad samples
raise `BadImage`/`BadSample` with a `reason` (the skip counter's key)."""
from __future__ import annotations

import io
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from phoclip.data.images import MAX_FILE_BYTES, decode_rgb

logger = logging.getLogger(__name__)

MAX_CATALOGUE_BYTES = 64 << 20  # a manifest.json or sizes.json larger than this is refused
RETRIES = 3                      # a failed remote shard read is retried this often, with back-off
BACKOFF_S = 1.0                  # ... waiting 1, 2, 4 s


# ----------------------------------------------------------------------------- where shards live

def is_remote(url: str) -> bool:
    """`pipe:CMD`, http(s):// and fsspec URLs (s3://, gs://, ...); a path or file:// is local."""
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file://"))


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def shard_name(url: str) -> str:
    """The shard's file name, as sizes.json lists it (for `pipe:` commands: the last
    word of the command that ends in .tar)."""
    if url.startswith("pipe:"):
        words = [w.rstrip(";|&") for w in url[5:].split() if w.rstrip(";|&").endswith(".tar")]
        if not words:
            raise ValueError(f"{url}: a pipe: shard command must name its .tar file (to find it in sizes.json)")
        return words[-1].rsplit("/", 1)[-1]
    return url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def catalogue_dir(url: str, manifest: Optional[str] = None) -> str:
    """Where the shard's manifest.json and sizes.json are: beside `manifest` when given
    (data.manifest), else beside the shard. A `pipe:` shard has no place of its own."""
    if manifest:
        return _dirname(manifest)
    if url.startswith("pipe:"):
        raise ValueError(f"{url}: for pipe: shards pass where their manifest is: data.manifest=URL "
                         "(sizes.json is read beside it)")
    return _dirname(url)


def _dirname(url: str) -> str:
    if is_remote(url):
        return url.split("?", 1)[0].rsplit("/", 1)[0]
    return os.path.dirname(_local_path(url)) or "."


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
                              f"{LOW_SPEED_BYTES} bytes/s floor (phoclip.data.shards.LOW_SPEED_BYTES)")
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


class _PipeStream(io.RawIOBase):
    """stdout of a shell command; a non-zero exit is an error at the end of the stream.
    A command that sends nothing (or too little) for LOW_SPEED_TIME_S is killed (TooSlow);
    its stderr goes to a temporary file (a chatty command cannot block on a full pipe)."""

    def __init__(self, cmd: str) -> None:
        import subprocess
        import tempfile

        self.cmd = cmd
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=self.err, bufsize=0,
                                     stdin=subprocess.DEVNULL, preexec_fn=_pipe_child_setup)
        self.guard = _LowSpeedGuard(f"pipe:{cmd}")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        import select

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
                raise OSError(f"pipe:{self.cmd} exited with {rc}: {err[-1] if err else ''}")
            return 0
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
    return open_local(_local_path(url))


def open_local(path: str):
    """A local file (shard, manifest) opened for reading; a FIFO (which would block for ever), a
    device or a folder at its name is an OSError naming it, found without blocking."""
    import stat

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
        return read_small(url) if os.path.isfile(_local_path(url)) else None
    try:
        return read_small(url)
    except FileNotFoundError:
        return None
    except OSError as e:
        if getattr(e, "code", None) == 404:  # urllib's HTTPError
            return None
        raise


def expand_urls(spec: str, weights: Optional[str] = None, split: str = "train") -> tuple[list[str], list[float]]:
    """`a/train-{000000..000009}.tar::b/train-{000000..000003}.tar` → urls, per-url weights.

    A source may also be a shard folder (`shards/vi`, `s3://bucket/vi/`) or its
    `manifest.json`: its `split` shards, as the manifest lists them. `weights` ("1::2")
    gives each source's sampling weight. Every local shard must exist; remote ones
    (`pipe:`, http(s)://, fsspec URLs) are read when the stream reaches them."""
    import braceexpand

    parts = [p for p in spec.split("::") if p]
    ws = [float(w) for w in weights.split("::")] if weights else [1.0] * len(parts)
    if len(ws) != len(parts):
        raise ValueError(f"{len(ws)} weights given for {len(parts)} shard sources in {spec!r}")
    urls, url_w = [], []
    for part, w in zip(parts, ws):
        expanded = _split_shards(part, split) if _names_a_folder(part) else list(braceexpand.braceexpand(part))
        for u in expanded:
            urls.append(u)
            url_w.append(w)
    missing = [u for u in urls if not is_remote(u) and not os.path.exists(_local_path(u))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards do not exist, e.g. "
                                f"{missing[0]}; check data.train_shards / data.val_shards")
    return urls, url_w


def _names_a_folder(part: str) -> bool:
    if part.startswith("pipe:") or "{" in part:
        return False
    if part.endswith(("manifest.json", "/")):
        return True
    return not is_remote(part) and os.path.isdir(_local_path(part))


def _split_shards(part: str, split: str) -> list[str]:
    """A shard folder's (or its manifest's) shards of one split, as manifest.json lists them."""
    from phoclip.data.manifest import Manifest

    man = part if part.endswith("manifest.json") else join_url(part.rstrip("/") or "/", "manifest.json")
    try:
        data = read_optional(man)
    except OSError as e:
        raise ValueError(f"{man}: cannot be read ({e})") from None
    if data is None:
        raise FileNotFoundError(f"{part}: no manifest.json there; give a shard folder made by make_shards, "
                                "its manifest.json, or a brace pattern such as 'shards/train-{000000..000009}.tar'")
    return [join_url(_dirname(man), n) for n in Manifest.read(man, data).split_shards(split)]


def count_samples(urls: Iterable[str], manifest: Optional[str] = None) -> int:
    """Samples in the given shards, from the sizes.json files beside them (or beside
    `manifest`)."""
    total, cache = 0, {}
    for u in urls:
        n = _shard_sizes(u, cache, manifest)
        if n is None:
            raise ValueError(f"{u} is not listed in {join_url(catalogue_dir(u, manifest), 'sizes.json')}")
        total += n
    return total


class BadSample(ValueError):
    """A sample that cannot be used; `reason` is its counter key (as BadImage's)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


MAX_CAPTIONS = 4096        # id rows one sample may hold
MAX_JSON_BYTES = 1 << 20   # a sample's metadata


def decode_ids(data: bytes, width: Optional[int] = None, vocab_size: Optional[int] = None) -> np.ndarray:
    """A sample's `.ids.npy` → int64 [n, L], checked before anything is allocated: the
    header's shape must match the bytes that follow (a header claiming a huge shape is
    refused, not allocated), L the manifest's max length, every id in [0, vocab_size)."""
    f = io.BytesIO(data)
    try:
        fmt = np.lib.format
        version = fmt.read_magic(f)
        read_header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"unknown .npy version {version}")
        shape, fortran, dtype = read_header(f)
    except Exception as e:  # noqa: BLE001 -- numpy's header parser raises ValueError, SyntaxError,
        # tokenize.TokenError (an unclosed bracket), RecursionError...: any of them is one bad sample
        raise BadSample("bad_ids", f"not a .npy array ({type(e).__name__}: {e})") from None
    if dtype.hasobject or dtype.kind not in "iu" or len(shape) != 2 or fortran:
        raise BadSample("bad_ids", f"expected a 2-d integer array, got {dtype} {shape}")
    n, length = shape
    if not 0 < n <= MAX_CAPTIONS or (width is not None and length != width):
        raise BadSample("bad_ids_shape", f"shape {shape}, expected [1..{MAX_CAPTIONS}, {width}]")
    body = data[f.tell():]
    if len(body) != n * length * dtype.itemsize:
        raise BadSample("bad_ids_shape", f"header says {shape} but {len(body)} bytes follow")
    ids = np.frombuffer(body, dtype=dtype).reshape(n, length).astype(np.int64)
    if ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size):
        raise BadSample("bad_ids_range", f"ids in [{ids.min()}, {ids.max()}], vocabulary {vocab_size}")
    return ids


def decode_meta(data: Optional[bytes]) -> dict:
    """A sample's `.json` (evaluation and search read it; training does not)."""
    if data is None:
        return {}
    if len(data) > MAX_JSON_BYTES:
        raise BadSample("bad_json", f"{len(data)} bytes")
    try:
        meta = json.loads(data)
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deeply
        raise BadSample("bad_json", type(e).__name__) from None
    if not isinstance(meta, dict):
        raise BadSample("bad_json", "not an object")
    return meta


def decode_sample(sample: dict, width: Optional[int] = None, vocab_size: Optional[int] = None,
                  with_meta: bool = True) -> tuple[Any, np.ndarray, dict]:
    """Raw tar sample → (PIL image, ids [n, L], meta). Never unpickles: .npy parsed by
    hand, JSON, JPEG only. Raises BadImage / BadSample (each with a `reason`)."""
    for k in ("jpg", "ids.npy"):
        if k not in sample:
            raise BadSample(f"missing_{k.replace('.', '_')}")
    ids = decode_ids(sample["ids.npy"], width, vocab_size)
    meta = decode_meta(sample.get("json")) if with_meta else {}
    img = decode_rgb(sample["jpg"])
    return img, ids, meta


def decode_counted(sample: dict, skips: Counter, width: Optional[int] = None, vocab_size: Optional[int] = None,
                   with_meta: bool = True) -> Optional[tuple[Any, np.ndarray, dict]]:
    """`decode_sample`, or None with the reason counted in `skips` (images as image_REASON)."""
    from phoclip.data.images import BadImage

    try:
        return decode_sample(sample, width, vocab_size, with_meta)
    except BadImage as e:
        skips[f"image_{e.reason}"] += 1
    except BadSample as e:
        skips[e.reason] += 1
    return None


class _Skips:
    """Handler for webdataset's tar stages: count the error, keep going."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    def __call__(self, exn: BaseException) -> bool:
        self.counter["corrupt_shard"] += 1
        logger.warning("skipping unreadable shard data: %r", exn)
        return True


def _shard_sizes(url: str, cache: dict, manifest: Optional[str] = None) -> Optional[int]:
    d = catalogue_dir(url, manifest)
    if d not in cache:
        f = join_url(d, "sizes.json")
        try:
            data = read_optional(f)
            sizes = json.loads(data.decode("utf-8")) if data is not None else {}
        except (OSError, ValueError, RecursionError) as e:
            raise ValueError(f"{f}: unreadable ({type(e).__name__}: {e})") from None
        if not isinstance(sizes, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                  for v in sizes.values()):
            raise ValueError(f"{f}: expected {{shard file: sample count}}")
        cache[d] = sizes
    return cache[d].get(shard_name(url))


MAX_MEMBER_BYTES = MAX_FILE_BYTES  # no member of a shard (image, ids, json) is larger


def tar_files(stream, url: str, skips: Counter, raise_errors: bool = False,
              max_bytes: Optional[int] = None) -> Iterator[dict]:
    """A tar stream's regular files as webdataset's `{fname, data, __url__}` records (its
    `tar_file_expander`, whose `group_by_keys` groups them into samples), except that a
    member larger than `max_bytes` (default MAX_MEMBER_BYTES) is passed over unread and
    counted (`oversized_member`): a hostile tar cannot make a reader hold gigabytes. A
    damaged stream ends the shard, counted (`corrupt_shard`), or raises with
    `raise_errors` (the remote reader retries)."""
    import re
    import tarfile
    import zlib

    cap = MAX_MEMBER_BYTES if max_bytes is None else max_bytes
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
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
        _Skips(skips)(e)


def read_shards(shards: Iterable[dict], skips: Counter, manifest: Optional[str] = None,
                retries: int = RETRIES, backoff_s: float = BACKOFF_S,
                max_member_bytes: Optional[int] = None) -> Iterator[dict]:
    """Tar shards → samples. A shard that yields fewer samples than its sizes.json entry
    is counted as truncated (tarfile ends a cut-off stream silently). A remote shard
    whose read fails (connection refused or dropped, a pipe command failing) is opened
    again after 1, 2, 4 s, skipping the samples already given (`shard_retries`); after
    `retries` it is skipped and counted (`unreadable_shard`): a flaky connection does
    not end a run, and a read that recovers loses nothing. A tar member over
    `max_member_bytes` (default MAX_MEMBER_BYTES) is skipped unread (`oversized_member`)."""
    from webdataset.tariterators import group_by_keys

    cache: dict = {}
    for src in shards:
        url = src["url"]
        n = 0
        if is_remote(url):
            try:
                want = _shard_sizes(url, cache, manifest)
            except ValueError:
                want = None
            for sample in _read_remote(url, skips, retries, backoff_s, want, max_member_bytes):
                n += 1
                yield sample
        else:
            path = _local_path(url)
            try:
                with open_local(path) as f:
                    for sample in group_by_keys(tar_files(f, path, skips, max_bytes=max_member_bytes),
                                                handler=_Skips(skips)):
                        n += 1
                        yield sample
            except OSError as e:  # a missing or unreadable shard file
                _Skips(skips)(e)
        if url.startswith("pipe:") and manifest is None:
            continue  # no catalogue to check against (make_shards --source wds:'pipe:...')
        try:
            want = _shard_sizes(url, cache, manifest)
        except ValueError as e:  # an unreachable sizes.json costs the check, not the run
            logger.warning("cannot check the size of %s: %s", url, e)
            want = None
        if want is not None and n < want:
            skips["truncated_shard"] += 1
            logger.warning("shard %s ended after %d of its %d samples (truncated?)", url, n, want)


def _read_remote(url: str, skips: Counter, retries: int, backoff_s: float,
                 want: Optional[int] = None, max_member_bytes: Optional[int] = None) -> Iterator[dict]:
    import http.client
    import tarfile
    import time

    from webdataset.handlers import reraise_exception
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
            if attempt == retries:
                skips["unreadable_shard"] += 1
                logger.warning("skipping shard %s after %d attempts (%d samples read): %s",
                               url, attempt + 1, given, e)
                return
            skips["shard_retries"] += 1
            logger.warning("reading %s failed (%s); retrying in %.0f s", url, e, backoff_s * 2 ** attempt)
            time.sleep(backoff_s * 2 ** attempt)
