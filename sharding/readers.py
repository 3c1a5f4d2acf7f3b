"""One reader per published dataset format.

Every reader yields `Record`s: one image path with its captions (several per image
where the format groups them). Readers never open images; that is the writer's job.
"""
from __future__ import annotations

import csv
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

logger = logging.getLogger(__name__)


@dataclass
class Record:
    source: str           # the source's name (its format, or the name given)
    image_id: str         # the dataset's own id of the image
    path: Path            # the image file
    captions: list[str]
    split: Optional[str] = None  # pinned split ('train' / 'val') or None for the seeded split


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

    @classmethod
    def parse(cls, spec: str) -> "SourceSpec":
        """Parse `FORMAT:ANNOTATIONS[:IMAGE_DIR][,key=value...]`."""
        head, *opts = spec.split(",")
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
        img_dir = Path(parts[2]) if len(parts) == 3 and parts[2] else None
        if img_dir is not None and not img_dir.is_dir():
            raise FileNotFoundError(f"--source {spec!r}: image folder {img_dir} does not exist")
        kw: dict = {}
        extra: dict = {}
        for o in opts:
            if "=" not in o:
                raise ValueError(f"--source {spec!r}: option {o!r} is not key=value")
            k, v = o.split("=", 1)
            if k == "split":
                if v not in ("train", "val"):
                    raise ValueError(f"--source {spec!r}: split must be train or val, not {v!r}")
                kw["split"] = v
            elif k in ("name", "image_field", "caption_field"):
                kw[k] = v
            else:
                extra[k] = v
        return cls(fmt, ann, img_dir, options=extra, **kw)

    @property
    def source_name(self) -> str:
        return self.name or self.format

    def resolve(self, filename: str) -> Path:
        base = self.image_dir if self.image_dir is not None else self.annotations.parent
        return base / filename


def _group(spec: SourceSpec, pairs: Iterator[tuple[str, str, str]]) -> Iterator[Record]:
    """(image_id, filename, caption) triples → one Record per image, first-seen order."""
    caps: dict[str, list[str]] = defaultdict(list)
    files: dict[str, str] = {}
    for image_id, filename, caption in pairs:
        files.setdefault(image_id, filename)
        caps[image_id].append("" if caption is None else str(caption))
    for image_id, filename in files.items():
        yield Record(spec.source_name, image_id, spec.resolve(filename), caps[image_id], spec.split)


def _load_json(path: Path):
    with open(path, encoding="utf-8-sig") as f:
        return json.load(f)


def _jsonl_lines(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8-sig") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e})") from e
            yield i, obj


def read_jsonl(spec: SourceSpec) -> Iterator[Record]:
    """Generic jsonl: one object per line with an image field and a caption field
    (the caption may also be a list of captions)."""
    def pairs():
        for i, obj in _jsonl_lines(spec.annotations):
            if spec.image_field not in obj:
                raise ValueError(f"{spec.annotations}:{i}: no field {spec.image_field!r} "
                                 f"(set it with ,image_field=NAME)")
            cap = obj.get(spec.caption_field, "")
            for c in (cap if isinstance(cap, list) else [cap]):
                yield str(obj[spec.image_field]), str(obj[spec.image_field]), c
    return _group(spec, pairs())


def read_coco_jsonl(spec: SourceSpec) -> Iterator[Record]:
    """The seed's `cocopath_train.jsonl`: {"image": FILE, "caption": TEXT} per line."""
    return read_jsonl(spec)


def read_csv(spec: SourceSpec) -> Iterator[Record]:
    """Generic csv with a header row; image and caption columns by name."""
    def pairs():
        with open(spec.annotations, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter=spec.options.get("delimiter", ","))
            for col in (spec.image_field, spec.caption_field):
                if reader.fieldnames is None or col not in reader.fieldnames:
                    raise ValueError(f"{spec.annotations}: no column {col!r} in header "
                                     f"{reader.fieldnames} (set ,image_field= / ,caption_field=)")
            for row in reader:
                yield row[spec.image_field], row[spec.image_field], row[spec.caption_field]
    return _group(spec, pairs())


def read_flickr8k_vi(spec: SourceSpec) -> Iterator[Record]:
    """Flickr8k-vi `captions_vi.txt`: `IMAGE<TAB>CAPTION` per line; the image may carry
    Flickr's `#N` caption index (`1000268201_693b08cb0e.jpg#0`)."""
    def pairs():
        with open(spec.annotations, encoding="utf-8-sig") as f:
            for i, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                if "\t" not in line:
                    raise ValueError(f"{spec.annotations}:{i}: expected IMAGE<TAB>CAPTION")
                img, cap = line.split("\t", 1)
                img = img.strip().split("#", 1)[0]
                yield img, img, cap
    return _group(spec, pairs())


def _coco_like(spec: SourceSpec, file_key: str) -> Iterator[Record]:
    data = _load_json(spec.annotations)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{spec.annotations}: expected an object with 'images' and "
                         f"'annotations' ({spec.format} format)")
    files = {}
    for im in data["images"]:
        fn = im.get(file_key) or im.get("file_name") or im.get("filename")
        if fn is None:
            raise ValueError(f"{spec.annotations}: image {im.get('id')} has no {file_key!r}")
        files[im["id"]] = fn

    caps: dict[str, list[str]] = defaultdict(list)
    for a in data["annotations"]:
        if a.get("image_id") not in files:
            logger.warning("%s: caption for unknown image_id %s ignored",
                           spec.annotations, a.get("image_id"))
            continue
        caps[str(a["image_id"])].append(str(a.get("caption", "")))
    for img_id, fn in files.items():
        yield Record(spec.source_name, str(img_id), spec.resolve(fn), caps.get(str(img_id), []),
                     spec.split)


def read_ktvic(spec: SourceSpec) -> Iterator[Record]:
    """KTVIC `train_data.json`/`test_data.json`: images[{id, filename}], annotations[{image_id, caption}]."""
    return _coco_like(spec, "filename")


def read_uitviic(spec: SourceSpec) -> Iterator[Record]:
    """UIT-ViIC, COCO format: images[{id, file_name}], annotations[{image_id, caption}]."""
    return _coco_like(spec, "file_name")


def read_openviic(spec: SourceSpec) -> Iterator[Record]:
    """UIT-OpenViIC `uit-openviic-annotation-*.json`: {"FILE.jpg": {"captions": [...]}}."""
    data = _load_json(spec.annotations)
    if not isinstance(data, dict):
        raise ValueError(f"{spec.annotations}: expected an object FILE -> {{captions: [...]}}")
    for fn, entry in data.items():
        caps = entry.get("captions", []) if isinstance(entry, dict) else entry
        yield Record(spec.source_name, fn, spec.resolve(fn), [str(c) for c in caps], spec.split)


READERS: dict[str, Callable[[SourceSpec], Iterator[Record]]] = {
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
