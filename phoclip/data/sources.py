"""What every dataset reader shares: the source (`SourceSpec`: its files, options and
counts of what it could not use), the `Record` each reader yields, the part an image
belongs to, and the capped reading of annotation files and their captions.

Annotation files are read whole, so they are capped (`MAX_ANNOTATION_BYTES`); captions
are cut before anything segments them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from phoclip.data.text import MAX_CAPTION_CHARS, cap_text
from phoclip.fileio import read_regular

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


@dataclass
class Record:
    """One image of a source with its captions, as a reader yields it."""

    source: str           # the source's name (its format, or the name given)
    image_id: str         # the dataset's own id of the image
    path: Path            # the image file
    captions: list[str]
    split: Optional[str] = None  # pinned split ('train' / 'val') or None for the seeded split
    rel: str = ""         # the path as the annotations give it, relative to the image folder
    origin: Optional[dict] = None  # where a web-scale sample came from (key, url, shard)


@dataclass
class SourceSpec:
    """`FORMAT:ANNOTATIONS[:IMAGE_DIR]` plus options (`,split=val,image_field=x`), as
    `phoclip.data.datasets.parse_source` reads it from a --source."""

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
        """The Record of an annotation entry, or None (counted) when its file name is refused."""
        path = self.resolve(filename)
        if path is None:
            return None
        return Record(self.source_name, image_id, path, captions, self.split,
                      rel=os.path.normpath(filename))


def cut_caption(spec: SourceSpec, caption: str) -> str:
    """A caption cut to MAX_CAPTION_CHARS before anything else reads it (counted as
    `long_caption_cut`): NFC and segmentation of a multi-megabyte line cost gigabytes."""
    if len(caption) <= MAX_CAPTION_CHARS:
        return caption
    spec.skipped["long_caption_cut"] += 1
    logger.warning("%s: a caption of %d characters cut to %d", spec.annotations, len(caption), MAX_CAPTION_CHARS)
    return cap_text(caption)


def caption_list(spec: SourceSpec, value) -> list[str]:
    """A caption field → its captions: a string is one caption (never one per
    character), a list holds several; anything else is counted, not reinterpreted.
    Every caption is cut to MAX_CAPTION_CHARS (`cut_caption`)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [cut_caption(spec, value)]
    if isinstance(value, list):
        out = []
        for c in value:
            if isinstance(c, str):
                out.append(cut_caption(spec, c))
            elif c is not None:
                spec.skipped["non_string_caption"] += 1
        return out
    spec.skipped["bad_caption_field"] += 1
    return []


def group_records(spec: SourceSpec, pairs: Iterator[tuple[str, str, object]]) -> Iterator[Record]:
    """(image_id, filename, caption or captions) triples → one Record per image, first-seen order."""
    caps: dict[str, list[str]] = defaultdict(list)
    files: dict[str, str] = {}
    for image_id, filename, caption in pairs:
        files.setdefault(image_id, filename)
        caps[image_id].extend(caption_list(spec, caption))
    for image_id, filename in files.items():
        rec = spec.record(image_id, filename, caps[image_id])
        if rec is not None:
            yield rec


def read_text(spec: SourceSpec) -> str:
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


def load_json(spec: SourceSpec):
    """The annotation file as JSON (the first of duplicate keys wins, the rest counted);
    invalid JSON is refused with its line and column."""
    dup = []

    def pairs(kv):
        d = {}
        for k, v in kv:
            if k in d:
                dup.append(k)
            d.setdefault(k, v)  # the first entry wins, as the other readers' do
        return d

    try:
        data = json.loads(read_text(spec), object_pairs_hook=pairs)
    except json.JSONDecodeError as e:
        raise ValueError(f"{spec.annotations}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise ValueError(f"{spec.annotations}: JSON nested too deeply") from None
    if dup:
        spec.skipped["duplicate_json_key"] += len(dup)
        logger.warning("%s: %d duplicate keys (first: %r); the first entry of each is used",
                       spec.annotations, len(dup), dup[0])
    return data


def text_lines(spec: SourceSpec) -> Iterator[tuple[int, str]]:
    """(line number, line) of the annotation file, numbered from 1."""
    for i, line in enumerate(read_text(spec).splitlines(), 1):
        yield i, line


def jsonl_objects(spec: SourceSpec) -> Iterator[tuple[int, dict]]:
    """(line number, object) of a jsonl file; blank lines skipped, anything but a JSON
    object refused naming its line."""
    for i, line in text_lines(spec):
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
