"""The shards' manifest.json, typed: read, validated, written, and "do these shards fit
this model" asked in one place.

    m = Manifest.read("shards/vi/manifest.json")          # or an http(s)/fsspec URL
    m.check_fits(tokenizer, model, "vinai/phobert-large")   # refuses in one line
    m.tokenizer.max_length, m.segmenter.name, m.shards["train"], m.counts["val"]

Finding the manifests of a set of shards is the catalogue's (`phoclip.data.catalog`:
`manifest_for`, `check_shards_fit`).

The on-disk format is the JSON make_shards writes (format version 1; a manifest
without `format_version` is read as version 1); a newer version is refused by name
rather than misread. Reading is capped in size and only ever parses JSON. Every
refusal is one line naming the file and the key.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from phoclip.data.remote import read_small
from phoclip.data.text import tokenizer_fingerprint
from phoclip.fileio import atomic_write_json

FORMAT_VERSION = 1  # what this code writes and the newest it reads
SPLITS = ("train", "val")
SHARD_NAME = {sp: re.compile(rf"{sp}-[0-9]{{6}}\.tar") for sp in SPLITS}  # the writer's names
ROBERTA_POSITION_OFFSET = 2  # RoBERTa/PhoBERT positions start after padding_idx (1): two are never a token's
MAX_BYTES = 64 << 20  # a manifest.json larger than this is refused unread
PHOBERT_POSITIONS = 258  # max_position_embeddings of vinai/phobert-*, for configs that name a hub model only


class ManifestError(ValueError):
    """A manifest.json we refuse (unreadable, malformed, or not for this model)."""


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _typed(v: Any, typ: type) -> bool:
    return isinstance(v, typ) and not isinstance(v, bool)


def _counts(v: Any) -> bool:
    """{name: non-negative int}."""
    return isinstance(v, dict) and all(_count(x) for x in v.values())


def _plain_name(n: Any) -> bool:
    return isinstance(n, str) and bool(n) and "/" not in n and "\\" not in n and n not in (".", "..")


@dataclass(frozen=True)
class TokenizerInfo:
    """How the captions were tokenized: the ids in a shard mean something only with this
    tokenizer (its vocabulary fingerprint), this pad id and rows `max_length` wide."""

    name: str
    fingerprint: str
    pad_id: int
    max_length: int
    cls: Optional[str] = None  # "class" on disk
    vocab_size: Optional[int] = None
    truncated_captions: Optional[int] = None


@dataclass(frozen=True)
class SegmenterInfo:
    """The word segmenter the captions went through (search must segment queries alike)."""

    name: str
    version: Optional[str] = None


@dataclass(frozen=True)
class PartInfo:
    """Which part of a job in `of` parts (make_shards --num-parts) wrote this manifest."""

    index: int
    of: int


# (key, type) that every manifest must have: what a consumer checks against its model
REQUIRED = {"tokenizer.fingerprint": str, "tokenizer.name": str, "tokenizer.pad_id": int,
            "tokenizer.max_length": int, "segmenter.name": str, "counts": dict}


@dataclass
class Manifest:
    """One shard folder's manifest.json. Fields a version-1 manifest may lack are None
    (or empty); keys this version does not know are kept in `extra` and written back."""

    tokenizer: TokenizerInfo
    segmenter: SegmenterInfo
    counts: dict[str, int]
    shards: dict[str, list[str]] = field(default_factory=dict)
    captions: Optional[dict[str, int]] = None
    sources: Optional[dict[str, dict[str, int]]] = None
    source_specs: Optional[list[str]] = None
    image: Optional[dict[str, Any]] = None
    split: Optional[dict[str, Any]] = None
    merged_duplicate_images: Optional[int] = None
    skipped: dict[str, int] = field(default_factory=dict)
    part: Optional[PartInfo] = None
    merged_from: Optional[dict[str, Any]] = None
    phoclip_version: Optional[str] = None
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    where: str = field(default="manifest.json", compare=False)
    """The file it was read from (or will be written to): every refusal names it."""

    # ------------------------------------------------------------------ reading

    @classmethod
    def read(cls, path_or_url: str | os.PathLike, data: Optional[bytes] = None) -> "Manifest":
        """Read and validate a manifest (a local path, file://, http(s):// or fsspec URL;
        `data`: its bytes, already read). Capped in size; ManifestError naming the file."""
        where = str(path_or_url)
        try:
            obj = json.loads((read_small(where, MAX_BYTES) if data is None else data).decode("utf-8"))
        except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested too deeply
            raise ManifestError(f"{where}: not a readable manifest ({type(e).__name__}: {e})") from None
        return cls.from_dict(obj, where)

    @classmethod
    def from_dict(cls, obj: Any, where: str = "manifest.json") -> "Manifest":
        """A parsed manifest.json → Manifest, validated (see `validate`)."""
        if not isinstance(obj, dict):
            raise ManifestError(f"{where}: a manifest is a JSON object")
        version = obj.get("format_version", 1)  # absent: version 1
        if not _typed(version, int) or not 1 <= version <= FORMAT_VERSION:
            raise ManifestError(f"{where}: manifest format_version {version!r} is not one this code reads "
                                f"(1..{FORMAT_VERSION}); upgrade phoclip or re-shard")
        t, s = obj.get("tokenizer"), obj.get("segmenter")
        t, s = (t if isinstance(t, dict) else {}), (s if isinstance(s, dict) else {})
        part = obj.get("part")
        known = {f.name for f in fields(cls)} - {"extra", "where"}
        m = cls(
            tokenizer=TokenizerInfo(t.get("name"), t.get("fingerprint"), t.get("pad_id"), t.get("max_length"),
                                    t.get("class"), t.get("vocab_size"), t.get("truncated_captions")),
            segmenter=SegmenterInfo(s.get("name"), s.get("version")),
            counts=obj.get("counts"), shards=obj.get("shards", {}), captions=obj.get("captions"),
            sources=obj.get("sources"), source_specs=obj.get("source_specs"), image=obj.get("image"),
            split=obj.get("split"), merged_duplicate_images=obj.get("merged_duplicate_images"),
            skipped=obj.get("skipped", {}),
            part=PartInfo(part.get("index"), part.get("of")) if isinstance(part, dict) else part,
            merged_from=obj.get("merged_from"), phoclip_version=obj.get("phoclip_version"),
            format_version=version, extra={k: v for k, v in obj.items() if k not in known}, where=where)
        m.validate()
        return m

    def validate(self) -> None:
        """The types and values every reader relies on; ManifestError naming the key."""
        w = self.where
        t = self.tokenizer
        required = {"tokenizer.fingerprint": t.fingerprint, "tokenizer.name": t.name, "tokenizer.pad_id": t.pad_id,
                    "tokenizer.max_length": t.max_length, "segmenter.name": self.segmenter.name, "counts": self.counts}
        for key, v in required.items():
            if not _typed(v, REQUIRED[key]):
                raise ManifestError(f"{w}: key {key} is missing or not a {REQUIRED[key].__name__}")
        if t.pad_id < 0 or t.max_length < 1:
            raise ManifestError(f"{w}: tokenizer.pad_id {t.pad_id} / max_length {t.max_length} out of range")
        optional = {"tokenizer.vocab_size": (t.vocab_size, _count), "tokenizer.truncated_captions":
                    (t.truncated_captions, _count), "tokenizer.class": (t.cls, lambda v: isinstance(v, str)),
                    "segmenter.version": (self.segmenter.version, lambda v: isinstance(v, str)),
                    "captions": (self.captions, _counts), "skipped": (self.skipped, _counts),
                    "sources": (self.sources, lambda v: isinstance(v, dict) and all(_counts(c) for c in v.values())),
                    "source_specs": (self.source_specs, lambda v: isinstance(v, list)),
                    "image": (self.image, lambda v: isinstance(v, dict)),
                    "split": (self.split, lambda v: isinstance(v, dict)),
                    "merged_duplicate_images": (self.merged_duplicate_images, _count),
                    "part": (self.part, lambda v: isinstance(v, PartInfo) and _count(v.index) and _count(v.of)
                             and v.index < v.of),
                    "merged_from": (self.merged_from, lambda v: isinstance(v, dict)),
                    "shards": (self.shards, lambda v: isinstance(v, dict))}
        if not _counts(self.counts):
            raise ManifestError(f"{w}: key counts is not {{split: number of samples}}")
        for key, (v, ok) in optional.items():
            if v is not None and not ok(v):
                raise ManifestError(f"{w}: key {key} has the wrong type or a negative count")

    def split_shards(self, split: str) -> list[str]:
        """The shard file names of one split, refused unless plain names (a manifest
        cannot point a reader outside its folder)."""
        names = self.shards.get(split) if isinstance(self.shards, dict) else None
        if not isinstance(names, list) or not all(_plain_name(n) for n in names):
            raise ManifestError(f"{self.where}: 'shards.{split}' is missing or not a list of shard file names")
        if not names:
            avail = sorted(k for k, v in self.shards.items() if v)
            raise ManifestError(f"{self.where}: no {split} shards (it has: {', '.join(avail) or 'none'})")
        return names

    def validate_part(self, sizes: Any, sizes_where: str) -> None:
        """A part manifest (make_shards --num-parts) and its sizes.json, checked so that a
        merge cannot reach outside the output nor give other samples than the part says:
        shard names are the writer's plain names, each listed once with a count in
        `sizes`, adding up to the part's counts; every count a non-negative integer."""
        w = self.where
        if not (self.part is not None and all(isinstance(self.shards.get(sp), list) for sp in SPLITS)
                and all(_count(self.counts.get(sp)) for sp in SPLITS)):
            raise ManifestError(f"{w}: not a part manifest written by make_shards --num-parts")
        if not (self.captions is not None and self.sources is not None and self.merged_duplicate_images is not None
                and self.tokenizer.truncated_captions is not None and all(_count(self.captions.get(sp)) for sp in SPLITS)):
            raise ManifestError(f"{w}: counts missing or not non-negative integers; not a manifest make_shards wrote")
        if not isinstance(sizes, dict):
            raise ManifestError(f"{sizes_where}: not an object shard -> sample count")
        for sp in SPLITS:
            names = self.shards[sp]
            for name in names:
                if not (isinstance(name, str) and SHARD_NAME[sp].fullmatch(name)):
                    raise ManifestError(f"{w}: {sp} shard name {name!r} is not a plain {sp}-NNNNNN.tar name; refused")
                if not _count(sizes.get(name)):
                    raise ManifestError(f"{sizes_where}: no sample count for {name}")
            if len(set(names)) != len(names):
                dup = next(n for n in names if names.count(n) > 1)
                raise ManifestError(f"{w}: {sp} shard {dup} is listed more than once; refused")
            total = sum(sizes[n] for n in names)
            if total != self.counts[sp]:
                raise ManifestError(f"{w}: counts.{sp} is {self.counts[sp]} but its shards hold {total} "
                                    "samples (sizes.json); refused")

    # ------------------------------------------------------------------ writing

    def to_dict(self) -> dict[str, Any]:
        """The JSON object on disk (fields that were absent stay absent)."""
        t = self.tokenizer
        tok = {"name": t.name, "class": t.cls, "fingerprint": t.fingerprint, "vocab_size": t.vocab_size,
               "pad_id": t.pad_id, "max_length": t.max_length, "truncated_captions": t.truncated_captions}
        seg = {"name": self.segmenter.name, "version": self.segmenter.version}
        out: dict[str, Any] = {
            "format_version": self.format_version, "phoclip_version": self.phoclip_version,
            "counts": self.counts, "captions": self.captions, "sources": self.sources,
            "source_specs": self.source_specs,
            "tokenizer": {k: v for k, v in tok.items() if v is not None},
            "segmenter": {k: v for k, v in seg.items() if v is not None},
            "image": self.image, "split": self.split, "merged_duplicate_images": self.merged_duplicate_images,
            "skipped": dict(sorted(self.skipped.items())), "shards": self.shards,
            "part": None if self.part is None else {"index": self.part.index, "of": self.part.of},
            "merged_from": self.merged_from}
        out = {k: v for k, v in out.items() if v is not None}
        out.update(self.extra)
        return out

    def write(self, path: str | os.PathLike) -> None:
        """Write atomically (validated first: a manifest we would refuse is never written)."""
        self.validate()
        atomic_write_json(path, self.to_dict(), indent=2, sort_keys=True)

    # ------------------------------------------------------------------ using

    def summary(self) -> dict[str, Any]:
        """What a model card records of the data it was trained on."""
        d = self.to_dict()
        return {k: d.get(k) for k in ("counts", "captions", "sources", "tokenizer", "segmenter")}

    def check_fits(self, tokenizer: Any, model: Any, tokenizer_name: str = "") -> None:
        """Refuse shards the model cannot read: another tokenizer (vocabulary fingerprint),
        another pad id, or id rows wider than the text tower's positions. `tokenizer`: a
        tokenizer or its fingerprint; `model`: a PhoCLIP model, a Hugging Face text config
        or a model config dict (see `text_positions`)."""
        fingerprint = tokenizer if isinstance(tokenizer, str) else tokenizer_fingerprint(tokenizer)
        self.check_fits_values(fingerprint, text_pad_id(model), text_positions(model),
                               tokenizer_name or getattr(tokenizer, "name_or_path", "") or "the model's tokenizer")

    def check_fits_values(self, fingerprint: str, pad_id: int, positions: int, tokenizer_name: str) -> None:
        """`check_fits` with the model's side given as values."""
        t = self.tokenizer
        problems = []
        if t.fingerprint != fingerprint:
            problems.append(f"tokenizer fingerprint {t.fingerprint} ({t.name}) != {fingerprint} ({tokenizer_name})")
        if t.pad_id != pad_id:
            problems.append(f"pad id {t.pad_id} != model's {pad_id}")
        if t.max_length > positions:
            problems.append(f"max length {t.max_length} > the text encoder's {positions} positions")
        if problems:
            folder = os.path.dirname(self.where) or "."
            raise ManifestError(f"shards in {folder} do not fit the model's tokenizer: " + "; ".join(problems)
                                + f". Re-shard them with --tokenizer {tokenizer_name}, or train "
                                  f"with model.tokenizer={t.name}.")


def text_positions(model: Any) -> int:
    """The longest id row the text tower takes: its max_position_embeddings less the two
    RoBERTa reserves (positions count from padding_idx + 1). `model`: a PhoCLIP model
    (`.text.config`), a Hugging Face config, or a model config dict (`{"text": {...}}`,
    whose `hf_config` may be absent for a hub model: PhoBERT's 258)."""
    if isinstance(model, dict):
        hc = model.get("text", model).get("hf_config") or {}
        n = hc.get("max_position_embeddings", PHOBERT_POSITIONS)
    else:
        n = getattr(getattr(getattr(model, "text", None), "config", model), "max_position_embeddings", None)
        if n is None:
            raise TypeError(f"cannot tell the text positions of a {type(model).__name__}")
    return int(n) - ROBERTA_POSITION_OFFSET


def text_pad_id(model: Any) -> int:
    """The pad id the model's text tower expects (PhoCLIP.pad_id, a config's text.pad_id,
    a Hugging Face config's pad_token_id; 1 as in PhoBERT)."""
    if isinstance(model, dict):
        return int(model.get("text", model).get("pad_id", 1))
    if hasattr(model, "pad_id"):
        return int(model.pad_id)
    return int(getattr(model, "pad_token_id", 1) or 1)


def same_width(mans: list[Manifest]) -> Manifest:
    """The first manifest, once all agree on the id rows' width: one stream reads rows
    of one width, and would skip every row of the others."""
    if not mans:
        raise ValueError("no shards given")
    first = mans[0]
    for m in mans[1:]:
        if m.tokenizer.max_length != first.tokenizer.max_length:
            raise ManifestError(f"{m.where}: max length {m.tokenizer.max_length} != {first.tokenizer.max_length} "
                                f"of {first.where}: shards read together must be made with one --max-length")
    return first
