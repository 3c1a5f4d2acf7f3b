"""One shard sample decoded safely: .npy ids parsed by hand (never unpickled, the header
checked against the bytes before anything is allocated), JSON capped, images through
`phoclip.data.images`. Bad samples raise `BadImage`/`BadSample` with a `reason` (the skip
counter's key); `decode_counted` counts them instead."""
from __future__ import annotations

import io
import json
from collections import Counter
from typing import Any, Optional

import numpy as np

from phoclip.data.images import BadImage, decode_rgb


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
    """`decode_sample`, or None with the reason counted in `skips` (images as image_REASON):
    the one decode-and-count, shared by the training stream and evaluation."""
    try:
        return decode_sample(sample, width, vocab_size, with_meta)
    except BadImage as e:
        skips[f"image_{e.reason}"] += 1
    except BadSample as e:
        skips[e.reason] += 1
    return None
