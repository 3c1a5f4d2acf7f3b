"""One reader per published dataset format.

Every reader yields `Record`s: one image path with its captions (several per image
where the format groups them). Readers never decode images; that is the writer's job.
The web-scale sources (`wds:` tars as img2dataset writes them, `parquet:` tables with
image bytes) hold their images inside the data: those are streamed out once into the
job's cache folder (`SourceSpec.cache_dir`, under --out) and then handled like files.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from phoclip.fileio import atomic_write_bytes, read_regular, real_dir
from phoclip.data.catalog import expand_urls, shard_name
from phoclip.data.tar import read_shards
from phoclip.data.text import MAX_CAPTION_CHARS, cap_text

logger = logging.getLogger(__name__)

MAX_ANNOTATION_BYTES = 2 << 30
"""Annotation files (json, jsonl, csv, txt) are read whole: larger ones are refused unread
(make_shards --max-annotation-bytes). Web-scale data comes as wds tars or parquet,
which are streamed and not capped by this."""


def part_of(key: str, num_parts: int) -> int:
    """The part an image belongs to: its sha256 (or, for a file that cannot be read, its
    path) mod N. The same function decides for files (after hashing) and for images held
    inside tars and parquet cells (before they are cached)."""
    if num_parts == 1:
        return 0
    h = key if len(key) == 64 and all(c in "0123456789abcdef" for c in key) else \
        hashlib.sha256(key.encode()).hexdigest()
    return int(h[:16], 16) % num_parts


def _source_options(spec: str, opts: list[str], fields: tuple[str, ...]) -> tuple[dict, dict]:
    """A --source's `key=value` options: (SourceSpec fields among `fields` and split,
    the reader's own options)."""
    kw: dict = {}
    extra: dict = {}
    for o in opts:
        if "=" not in o:
            raise ValueError(f"--source {spec!r}: option {o!r} is not key=value")
        k, v = o.split("=", 1)
        if k == "split" and v not in ("train", "val"):
            raise ValueError(f"--source {spec!r}: split must be train or val, not {v!r}")
        if k == "split" or k in fields:
            kw[k] = v
        else:
            extra[k] = v
    return kw, extra


@dataclass
class Record:
    source: str           # the source's name (its format, or the name given)
    image_id: str         # the dataset's own id of the image
    path: Path            # the image file
    captions: list[str]
    split: Optional[str] = None  # pinned split ('train' / 'val') or None for the seeded split
    rel: str = ""         # the path as the annotations give it, relative to the image folder
    origin: Optional[dict] = None  # where a web-scale sample came from (key, url, shard)


@dataclass
class SourceSpec:
    """`FORMAT:ANNOTATIONS[:IMAGE_DIR]` plus options (`,split=val,image_field=x`)."""

    format: str
    annotations: Path
    image_dir: Optional[Path]
    split: Optional[str] = None
    name: Optional[str] = None
    image_field: str = "image"
    caption_field: str = "caption"
    options: dict = field(default_factory=dict)
    encoding: str = "utf-8"
    allow_outside: bool = False
    """Accept image paths that are absolute or lead out of the image folder ('..')."""
    skipped: Counter = field(default_factory=Counter)
    """Annotation entries this source could not use, by reason (reported in the manifest)."""
    cache_dir: Optional[Path] = None
    """Where images held inside the data (wds tars, parquet bytes) are written once."""
    pattern: str = ""
    """wds: the brace pattern of the input tars (paths, pipe:, http(s)://, fsspec URLs)."""
    part: tuple = (0, 1)
    """(part, number of parts) of the job: images held inside the data that belong to
    another part (by content hash) are not cached nor listed here."""
    max_bytes: int = MAX_ANNOTATION_BYTES
    """The largest annotation file read (it is read whole)."""

    def owns(self, data: bytes) -> bool:
        """Whether an image held inside the data belongs to this part of the job."""
        part, n = self.part
        return n == 1 or part_of(hashlib.sha256(data).hexdigest(), n) == part

    @classmethod
    def parse(cls, spec: str) -> "SourceSpec":
        """Parse `FORMAT:ANNOTATIONS[:IMAGE_DIR][,key=value...]`."""
        head, *opts = spec.split(",")
        if head.split(":", 1)[0] in ("wds", "parquet"):
            return cls._parse_web(spec)
        parts = head.split(":")
        if len(parts) < 2 or len(parts) > 3:
            raise ValueError(f"--source {spec!r}: expected FORMAT:ANNOTATIONS[:IMAGE_DIR]"
                             f"[,split=val][,image_field=F][,caption_field=F]")
        fmt = parts[0]
        if fmt not in READERS:
            raise ValueError(f"--source {spec!r}: unknown format {fmt!r}; "
                             f"choose one of {', '.join(sorted(READERS))}")
        ann = Path(parts[1])
        if not ann.exists():
            raise FileNotFoundError(f"--source {spec!r}: annotation file {ann} does not exist")
        if not ann.is_file():  # a folder, a FIFO (blocks forever), a device (/dev/zero never ends)
            raise ValueError(f"--source {spec!r}: annotation file {ann} is not a regular file")
        img_dir = Path(parts[2]) if len(parts) == 3 and parts[2] else None
        if img_dir is not None and not img_dir.is_dir():
            raise FileNotFoundError(f"--source {spec!r}: image folder {img_dir} does not exist")
        kw, extra = _source_options(spec, opts, ("name", "image_field", "caption_field", "encoding"))
        return cls(fmt, ann, img_dir, options=extra, **kw)

    @classmethod
    def _parse_web(cls, spec: str) -> "SourceSpec":
        """`wds:PATTERN[,opts]` (PATTERN may hold brace lists with commas and URLs with
        colons) and `parquet:FILE[:IMAGE_DIR][,opts]`."""
        fmt, rest = spec.split(":", 1)
        segs = rest.split(",")
        k = next((i for i, x in enumerate(segs) if i and "=" in x), len(segs))
        head, opts = ",".join(segs[:k]), segs[k:]
        kw, extra = _source_options(spec, opts, ("name", "image_field", "caption_field"))
        if fmt == "wds":
            if not head:
                raise ValueError(f"--source {spec!r}: expected wds:PATTERN (e.g. data/{{00000..00009}}.tar)")
            kw.setdefault("caption_field", "caption")
            return cls(fmt, Path(head), None, pattern=head, options=extra, **kw)
        file, _, img_dir = head.partition(":")
        if not Path(file).is_file():
            raise FileNotFoundError(f"--source {spec!r}: parquet file {file} does not exist")
        if img_dir and not Path(img_dir).is_dir():
            raise FileNotFoundError(f"--source {spec!r}: image folder {img_dir} does not exist")
        return cls(fmt, Path(file), Path(img_dir) if img_dir else None, options=extra, **kw)

    @property
    def source_name(self) -> str:
        return self.name or self.format

    def resolve(self, filename: str) -> Optional[Path]:
        """The image file of an annotation's file name, or None (counted) when the name is
        not a usable string or leads out of the image folder without --allow-outside-paths."""
        if not isinstance(filename, str) or not filename.strip():
            self.skipped["bad_file_name"] += 1
            logger.warning("%s: image file name %r is not a usable string", self.annotations, filename)
            return None
        base = self.image_dir if self.image_dir is not None else self.annotations.parent
        p = Path(filename)
        inside = not p.is_absolute() and not os.path.normpath(filename).startswith("..")
        if not inside and not self.allow_outside:
            self.skipped["outside_image_folder"] += 1
            logger.warning("%s: image path %s leads outside the image folder %s; refused "
                           "(--allow-outside-paths accepts it)", self.annotations, filename, base)
            return None
        return base / p

    def record(self, image_id: str, filename, captions: list[str]) -> Optional[Record]:
        path = self.resolve(filename)
        if path is None:
            return None
        return Record(self.source_name, image_id, path, captions, self.split,
                      rel=os.path.normpath(filename))


def _cap(spec: SourceSpec, caption: str) -> str:
    """A caption cut to MAX_CAPTION_CHARS before anything else reads it (counted as
    `long_caption_cut`): NFC and segmentation of a multi-megabyte line cost gigabytes."""
    if len(caption) <= MAX_CAPTION_CHARS:
        return caption
    spec.skipped["long_caption_cut"] += 1
    logger.warning("%s: a caption of %d characters cut to %d", spec.annotations, len(caption), MAX_CAPTION_CHARS)
    return cap_text(caption)


def _captions(spec: SourceSpec, value) -> list[str]:
    """A caption field → its captions: a string is one caption (never one per
    character), a list holds several; anything else is counted, not reinterpreted.
    Every caption is cut to MAX_CAPTION_CHARS (`_cap`)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [_cap(spec, value)]
    if isinstance(value, list):
        out = []
        for c in value:
            if isinstance(c, str):
                out.append(_cap(spec, c))
            elif c is not None:
                spec.skipped["non_string_caption"] += 1
        return out
    spec.skipped["bad_caption_field"] += 1
    return []


def _group(spec: SourceSpec, pairs: Iterator[tuple[str, str, object]]) -> Iterator[Record]:
    """(image_id, filename, caption or captions) triples → one Record per image, first-seen order."""
    caps: dict[str, list[str]] = defaultdict(list)
    files: dict[str, str] = {}
    for image_id, filename, caption in pairs:
        files.setdefault(image_id, filename)
        caps[image_id].extend(_captions(spec, caption))
    for image_id, filename in files.items():
        rec = spec.record(image_id, filename, caps[image_id])
        if rec is not None:
            yield rec


def _read_text(spec: SourceSpec) -> str:
    """The whole annotation file, decoded; a file in another encoding is refused with
    the byte offset where decoding failed (or read with ,encoding=NAME)."""
    # never read a FIFO, a device or an unbounded file: refused in one line naming it
    data = read_regular(spec.annotations, spec.max_bytes)
    enc = spec.encoding
    try:
        return data.decode("utf-8-sig" if enc.lower().replace("_", "-") in ("utf-8", "utf8") else enc)
    except LookupError:
        raise ValueError(f"{spec.annotations}: unknown encoding {enc!r}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{spec.annotations}: not {enc} text at byte {e.start} "
                         f"({data[e.start:e.start + 4]!r}); give the source's encoding with "
                         f"--encoding NAME or ,encoding=NAME (e.g. cp1258, utf-16)") from None


def _load_json(spec: SourceSpec):
    dup = []

    def pairs(kv):
        d = {}
        for k, v in kv:
            if k in d:
                dup.append(k)
            d.setdefault(k, v)  # the first entry wins, as the other readers' do
        return d

    try:
        data = json.loads(_read_text(spec), object_pairs_hook=pairs)
    except json.JSONDecodeError as e:
        raise ValueError(f"{spec.annotations}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise ValueError(f"{spec.annotations}: JSON nested too deeply") from None
    if dup:
        spec.skipped["duplicate_json_key"] += len(dup)
        logger.warning("%s: %d duplicate keys (first: %r); the first entry of each is used",
                       spec.annotations, len(dup), dup[0])
    return data


def _lines(spec: SourceSpec) -> Iterator[tuple[int, str]]:
    for i, line in enumerate(_read_text(spec).splitlines(), 1):
        yield i, line


def _jsonl_lines(spec: SourceSpec) -> Iterator[tuple[int, dict]]:
    for i, line in _lines(spec):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{spec.annotations}:{i}: not valid JSON ({e})") from e
        except RecursionError:
            raise ValueError(f"{spec.annotations}:{i}: JSON nested too deeply") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{spec.annotations}:{i}: expected a JSON object, got {type(obj).__name__}")
        yield i, obj


def read_jsonl(spec: SourceSpec) -> Iterator[Record]:
    """Generic jsonl: one object per line with an image field and a caption field
    (the caption may also be a list of captions)."""
    def pairs():
        for i, obj in _jsonl_lines(spec):
            if spec.image_field not in obj:
                raise ValueError(f"{spec.annotations}:{i}: no field {spec.image_field!r} "
                                 f"(set it with ,image_field=NAME)")
            fn = obj[spec.image_field]
            yield (fn if isinstance(fn, str) else repr(fn)), fn, obj.get(spec.caption_field)
    return _group(spec, pairs())


def read_coco_jsonl(spec: SourceSpec) -> Iterator[Record]:
    """The seed's `cocopath_train.jsonl`: {"image": FILE, "caption": TEXT} per line."""
    return read_jsonl(spec)


def read_csv(spec: SourceSpec) -> Iterator[Record]:
    """Generic csv with a header row; image and caption columns by name."""
    def pairs():
        old = csv.field_size_limit()
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long captions (default 128 kB)
        try:
            reader = csv.DictReader(io.StringIO(_read_text(spec), newline=""),
                                    delimiter=spec.options.get("delimiter", ","))
            for col in (spec.image_field, spec.caption_field):
                if reader.fieldnames is None or col not in reader.fieldnames:
                    raise ValueError(f"{spec.annotations}: no column {col!r} in header "
                                     f"{reader.fieldnames} (set ,image_field= / ,caption_field=)")
            for row in reader:
                yield row[spec.image_field], row[spec.image_field], row[spec.caption_field]
        except csv.Error as e:
            raise ValueError(f"{spec.annotations}:{reader.line_num}: bad CSV ({e})") from None
        finally:
            csv.field_size_limit(old)
    return _group(spec, pairs())


def read_flickr8k_vi(spec: SourceSpec) -> Iterator[Record]:
    """Flickr8k-vi `captions_vi.txt`: `IMAGE<TAB>CAPTION` per line; the image may carry
    Flickr's `#N` caption index (`1000268201_693b08cb0e.jpg#0`)."""
    def pairs():
        for i, line in _lines(spec):
            if not line.strip():
                continue
            if "\t" not in line:
                raise ValueError(f"{spec.annotations}:{i}: expected IMAGE<TAB>CAPTION")
            img, cap = line.split("\t", 1)
            img = img.strip().split("#", 1)[0]
            yield img, img, cap
    return _group(spec, pairs())


def _coco_like(spec: SourceSpec, file_key: str) -> Iterator[Record]:
    data = _load_json(spec)
    if (not isinstance(data, dict) or not isinstance(data.get("images"), list)
            or not isinstance(data.get("annotations"), list)):
        raise ValueError(f"{spec.annotations}: expected an object with lists 'images' and "
                         f"'annotations' ({spec.format} format)")
    files = {}
    for im in data["images"]:
        if not isinstance(im, dict) or "id" not in im:
            spec.skipped["bad_image_entry"] += 1
            continue
        fn = im.get(file_key) or im.get("file_name") or im.get("filename")
        key = str(im["id"])
        if key in files:
            spec.skipped["duplicate_image_id"] += 1
            logger.warning("%s: image id %s listed twice (%r, %r); the first is used",
                           spec.annotations, key, files[key], fn)
            continue
        files[key] = fn

    caps: dict[str, list[str]] = defaultdict(list)
    for a in data["annotations"]:
        img_id = str(a.get("image_id")) if isinstance(a, dict) else None
        if img_id not in files:
            spec.skipped["caption_of_unknown_image"] += 1
            continue
        caps[img_id].extend(_captions(spec, a.get("caption")))
    for img_id, fn in files.items():
        rec = spec.record(img_id, fn, caps.get(img_id, []))
        if rec is not None:
            yield rec


def read_ktvic(spec: SourceSpec) -> Iterator[Record]:
    """KTVIC `train_data.json`/`test_data.json`: images[{id, filename}], annotations[{image_id, caption}]."""
    return _coco_like(spec, "filename")


def read_uitviic(spec: SourceSpec) -> Iterator[Record]:
    """UIT-ViIC, COCO format: images[{id, file_name}], annotations[{image_id, caption}]."""
    return _coco_like(spec, "file_name")


def read_openviic(spec: SourceSpec) -> Iterator[Record]:
    """UIT-OpenViIC `uit-openviic-annotation-*.json`: {"FILE.jpg": {"captions": [...]}}."""
    data = _load_json(spec)
    if not isinstance(data, dict):
        raise ValueError(f"{spec.annotations}: expected an object FILE -> {{captions: [...]}}")
    for fn, entry in data.items():
        rec = spec.record(fn, fn, _captions(spec, entry.get("captions") if isinstance(entry, dict) else entry))
        if rec is not None:
            yield rec


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_INLINE_IMAGE_BYTES = 64 << 20  # one image inside a tar or a parquet cell


def _safe_rel(rel: str) -> str:
    """`rel` as a path that stays inside the cache folder: a tar member named
    `../../x.jpg`, `/abs/x.jpg` or a name too long for the filesystem (a hostile tar)
    becomes a name derived from its hash."""
    comps = rel.split("/")
    if all(c not in ("", ".", "..") and "\0" not in c and len(c.encode("utf-8", "replace")) <= 200
           for c in comps):
        return rel
    digest = hashlib.sha256(rel.encode("utf-8", "replace")).hexdigest()[:32]
    return f"_unsafe_names/{digest}{os.path.splitext(comps[-1])[1][:8]}"


def _cache_image(spec: SourceSpec, rel: str, data: bytes) -> Path:
    """Write an image held inside the data to the job's cache, once (atomic; a resumed
    job finds it there). Every folder on the way must be a real folder (not a link
    planted in a shared output folder), and the file is written under an unpredictable
    temporary name, then renamed."""
    import stat

    if spec.cache_dir is None:
        raise ValueError(f"{spec.format}: no cache folder for the images (make_shards sets one under --out)")
    rel = _safe_rel(rel)
    real_dir(spec.cache_dir.parent)  # OUT/.sources: neither a link
    folder = real_dir(spec.cache_dir)
    for comp in rel.split("/")[:-1]:
        folder = real_dir(folder / comp)
    path = folder / rel.split("/")[-1]
    try:
        cached = stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        cached = False
    if not cached:  # a cache: not fsynced (a file damaged by a power cut is an unusable image, counted)
        atomic_write_bytes(path, data, durable=False)
    return path


def read_wds(spec: SourceSpec) -> Iterator[Record]:
    """WebDataset tars as img2dataset writes them: KEY.jpg (or png/webp) + KEY.txt
    and/or KEY.json (its `caption` field, or ,caption_field=NAME; `url`, `key` and
    `status` recorded). Samples without an image (img2dataset's failed downloads) or
    without a caption are counted. The tars may be local or remote (read with retries)."""
    urls = expand_urls(spec.pattern, flag=f"--source {spec.format}:")[0]
    reads: Counter = Counter()
    for sample in read_shards(({"url": u} for u in urls), reads):
        key = sample.get("__key__", "")
        shard = shard_name(sample.get("__url__", "") or "input.tar")
        meta: dict = {}
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except (ValueError, RecursionError):
                meta = None
            if not isinstance(meta, dict):
                spec.skipped["bad_json"] += 1
                continue
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            spec.skipped["no_image" if meta.get("status", "success") == "success" else "failed_download"] += 1
            continue
        data = sample[ext]
        if len(data) > MAX_INLINE_IMAGE_BYTES:
            spec.skipped["too_large_file"] += 1
            continue
        caps = _captions(spec, meta.get(spec.caption_field)) if spec.caption_field in meta else []
        if "txt" in sample:
            try:
                txt = sample["txt"].decode("utf-8")
            except UnicodeDecodeError:
                spec.skipped["bad_caption_encoding"] += 1
                txt = ""
            txt = _cap(spec, txt)
            if txt.strip() and txt not in caps:
                caps.append(txt)
        if not spec.owns(data):
            continue  # another part's image (its captions counted above, as in one job)
        rel = f"{shard}/{key}.{ext}"
        path = _cache_image(spec, rel, data)
        origin = {"key": meta.get("key", key), "shard": sample.get("__url__", "")}
        if meta.get("url"):
            origin["url"] = meta["url"]
        yield Record(spec.source_name, str(meta.get("key", key)), path, caps, spec.split, rel=rel, origin=origin)
    spec.skipped.update({f"input_{k}": v for k, v in reads.items()})


def read_parquet(spec: SourceSpec) -> Iterator[Record]:
    """A parquet table, one row per image (or per caption: rows of one image group):
    an image column holding a path (relative to IMAGE_DIR) or the image bytes (also
    Hugging Face's {bytes, path} struct), and a caption column (text or list of texts).
    Read in row batches: memory does not grow with the table."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(spec.annotations)
    except Exception as e:  # pyarrow raises its own error types for a non-parquet file
        raise ValueError(f"{spec.annotations}: not a readable parquet file ({e})") from None
    cols = pf.schema_arrow.names
    for c in (spec.image_field, spec.caption_field):
        if c not in cols:
            raise ValueError(f"{spec.annotations}: no column {c!r} in {cols} "
                             "(set ,image_field=NAME / ,caption_field=NAME)")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[spec.image_field, spec.caption_field]):
        images = batch.column(0).to_pylist()
        captions = batch.column(1).to_pylist()
        for img, cap in zip(images, captions):
            row += 1
            if isinstance(img, dict):  # {"bytes": ..., "path": ...}
                img = img.get("bytes") or img.get("path")
            if isinstance(img, (bytes, bytearray)):
                if len(img) > MAX_INLINE_IMAGE_BYTES:
                    spec.skipped["too_large_file"] += 1
                    continue
                caps = _captions(spec, cap)
                if not spec.owns(bytes(img)):
                    continue  # another part's image (its captions counted, as in one job)
                rel = f"{spec.annotations.stem}/{row:09d}.img"
                yield Record(spec.source_name, str(row), _cache_image(spec, rel, bytes(img)), caps,
                             spec.split, rel=rel, origin={"row": row, "file": spec.annotations.name})
            elif isinstance(img, str):
                rec = spec.record(img, img, _captions(spec, cap))
                if rec is not None:
                    yield rec
            else:
                spec.skipped["bad_image_field"] += 1


READERS: dict[str, Callable[[SourceSpec], Iterator[Record]]] = {
    "wds": read_wds,
    "parquet": read_parquet,
    "coco-jsonl": read_coco_jsonl,
    "flickr8k-vi": read_flickr8k_vi,
    "ktvic": read_ktvic,
    "openviic": read_openviic,
    "uitviic": read_uitviic,
    "jsonl": read_jsonl,
    "csv": read_csv,
}


def read_source(spec: SourceSpec) -> Iterator[Record]:
    """Records of one source, in the format's own order."""
    return READERS[spec.format](spec)
