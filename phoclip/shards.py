"""Our WebDataset shards: the catalogue (brace patterns, manifest.json and sizes.json,
checked), tar reading with truncation counted, and the safe decoding of one sample
(.npy ids parsed by hand, JSON capped, images through `phoclip.images`). Bad samples
raise `BadImage`/`BadSample` with a `reason` (the skip counter's key)."""
from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from phoclip.images import decode_rgb

logger = logging.getLogger(__name__)



def expand_urls(spec: str, weights: Optional[str] = None) -> tuple[list[str], list[float]]:
    """`a/train-{000000..000009}.tar::b/train-{000000..000003}.tar` → urls, per-url weights.

    `weights` ("1::2") gives each source's sampling weight. Every local shard must exist."""
    import braceexpand

    parts = [p for p in spec.split("::") if p]
    ws = [float(w) for w in weights.split("::")] if weights else [1.0] * len(parts)
    if len(ws) != len(parts):
        raise ValueError(f"{len(ws)} weights given for {len(parts)} shard sources in {spec!r}")
    urls, url_w = [], []
    for part, w in zip(parts, ws):
        expanded = list(braceexpand.braceexpand(part))
        for u in expanded:
            urls.append(u)
            url_w.append(w)
    missing = [u for u in urls if "://" not in u and not os.path.exists(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards do not exist, e.g. "
                                f"{missing[0]}; check data.train_shards / data.val_shards")
    return urls, url_w
MANIFEST_KEYS = {"tokenizer.fingerprint": str, "tokenizer.name": str, "tokenizer.pad_id": int,
                 "tokenizer.max_length": int, "segmenter.name": str, "counts": dict}


def read_manifest(path: str | os.PathLike) -> dict:
    """A manifest.json, checked: a file with missing keys or wrong types is refused with
    a message naming the file and the key (not a KeyError later)."""
    try:
        m = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not a readable manifest ({type(e).__name__}: {e})") from None
    if not isinstance(m, dict):
        raise ValueError(f"{path}: a manifest is a JSON object")
    for key, typ in MANIFEST_KEYS.items():
        v: Any = m
        for part in key.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        if not isinstance(v, typ) or isinstance(v, bool):
            raise ValueError(f"{path}: key {key} is missing or not a {typ.__name__}")
    return m


def manifest_for(url: str) -> Optional[dict]:
    """The manifest.json beside a shard, if any (checked by `read_manifest`)."""
    p = Path(url).parent / "manifest.json"
    return read_manifest(p) if p.is_file() else None


def check_manifests(urls: Iterable[str], fingerprint: str, pad_id: int, max_positions: int,
                    tokenizer_name: str) -> dict:
    """Refuse shards tokenized with another tokenizer; returns the (first) manifest."""
    seen: dict[str, dict] = {}
    for u in urls:
        d = str(Path(u).parent)
        if d not in seen:
            m = manifest_for(u)
            if m is None:
                raise FileNotFoundError(f"no manifest.json beside {u}: shards must be made by "
                                        "sharding/make_shards.py")
            seen[d] = m
    for d, m in seen.items():
        t = m["tokenizer"]
        problems = []
        if t["fingerprint"] != fingerprint:
            problems.append(f"tokenizer fingerprint {t['fingerprint']} ({t['name']}) != "
                            f"{fingerprint} ({tokenizer_name})")
        if t["pad_id"] != pad_id:
            problems.append(f"pad id {t['pad_id']} != model's {pad_id}")
        if t["max_length"] > max_positions:
            problems.append(f"max length {t['max_length']} > the text encoder's {max_positions} positions")
        if problems:
            raise ValueError(f"shards in {d} do not fit the model's tokenizer: "
                             + "; ".join(problems)
                             + f". Re-shard them with --tokenizer {tokenizer_name}, or train "
                               f"with model.tokenizer={t['name']}.")
    return next(iter(seen.values()))


def count_samples(urls: Iterable[str]) -> int:
    """Samples in the given shards, from the sizes.json files beside them."""
    total, cache = 0, {}
    for u in urls:
        n = _shard_sizes(u, cache)
        if n is None:
            raise ValueError(f"{u} is not listed in {Path(u).parent / 'sizes.json'}")
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
    except (ValueError, EOFError, SyntaxError, TypeError) as e:
        raise BadSample("bad_ids", f"not a .npy array ({e})") from None
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


class _Skips:
    """Handler for webdataset's tar stages: count the error, keep going."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    def __call__(self, exn: BaseException) -> bool:
        self.counter["corrupt_shard"] += 1
        logger.warning("skipping unreadable shard data: %r", exn)
        return True


def _shard_sizes(url: str, cache: dict) -> Optional[int]:
    d = os.path.dirname(url)
    if d not in cache:
        f = Path(d) / "sizes.json"
        try:
            sizes = json.loads(f.read_text()) if f.is_file() else {}
        except (OSError, ValueError, RecursionError) as e:
            raise ValueError(f"{f}: unreadable ({type(e).__name__}: {e})") from None
        if not isinstance(sizes, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                  for v in sizes.values()):
            raise ValueError(f"{f}: expected {{shard file: sample count}}")
        cache[d] = sizes
    return cache[d].get(os.path.basename(url))


def read_shards(shards: Iterable[dict], skips: Counter) -> Iterator[dict]:
    """Tar shards → samples. A shard that yields fewer samples than its sizes.json entry
    is counted as truncated (tarfile ends a cut-off stream silently)."""
    import webdataset as wds

    cache: dict = {}
    expand = wds.tarfile_to_samples(handler=_Skips(skips))
    for src in shards:
        n = 0
        for sample in expand(iter([src])):
            n += 1
            yield sample
        want = _shard_sizes(src["url"], cache)
        if want is not None and n < want:
            skips["truncated_shard"] += 1
            logger.warning("shard %s ended after %d of its %d samples (truncated?)", src["url"], n, want)
