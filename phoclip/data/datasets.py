"""One reader per published dataset format, and the dispatcher `read_source`.

Every reader yields `Record`s: one image path with its captions (several per image
where the format groups them). Readers never decode images; that is the writer's job.
The web-scale sources (`wds:` tars, `parquet:` tables with image bytes) are read in
`phoclip.data.webdata`; what all readers share is in `phoclip.data.sources`.
"""
from __future__ import annotations

import csv
import io
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

from phoclip.data.sources import (Record, SourceSpec, caption_list, group_records, jsonl_objects, load_json,
                                  read_text, text_lines)
from phoclip.data.webdata import read_parquet, read_wds

logger = logging.getLogger(__name__)


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


def parse_source(spec: str) -> SourceSpec:
    """The source of a --source `FORMAT:ANNOTATIONS[:IMAGE_DIR][,key=value...]`, its
    files checked to exist (a ValueError or FileNotFoundError naming the spec)."""
    head, *opts = spec.split(",")
    if head.split(":", 1)[0] in ("wds", "parquet"):
        return _parse_web(spec)
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
    return SourceSpec(fmt, ann, img_dir, options=extra, **kw)


def _parse_web(spec: str) -> SourceSpec:
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
        return SourceSpec(fmt, Path(head), None, pattern=head, options=extra, **kw)
    file, _, img_dir = head.partition(":")
    if not Path(file).is_file():
        raise FileNotFoundError(f"--source {spec!r}: parquet file {file} does not exist")
    if img_dir and not Path(img_dir).is_dir():
        raise FileNotFoundError(f"--source {spec!r}: image folder {img_dir} does not exist")
    return SourceSpec(fmt, Path(file), Path(img_dir) if img_dir else None, options=extra, **kw)


def read_jsonl(spec: SourceSpec) -> Iterator[Record]:
    """Generic jsonl: one object per line with an image field and a caption field
    (the caption may also be a list of captions)."""
    def pairs():
        for i, obj in jsonl_objects(spec):
            if spec.image_field not in obj:
                raise ValueError(f"{spec.annotations}:{i}: no field {spec.image_field!r} "
                                 f"(set it with ,image_field=NAME)")
            fn = obj[spec.image_field]
            yield (fn if isinstance(fn, str) else repr(fn)), fn, obj.get(spec.caption_field)
    return group_records(spec, pairs())


def read_coco_jsonl(spec: SourceSpec) -> Iterator[Record]:
    """The seed's `cocopath_train.jsonl`: {"image": FILE, "caption": TEXT} per line."""
    return read_jsonl(spec)


def read_csv(spec: SourceSpec) -> Iterator[Record]:
    """Generic csv with a header row; image and caption columns by name."""
    def pairs():
        old = csv.field_size_limit()
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long captions (default 128 kB)
        try:
            reader = csv.DictReader(io.StringIO(read_text(spec), newline=""),
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
    return group_records(spec, pairs())


def read_flickr8k_vi(spec: SourceSpec) -> Iterator[Record]:
    """Flickr8k-vi `captions_vi.txt`: `IMAGE<TAB>CAPTION` per line; the image may carry
    Flickr's `#N` caption index (`1000268201_693b08cb0e.jpg#0`)."""
    def pairs():
        for i, line in text_lines(spec):
            if not line.strip():
                continue
            if "\t" not in line:
                raise ValueError(f"{spec.annotations}:{i}: expected IMAGE<TAB>CAPTION")
            img, cap = line.split("\t", 1)
            img = img.strip().split("#", 1)[0]
            yield img, img, cap
    return group_records(spec, pairs())


def _coco_like(spec: SourceSpec, file_key: str) -> Iterator[Record]:
    data = load_json(spec)
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
        caps[img_id].extend(caption_list(spec, a.get("caption")))
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
    data = load_json(spec)
    if not isinstance(data, dict):
        raise ValueError(f"{spec.annotations}: expected an object FILE -> {{captions: [...]}}")
    for fn, entry in data.items():
        rec = spec.record(fn, fn, caption_list(spec, entry.get("captions") if isinstance(entry, dict) else entry))
        if rec is not None:
            yield rec


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
