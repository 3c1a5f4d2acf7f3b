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
The metadata files and their memory-mapped Arrow copies are `phoclip.search.metadata`'s.

Reading: the .npy header is parsed by hand and checked (float16, 2-D, the index's width,
rows = metadata rows) before the file is memory-mapped; a part that fails is refused in one
line naming it."""
from __future__ import annotations

import ast
import mmap
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from phoclip.fileio import create_temp, fsync_dir, real_dir
from phoclip.search.metadata import (
    CAPTION_SCHEMA,
    IMAGE_COLUMNS,
    IMAGE_SCHEMA,
    ParquetStream,
    arrow_of,
    parquet_rows,
    write_arrow,
    written_info,
)

IMG, TEXT, META, TEXT_META = "img_emb", "text_emb", "metadata", "text_metadata"
HEADER_SLOT = 128  # bytes reserved for a streamed .npy header (numpy pads its own to 64 or 128)
MAX_HEADER = 4096  # a .npy header we read by hand
_NAME = re.compile(r"^img_emb_(\d{1,9})\.npy$")


def part_name(i: int) -> str:
    """The name of part `i`: at least four digits, so that names sort as numbers up to 10,000
    parts (the index's index.json lists its parts in order regardless)."""
    return f"{i:04d}"


def files_of(folder: str | os.PathLike, name: str) -> dict[str, Path]:
    """The four files of part `name` (text ones may not exist)."""
    f = Path(folder)
    return {IMG: f / IMG / f"{IMG}_{name}.npy", TEXT: f / TEXT / f"{TEXT}_{name}.npy",
            META: f / META / f"{META}_{name}.parquet", TEXT_META: f / TEXT_META / f"{TEXT_META}_{name}.parquet"}


def part_names(folder: str | os.PathLike) -> list[str]:
    """Names of the parts whose image embeddings are in `folder`, in numeric order."""
    d = Path(folder) / IMG
    if not d.is_dir():
        return []
    names = [m.group(1) for n in os.listdir(d) if (m := _NAME.match(n))]
    return sorted(names, key=lambda s: (int(s), s))


def part_stamp(folder: str | os.PathLike, name: str) -> Optional[tuple]:
    """What tells that part `name` was written (its metadata file, renamed in last):
    (inode, mtime, size) of that file, None when there is none."""
    try:
        st = os.lstat(files_of(folder, name)[META])
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def check_unchanged(folder: str | os.PathLike, name: str, was: Optional[tuple]) -> None:
    """Refuse to put part `name` in place when another job wrote it since `was` (its
    `part_stamp` when this job began): two --add jobs that chose the same part number
    would otherwise replace each other's part, published or not, and lose it silently."""
    if part_stamp(folder, name) != was:
        raise ValueError(f"{files_of(folder, name)[META]}: part {name} was written by another job while this one ran "
                         "(two jobs adding to one index at once?); this job's part was not put in its place: run it again")


def part_info(folder: str | os.PathLike, name: str) -> Optional[dict]:
    """How a complete part was made (its metadata's `phoclip_part` entry), {} for a part
    written by another tool, None when the part is not complete."""
    f = files_of(folder, name)
    if not (f[META].is_file() and f[IMG].is_file()):
        return None
    return written_info(f[META])


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


class PartWriter:
    """Write one part streaming: `add` blocks of (image embeddings, image rows, caption
    embeddings, caption rows), then `close(info)`; the files appear under their final names
    only then (metadata last). Use as a context manager: an exception leaves nothing."""

    def __init__(self, folder: str | os.PathLike, name: str, dim: int, captions: bool) -> None:
        self.files = files_of(folder, name)
        self.folder, self.name, self.captions = folder, name, captions
        self.was = part_stamp(folder, name)
        self.img = _NpyStream(self.files[IMG], dim)
        self.meta = ParquetStream(self.files[META], IMAGE_SCHEMA)
        self.txt = _NpyStream(self.files[TEXT], dim) if captions else None
        self.tmeta = ParquetStream(self.files[TEXT_META], CAPTION_SCHEMA) if captions else None

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
        check_unchanged(self.folder, self.name, self.was)
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


def read_npy_header(path: str | os.PathLike, fd: Optional[int] = None) -> tuple[np.dtype, tuple, bool, int]:
    """(dtype, shape, fortran_order, data offset) of a .npy file, parsed by hand from a
    capped header (numpy's own parser raises a zoo of errors on crafted input), or
    ValueError naming the file. A regular file only. With `fd`, the file open there
    (`path` names it in messages)."""
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path}: not a regular file")
        head = os.pread(fd, MAX_HEADER, 0)
    finally:
        if own:
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


def open_embeddings(path: Path, dim: int, rows: Optional[int], what: str, fh=None) -> np.ndarray:
    """A part's float16 [rows, dim] embeddings, memory-mapped after the header is checked;
    ValueError naming the part and the problem otherwise. With `fh` (a binary file open
    on `path`), that very file is checked and mapped: `read_rows` reads the same one."""
    dtype, shape, fortran, offset = read_npy_header(path, fh.fileno() if fh is not None else None)
    if dtype != np.dtype("<f2") or len(shape) != 2 or fortran:
        raise ValueError(f"{path}: {dtype} {shape}, expected float16 [rows, {dim}] ({what})")
    if shape[1] != dim:
        raise ValueError(f"{path}: {shape[1]}-wide embeddings, the index is {dim}-wide ({what})")
    if rows is not None and shape[0] != rows:
        raise ValueError(f"{path}: {shape[0]} rows, but {what} has {rows}")
    if shape[0] == 0:
        return np.zeros((0, dim), dtype=np.float16)
    return np.memmap(fh if fh is not None else path, dtype="<f2", mode="r", offset=offset, shape=shape)


def release(a: np.ndarray) -> None:
    """Give back the pages of memory-mapped `a` that reads brought in: the file stays in the
    page cache, but a pass over 10 GB of parts keeps its resident memory at one chunk."""
    base = a
    while base is not None and not isinstance(getattr(base, "_mmap", None), mmap.mmap):
        base = getattr(base, "base", None)
    if base is not None:
        base._mmap.madvise(mmap.MADV_DONTNEED)


def read_rows(fh, a: np.ndarray, rows: Sequence[int], what: str = "") -> np.ndarray:
    """float32 copies of `rows` of part `a` (memory-mapped by `open_embeddings` from `fh`),
    read with pread from that file rather than through the mapping: a few scattered rows
    (a re-rank's candidates) then map no pages (a fault maps ~64 KB around each row, and a
    service answering queries over 10 GB of parts would keep them all resident), and a
    file cut short since is a ValueError naming it, not a SIGBUS."""
    dim = a.shape[1]
    out = np.empty((len(rows), dim), dtype="<f2")
    size, fd = dim * 2, fh.fileno()
    for j, r in enumerate(rows):
        b = os.pread(fd, size, a.offset + int(r) * size)
        if len(b) != size:
            raise ValueError(f"{what or fh.name}: shorter than its header says (row {r}); the part changed on disk")
        out[j] = np.frombuffer(b, dtype="<f2")
    return out.astype(np.float32)


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
    _fh: dict = field(default_factory=dict)  # the files the embeddings are mapped from (read_rows reads them)

    def files(self) -> dict[str, Path]:
        return files_of(self.folder, self.name)

    def embeddings(self, kind: str, dim: int) -> np.ndarray:
        """The memory-mapped float16 embeddings of `kind` ("images" or "captions")."""
        if kind not in self._emb:
            f = self.files()
            path = f[IMG] if kind == "images" else f[TEXT]
            # non-blocking: a FIFO planted as a part is refused by the header check, never waited on
            fh = os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)), "rb")
            try:
                if kind == "images":
                    emb = open_embeddings(path, dim, self.rows, f"metadata {f[META].name}", fh)
                else:
                    want_f = f[TEXT_META] if f[TEXT_META].exists() else f[META]
                    emb = open_embeddings(path, dim, self.captions, f"metadata {want_f.name}", fh)
            except BaseException:
                fh.close()
                raise
            self._emb[kind], self._fh[kind] = emb, fh
        return self._emb[kind]

    def read(self, kind: str, dim: int, rows: Sequence[int]) -> np.ndarray:
        """float32 copies of `rows` of `kind`, read from the file without mapping its pages
        (`read_rows`)."""
        a = self.embeddings(kind, dim)
        return read_rows(self._fh[kind], a, rows, str(self.files()[IMG if kind == "images" else TEXT]))


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
