"""A part's metadata: its rows (`image_path`, `caption`, `url`, `key`, `source`, `shard`;
captions: `caption`, `image_row`, `image_key`) in a parquet file, written a row group at a
time, and beside it the same rows as an uncompressed Arrow IPC copy
(`metadata_{NAME}.arrow`, `text_metadata_{NAME}.arrow`), written with the part and by
every merge: read memory-mapped, a row is a zero-copy slice, so an item costs the same
whatever the part's size and threads read at once (clip-retrieval's "metadata memory-mapped").
The parquet stays the part's published form; the Arrow file records which parquet it
was made from (size and footer digest) and is used only while that parquet is unchanged,
else the parquet is read (`MetadataReader`). Every file is read as untrusted: regular
files only, opened without blocking, decoded sizes capped, a damaged row refused in one
line naming the file."""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import mmap
import os
import stat
import threading
from pathlib import Path
from typing import Optional, Sequence

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from phoclip.fileio import create_temp, fsync_dir, real_dir

logger = logging.getLogger(__name__)

ROW_GROUP = 8192  # metadata rows per parquet row group: what a lazy item read decodes
PART_INFO = b"phoclip_part"  # the parquet key-value entry: how the part was made (source, part, of, skipped)
ARROW_SOURCE = b"phoclip_parquet"  # the Arrow file's schema entry: the parquet it was made from (size, footer digest, rows)
MAX_FOOTER = 64 << 20  # a parquet footer read to tell whether an Arrow file is its copy
_NOBLOCK = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
IMAGE_COLUMNS = ("image_path", "caption", "url", "key", "source", "shard")
CAPTION_COLUMNS = ("caption", "image_row", "image_key")


def arrow_of(parquet: str | os.PathLike) -> Path:
    """The memory-mapped Arrow copy of a metadata parquet: beside it, same stem."""
    return Path(parquet).with_suffix(".arrow")


def parquet_rows(path: Path) -> int:
    """Rows of a parquet file (from its footer), or ValueError naming it."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ValueError(f"{path}: not a regular file")
        return int(pq.ParquetFile(path).metadata.num_rows)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path}: unreadable metadata ({type(e).__name__}: {e})") from None


def written_info(parquet: str | os.PathLike) -> Optional[dict]:
    """How a part's metadata was written (its `phoclip_part` entry: source, part, of,
    skipped), {} for a parquet another tool wrote, None when it cannot be read."""
    try:
        kv = pq.ParquetFile(parquet).metadata.metadata or {}
        return json.loads(kv[PART_INFO]) if PART_INFO in kv else {}
    except (OSError, ValueError, pa.ArrowException):
        return None


# ---------------------------------------------------------------- writing


class ParquetStream:
    """A metadata parquet written ROW_GROUP rows at a time into a temporary file; `finish`
    records how the part was made and returns the temporary path, to rename."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path, self.rows = path, 0
        real_dir(path.parent)
        fd, self.tmp = create_temp(path)
        os.close(fd)
        self.schema = schema
        self.w = pq.ParquetWriter(str(self.tmp), schema, compression="zstd")
        self.buf: dict[str, list] = {n: [] for n in schema.names}

    def write(self, rows: Sequence[dict]) -> None:
        for r in rows:
            for n in self.buf:
                self.buf[n].append(r.get(n))
        if len(self.buf[self.schema.names[0]]) >= ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        n = len(self.buf[self.schema.names[0]])
        if n:
            self.w.write_table(pa.table(self.buf, schema=self.schema), row_group_size=ROW_GROUP)
            self.rows += n
            self.buf = {k: [] for k in self.buf}

    def finish(self, info: dict) -> Path:
        self._flush()
        self.w.add_key_value_metadata({PART_INFO.decode(): json.dumps(info, ensure_ascii=False)})
        self.w.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        return self.tmp

    def abort(self) -> None:
        try:
            self.w.close()
        except (OSError, pa.ArrowException):
            pass
        self.tmp.unlink(missing_ok=True)


IMAGE_SCHEMA = pa.schema([(c, pa.string()) for c in IMAGE_COLUMNS])
CAPTION_SCHEMA = pa.schema([("caption", pa.string()), ("image_row", pa.int64()), ("image_key", pa.string())])


# ---------------------------------------------------------------- the Arrow copy


def parquet_stamp(path: str | os.PathLike) -> Optional[str]:
    """What identifies a parquet file's content cheaply: its size and the digest of its
    footer (row groups, offsets, statistics, key-value entries), read from a regular file
    without blocking; None when it is not one or has no parquet footer."""
    try:
        fd = os.open(path, _NOBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < 12:
            return None
        tail = os.pread(fd, 8, st.st_size - 8)
        n = int.from_bytes(tail[:4], "little")
        if tail[4:] != b"PAR1" or n > min(MAX_FOOTER, st.st_size - 12):
            return None
        footer = os.pread(fd, n, st.st_size - 8 - n)
        if len(footer) != n:
            return None
        return f"{st.st_size}:{hashlib.sha256(footer).hexdigest()}"
    finally:
        os.close(fd)


def write_arrow(parquet: Path, arrow: Optional[Path] = None, batch_rows: int = ROW_GROUP) -> Path:
    """Copy a metadata parquet into an uncompressed Arrow IPC file (default: `arrow_of`
    it), streaming `batch_rows` rows at a time (memory stays flat whatever its row groups),
    written under a temporary name, fsynced and renamed into place. Its schema records
    the parquet's stamp and rows, so a reader uses it only while that parquet is unchanged.
    ValueError naming the parquet when it cannot be read."""
    arrow = arrow_of(parquet) if arrow is None else Path(arrow)
    rows = parquet_rows(parquet)  # a regular file with a readable footer, else refused naming it
    stamp = parquet_stamp(parquet)
    if stamp is None:
        raise ValueError(f"{parquet}: not a parquet file")
    fd, tmp = create_temp(arrow)
    try:
        with os.fdopen(fd, "wb") as fh:
            pf = pq.ParquetFile(parquet)
            source = json.dumps({"parquet": stamp, "rows": rows})
            schema = pf.schema_arrow.with_metadata({ARROW_SOURCE: source})
            done = 0
            with ipc.new_file(pa.PythonFile(fh, mode="w"), schema) as w:
                for b in pf.iter_batches(batch_size=batch_rows):
                    w.write_batch(pa.RecordBatch.from_arrays(b.columns, schema=schema))
                    done += b.num_rows
            if done != rows:
                raise ValueError(f"{parquet}: {done} rows read, its footer says {rows}")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, arrow)
    except (OSError, pa.ArrowException) as e:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"{parquet}: unreadable metadata ({type(e).__name__}: {e})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(arrow.parent)
    return arrow


def ensure_arrow(parquet: Path) -> bool:
    """Make `parquet`'s Arrow copy current: True when it was (re)written, False when the
    one beside it already is the copy of this parquet."""
    try:
        _open_arrow(arrow_of(parquet), parquet_stamp(parquet))
        return False
    except ValueError:
        write_arrow(parquet)
        return True


def _open_arrow(path: Path, stamp: Optional[str]) -> tuple[list[pa.RecordBatch], list[int]]:
    """The record batches of Arrow file `path` memory-mapped (zero-copy) and their first
    rows, when it is a regular file made from the parquet of `stamp` and its structure
    holds; ValueError saying why otherwise. Opened without blocking and mapped from that
    descriptor: a FIFO or a device put there is refused, never read."""
    if stamp is None:
        raise ValueError(f"{path}: its parquet has no readable footer")
    try:
        fd = os.open(path, _NOBLOCK)
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path}: not a regular file")
        if st.st_size == 0:
            raise ValueError(f"{path}: empty")
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    try:
        r = ipc.open_file(pa.py_buffer(mm))
        got = json.loads((r.schema.metadata or {}).get(ARROW_SOURCE, b"{}"))
        if not isinstance(got, dict) or got.get("parquet") != stamp:
            raise ValueError(f"{path}: made from another version of its parquet")
        rows = got.get("rows")
        # our writer puts ROW_GROUP rows in a batch: many more batches is a crafted file
        # whose batch list alone would fill memory
        if not isinstance(rows, int) or r.num_record_batches > rows // 64 + 16:
            raise ValueError(f"{path}: {r.num_record_batches} record batches for {rows} rows")
        batches, starts, s = [], [], 0
        for i in range(r.num_record_batches):
            b = r.get_batch(i)
            b.validate()  # lengths and buffer sizes (the values are checked row by row as read)
            batches.append(b)
            starts.append(s)
            s += b.num_rows
    except (OSError, pa.ArrowException, json.JSONDecodeError, UnicodeDecodeError) as e:
        why = (str(e).splitlines() or [""])[0][:200]
        raise ValueError(f"{path}: not an Arrow file ({type(e).__name__}: {why})") from None
    if s != rows:
        raise ValueError(f"{path}: {s} rows, its parquet has {rows}")
    starts.append(s)
    return batches, starts


class MetadataReader:
    """Rows of a part's metadata by row number, safe to call from several threads at once.
    From the parquet's Arrow copy when it is current (memory-mapped: a row is a zero-copy
    slice, O(1)); else from the parquet a row group at a time (a few recent groups kept,
    one reader at a time: pyarrow's reads of one parquet file from two threads deadlock).
    An item lookup never loads the whole file either way."""

    def __init__(self, path: Path, keep: int = 4, max_group_bytes: int = 64 << 20) -> None:
        self.path, self.keep, self.max_group_bytes = path, keep, max_group_bytes
        self.arrow = arrow_of(path)
        self._lock = threading.Lock()  # this part's opening and parquet reads; Arrow rows take none
        self._batches: Optional[list[pa.RecordBatch]] = None
        self._bstarts: list[int] = []
        self._big: list[bool] = []  # batches whose buffers exceed the cap: their rows are measured one by one
        self._ready = False
        self._pf: Optional[pq.ParquetFile] = None
        self._starts: list[int] = []
        self._cache: dict[int, list[dict]] = {}

    def _prepare(self) -> None:
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            try:
                self._batches, self._bstarts = _open_arrow(self.arrow, parquet_stamp(self.path))
                self._big = [b.get_total_buffer_size() > self.max_group_bytes for b in self._batches]
            except ValueError as e:
                # the parquet stays the truth: a missing or stale copy costs speed, not answers
                missing = not os.path.lexists(self.arrow)
                logger.log(logging.INFO if missing else logging.WARNING, "%s; the rows of %s are read from the parquet "
                           "(slower; a merge or add of the index writes its Arrow copy)",
                           f"{self.arrow}: missing" if missing else str(e).splitlines()[0], self.path.name)
            self._ready = True

    @property
    def memory_mapped(self) -> bool:
        """Whether rows come from the Arrow copy (known after the first read)."""
        self._prepare()
        return self._batches is not None

    def _open(self) -> pq.ParquetFile:
        if self._pf is None:
            try:
                if not stat.S_ISREG(os.stat(self.path).st_mode):  # a FIFO would block the open below
                    raise ValueError(f"{self.path}: not a regular file")
                self._pf = pq.ParquetFile(self.path)
            except (OSError, pa.ArrowException) as e:
                raise ValueError(f"{self.path}: unreadable metadata ({type(e).__name__}: {e})") from None
            md, s = self._pf.metadata, 0
            for g in range(md.num_row_groups):
                self._starts.append(s)
                s += md.row_group(g).num_rows
            self._starts.append(s)
        return self._pf

    def row(self, r: int) -> dict:
        """Row `r` as a dict (None values for missing cells)."""
        self._prepare()
        if self._batches is not None:
            return self._arrow_row(r)
        with self._lock:
            return self._parquet_row(r)

    def _arrow_row(self, r: int) -> dict:
        g = bisect.bisect_right(self._bstarts, r) - 1
        if not 0 <= r < self._bstarts[-1]:
            raise IndexError(f"{self.arrow}: no row {r}")
        one = self._batches[g].slice(r - self._bstarts[g], 1)
        try:
            one.validate(full=True)  # this row's offsets and text: a crafted file is refused, never read past its end
        except pa.ArrowException as e:
            raise ValueError(f"{self.arrow}: row {r} is damaged ({str(e).splitlines()[0][:200]})") from None
        if self._big[g] and one.nbytes > self.max_group_bytes:
            raise ValueError(f"{self.arrow}: row {r} is {one.nbytes} bytes, over the {self.max_group_bytes}-byte cap; "
                             "refused unread")
        return one.to_pylist()[0]

    def _parquet_row(self, r: int) -> dict:
        pf = self._open()
        g = bisect.bisect_right(self._starts, r) - 1
        if not 0 <= g < len(self._starts) - 1:
            raise IndexError(f"{self.path}: no row {r}")
        if g not in self._cache:
            size = pf.metadata.row_group(g).total_byte_size
            if size > self.max_group_bytes:
                raise ValueError(f"{self.path}: row group {g} is {size} bytes decoded, over the "
                                 f"{self.max_group_bytes}-byte cap; refused unread")
            try:
                rows = pf.read_row_group(g).to_pylist()
            except (OSError, pa.ArrowException) as e:
                raise ValueError(f"{self.path}: unreadable row group {g} ({type(e).__name__}: {e})") from None
            if len(self._cache) >= self.keep:
                self._cache.pop(next(iter(self._cache)))
            self._cache[g] = rows
        return self._cache[g][r - self._starts[g]]

    def column(self, name: str) -> list:
        """One column whole (small indices and the projector; None when absent)."""
        self._prepare()
        if self._batches is not None:
            if not self._batches or name not in self._batches[0].schema.names:
                return [None] * self._bstarts[-1]
            out = []
            for b in self._batches:
                col = b.column(name)
                try:
                    col.validate(full=True)
                except pa.ArrowException as e:
                    raise ValueError(f"{self.arrow}: column {name} is damaged ({str(e).splitlines()[0][:200]})") from None
                out += col.to_pylist()
            return out
        with self._lock:
            pf = self._open()
            if name not in pf.schema_arrow.names:
                return [None] * pf.metadata.num_rows
            return pf.read(columns=[name]).column(name).to_pylist()
