"""An index's embeddings in parts, in clip-retrieval's layout, so that its tools and ours
read each other's folders:

    img_emb/img_emb_{NAME}.npy              float16 [n, dim], L2-normalised
    text_emb/text_emb_{NAME}.npy            float16 [m, dim]  (where captions exist)
    metadata/metadata_{NAME}.parquet        n rows: image_path, caption, url, key, source, shard
    text_metadata/text_metadata_{NAME}.parquet   m rows: caption, image_row (in this part), image_key

Row r of metadata is row r of img_emb. clip-retrieval writes one caption per image, so its
text_emb is row-aligned with metadata and it has no text_metadata; our shards carry
several captions per image, so ours has one text_emb row per caption and text_metadata
says whose. A part is written streaming (the .npy header is written last, over a reserved
slot), so memory stays flat whatever its size; its files appear under their final names
only when complete, metadata last: a part is complete when its metadata file exists.

Beside each metadata parquet, the same rows as an uncompressed Arrow IPC file
(`metadata_{NAME}.arrow`, `text_metadata_{NAME}.arrow`), written with the part and by
every merge: read memory-mapped, a row is a zero-copy slice, so an item costs the same
whatever the part's size and threads read at once (clip-retrieval's "metadata memory-mapped").
The parquet stays the part's published form; the Arrow file records which parquet it
was made from (size and footer digest) and is used only while that parquet is unchanged.

Reading: the .npy header is parsed by hand and checked (float16, 2-D, the index's width,
rows = metadata rows) before the file is memory-mapped; a part that fails is refused in one
line naming it."""
from __future__ import annotations

import ast
import bisect
import hashlib
import json
import logging
import mmap
import os
import re
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from phoclip.fileio import create_temp, fsync_dir, real_dir

logger = logging.getLogger(__name__)

IMG, TEXT, META, TEXT_META = "img_emb", "text_emb", "metadata", "text_metadata"
HEADER_SLOT = 128  # bytes reserved for a streamed .npy header (numpy pads its own to 64 or 128)
MAX_HEADER = 4096  # a .npy header we read by hand
ROW_GROUP = 8192  # metadata rows per parquet row group: what a lazy item read decodes
PART_INFO = b"phoclip_part"  # the parquet key-value entry: how the part was made (source, part, of, skipped)
ARROW_SOURCE = b"phoclip_parquet"  # the Arrow file's schema entry: the parquet it was made from (size, footer digest, rows)
MAX_FOOTER = 64 << 20  # a parquet footer read to tell whether an Arrow file is its copy
_NOBLOCK = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_NAME = re.compile(r"^img_emb_(\d{1,9})\.npy$")
IMAGE_COLUMNS = ("image_path", "caption", "url", "key", "source", "shard")
CAPTION_COLUMNS = ("caption", "image_row", "image_key")


def part_name(i: int) -> str:
    """The name of part `i`: at least four digits, so that names sort as numbers up to 10,000
    parts (the index's index.json lists its parts in order regardless)."""
    return f"{i:04d}"


def files_of(folder: str | os.PathLike, name: str) -> dict[str, Path]:
    """The four files of part `name` (text ones may not exist)."""
    f = Path(folder)
    return {IMG: f / IMG / f"{IMG}_{name}.npy", TEXT: f / TEXT / f"{TEXT}_{name}.npy",
            META: f / META / f"{META}_{name}.parquet", TEXT_META: f / TEXT_META / f"{TEXT_META}_{name}.parquet"}


def arrow_of(parquet: str | os.PathLike) -> Path:
    """The memory-mapped Arrow copy of a metadata parquet: beside it, same stem."""
    return Path(parquet).with_suffix(".arrow")


def part_names(folder: str | os.PathLike) -> list[str]:
    """Names of the parts whose image embeddings are in `folder`, in numeric order."""
    d = Path(folder) / IMG
    if not d.is_dir():
        return []
    names = [m.group(1) for n in os.listdir(d) if (m := _NAME.match(n))]
    return sorted(names, key=lambda s: (int(s), s))


def part_info(folder: str | os.PathLike, name: str) -> Optional[dict]:
    """How a complete part was made (its metadata's `phoclip_part` entry), {} for a part
    written by another tool, None when the part is not complete."""
    f = files_of(folder, name)
    if not (f[META].is_file() and f[IMG].is_file()):
        return None
    try:
        kv = pq.ParquetFile(f[META]).metadata.metadata or {}
        return json.loads(kv[PART_INFO]) if PART_INFO in kv else {}
    except (OSError, ValueError, pa.ArrowException):
        return None


# ---------------------------------------------------------------- writing


class _NpyStream:
    """A float16 [rows, dim] .npy written row block by row block into a temporary file;
    its header goes into the reserved slot at `finish`."""

    def __init__(self, path: Path, dim: int) -> None:
        self.path, self.dim, self.rows = path, dim, 0
        real_dir(path.parent)
        fd, self.tmp = create_temp(path)
        self.f = os.fdopen(fd, "wb")
        self.f.write(b"\0" * HEADER_SLOT)

    def write(self, x: np.ndarray) -> None:
        x = np.ascontiguousarray(x, dtype="<f2")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{self.path}: rows of shape {x.shape}, expected [*, {self.dim}]")
        self.f.write(x.tobytes())
        self.rows += x.shape[0]

    def finish(self) -> Path:
        """The header written, the file flushed and fsynced: its temporary path, to rename."""
        self.f.seek(0)
        self.f.write(npy_header(self.rows, self.dim))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return self.tmp

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def npy_header(rows: int, dim: int) -> bytes:
    """A .npy 1.0 header for float16 [rows, dim] padded to exactly HEADER_SLOT bytes."""
    d = f"{{'descr': '<f2', 'fortran_order': False, 'shape': ({rows}, {dim}), }}"
    pad = HEADER_SLOT - 10 - len(d) - 1
    if pad < 0:
        raise ValueError(f"{rows} x {dim}: too large for a .npy header slot")
    return b"\x93NUMPY\x01\x00" + (HEADER_SLOT - 10).to_bytes(2, "little") + (d + " " * pad + "\n").encode()


class _ParquetStream:
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


_IMAGE_SCHEMA = pa.schema([(c, pa.string()) for c in IMAGE_COLUMNS])
_CAPTION_SCHEMA = pa.schema([("caption", pa.string()), ("image_row", pa.int64()), ("image_key", pa.string())])


class PartWriter:
    """Write one part streaming: `add` blocks of (image embeddings, image rows, caption
    embeddings, caption rows), then `close(info)`; the files appear under their final names
    only then (metadata last). Use as a context manager: an exception leaves nothing."""

    def __init__(self, folder: str | os.PathLike, name: str, dim: int, captions: bool) -> None:
        self.files = files_of(folder, name)
        self.name, self.captions = name, captions
        self.img = _NpyStream(self.files[IMG], dim)
        self.meta = _ParquetStream(self.files[META], _IMAGE_SCHEMA)
        self.txt = _NpyStream(self.files[TEXT], dim) if captions else None
        self.tmeta = _ParquetStream(self.files[TEXT_META], _CAPTION_SCHEMA) if captions else None

    def add(self, img: np.ndarray, rows: Sequence[dict], txt: Optional[np.ndarray] = None,
            caption_rows: Sequence[dict] = ()) -> None:
        """Image rows (`image_path`, `caption`, `url`, `key`, `source`, `shard`) with their
        embeddings; caption rows (`caption`, `image_row`: row of its image in this part,
        `image_key`) with theirs."""
        if len(rows) != img.shape[0]:
            raise ValueError(f"part {self.name}: {len(rows)} rows for {img.shape[0]} embeddings")
        self.img.write(img)
        self.meta.write([{c: None if r.get(c) is None else str(r.get(c)) for c in IMAGE_COLUMNS} for r in rows])
        if self.txt is not None and txt is not None and len(txt):
            self.txt.write(txt)
            self.tmeta.write(caption_rows)

    def close(self, info: dict) -> dict:
        """Rename the files into place (embeddings first, metadata last) and return the
        part's record for index.json."""
        info = dict(info, rows=self.img.rows, captions=self.txt.rows if self.txt else 0)
        pending = [(self.img.finish(), self.files[IMG])]
        if self.txt is not None:
            pending += [(self.txt.finish(), self.files[TEXT]), (self.tmeta.finish(info), self.files[TEXT_META])]
        pending.append((self.meta.finish(info), self.files[META]))
        for tmp, final in pending:
            if final.suffix == ".parquet":  # its Arrow copy first: the parquet, renamed last, completes the part
                write_arrow(tmp, arrow_of(final))
            os.replace(tmp, final)
            fsync_dir(final.parent)
        return info

    def abort(self) -> None:
        for s in (self.img, self.meta, self.txt, self.tmeta):
            if s is not None:
                s.abort()

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, et, ev, tb) -> None:
        if et is not None:
            self.abort()


# ---------------------------------------------------------------- reading


def read_npy_header(path: str | os.PathLike) -> tuple[np.dtype, tuple, bool, int]:
    """(dtype, shape, fortran_order, data offset) of a .npy file, parsed by hand from a
    capped header (numpy's own parser raises a zoo of errors on crafted input), or
    ValueError naming the file. A regular file only."""
    import stat

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path}: not a regular file")
        head = os.read(fd, MAX_HEADER)
    finally:
        os.close(fd)
    if head[:6] != b"\x93NUMPY" or len(head) < 10:
        raise ValueError(f"{path}: not a .npy file")
    major = head[6]
    if major == 1:
        hlen, start = int.from_bytes(head[8:10], "little"), 10
    elif major in (2, 3):
        hlen, start = int.from_bytes(head[8:12], "little"), 12
    else:
        raise ValueError(f"{path}: unknown .npy version {major}")
    if start + hlen > len(head):
        raise ValueError(f"{path}: .npy header of {hlen} bytes, over the {MAX_HEADER}-byte cap")
    try:
        d = ast.literal_eval(head[start:start + hlen].decode("latin1").strip())
        dtype = np.dtype(d["descr"])
        shape, fortran = tuple(d["shape"]), bool(d["fortran_order"])
    except Exception as e:  # noqa: BLE001 -- a crafted header: literal_eval and np.dtype raise many kinds
        raise ValueError(f"{path}: unreadable .npy header ({type(e).__name__})") from None
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"{path}: .npy shape {shape} is not a shape")
    offset = start + hlen
    need = offset + int(np.prod(shape, dtype=object)) * dtype.itemsize
    if st.st_size < need:
        raise ValueError(f"{path}: header says {shape} {dtype} but the file holds {st.st_size} bytes")
    return dtype, shape, fortran, offset


def open_embeddings(path: Path, dim: int, rows: Optional[int], what: str) -> np.ndarray:
    """A part's float16 [rows, dim] embeddings, memory-mapped after the header is checked;
    ValueError naming the part and the problem otherwise."""
    dtype, shape, fortran, offset = read_npy_header(path)
    if dtype != np.dtype("<f2") or len(shape) != 2 or fortran:
        raise ValueError(f"{path}: {dtype} {shape}, expected float16 [rows, {dim}] ({what})")
    if shape[1] != dim:
        raise ValueError(f"{path}: {shape[1]}-wide embeddings, the index is {dim}-wide ({what})")
    if rows is not None and shape[0] != rows:
        raise ValueError(f"{path}: {shape[0]} rows, but {what} has {rows}")
    if shape[0] == 0:
        return np.zeros((0, dim), dtype=np.float16)
    return np.memmap(path, dtype="<f2", mode="r", offset=offset, shape=shape)


def parquet_rows(path: Path) -> int:
    """Rows of a parquet file (from its footer), or ValueError naming it."""
    import stat

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ValueError(f"{path}: not a regular file")
        return int(pq.ParquetFile(path).metadata.num_rows)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path}: unreadable metadata ({type(e).__name__}: {e})") from None


@dataclass
class Part:
    """One part as the index uses it: its name, where its rows start in the global ids,
    its memory-mapped embeddings and its metadata files."""
    name: str
    folder: Path
    rows: int
    captions: int
    start: int = 0  # global id of its first image
    cap_start: int = 0  # global id of its first caption
    _emb: dict = field(default_factory=dict)

    def files(self) -> dict[str, Path]:
        return files_of(self.folder, self.name)

    def embeddings(self, kind: str, dim: int) -> np.ndarray:
        """The memory-mapped float16 embeddings of `kind` ("images" or "captions")."""
        if kind not in self._emb:
            f = self.files()
            if kind == "images":
                self._emb[kind] = open_embeddings(f[IMG], dim, self.rows, f"metadata {f[META].name}")
            else:
                want_f = f[TEXT_META] if f[TEXT_META].exists() else f[META]
                self._emb[kind] = open_embeddings(f[TEXT], dim, self.captions, f"metadata {want_f.name}")
        return self._emb[kind]


def check_part(folder: Path, name: str, dim: int) -> dict:
    """Check a complete part (embeddings' headers, widths, rows = metadata rows) and
    return its record {name, rows, captions, bytes}; ValueError in one line naming the
    file otherwise."""
    f = files_of(folder, name)
    for k in (IMG, META):
        if not f[k].is_file():
            raise ValueError(f"part {name}: {f[k]} is missing")
    rows = parquet_rows(f[META])
    open_embeddings(f[IMG], dim, rows, f"metadata {f[META].name}")
    captions, size = 0, f[IMG].stat().st_size + f[META].stat().st_size
    if f[TEXT].exists():
        if f[TEXT_META].exists():
            captions = parquet_rows(f[TEXT_META])
            size += f[TEXT_META].stat().st_size
        else:  # clip-retrieval: one caption per image, row-aligned with metadata
            captions = rows
        open_embeddings(f[TEXT], dim, captions, f"metadata {(f[TEXT_META] if f[TEXT_META].exists() else f[META]).name}")
        size += f[TEXT].stat().st_size
    elif f[TEXT_META].exists():
        raise ValueError(f"part {name}: {f[TEXT_META]} without {f[TEXT]}")
    return {"name": name, "rows": rows, "captions": captions, "bytes": size}


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
