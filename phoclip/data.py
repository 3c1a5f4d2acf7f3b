"""The shard reader pipeline: a list of small stages over our WebDataset shards.

    shard urls → (node, worker) split or seeded resampling → tar → samples
      → seeded shuffle buffer → [skip to the resume position, no decoding]
      → decode + transform + pick a caption (per-sample seeded RNG) → batches

Every random choice is seeded from (seed, epoch or stream position, rank, worker), so a
run's data order is a pure function of its config, and the position of each worker's
stream (how many shuffled samples it consumed) is all a checkpoint needs to resume it
exactly. Bad samples are skipped and counted, never raised.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from phoclip.images import BadImage, decode_rgb

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_NORM: dict = {}  # (device) -> (mean, std) of 0-255 pixels, made once per device


def normalize_images(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """uint8 pixels [..., 3, H, W] → ImageNet-normalised floats (in `dtype`, default
    float32), on whatever device `x` is: the training stream ships uint8 (4x fewer bytes
    through the DataLoader and host→device) and the trainer normalises on the GPU."""
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize_images wants uint8 pixels, got {x.dtype}")
    if x.device not in _NORM:
        _NORM[x.device] = tuple(torch.tensor(v, dtype=torch.float32).mul_(255).view(3, 1, 1).to(x.device)
                                for v in (IMAGENET_MEAN, IMAGENET_STD))
    mean, std = _NORM[x.device]
    y = x.float().sub_(mean).div_(std)
    return y if dtype is None else y.to(dtype)


# ----------------------------------------------------------------------------- shard lists

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


# ----------------------------------------------------------------------------- transforms

def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


def random_crop_box(image_size: tuple[int, int], rng: random.Random,
                    scale: tuple[float, float] = (0.8, 1.0)) -> tuple[int, int, int, int]:
    """The training crop of an image of (w, h): (top, left, height, width), random
    resized crop (area scale 0.8-1, ratio 3/4-4/3; center square after 10 misses)."""
    w, h = image_size
    area = w * h
    for _ in range(10):
        a = area * rng.uniform(*scale)
        r = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
            return top, left, ch, cw
    cw = ch = min(w, h)
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def image_to_tensor(img, size: int, train: bool, rng: Optional[random.Random] = None,
                    scale: tuple[float, float] = (0.8, 1.0), normalize: bool = True) -> torch.Tensor:
    """train: random resized crop (`random_crop_box`; no flip, since captions say left
    and right), antialiased bilinear; eval: resize shorter side + center crop.
    Normalised float [3, size, size], or the uint8 pixels with normalize=False."""
    import torchvision.transforms.functional as TF

    if train:
        top, left, ch, cw = random_crop_box(img.size, rng or random.Random(), scale)
        img = TF.resized_crop(img, top, left, ch, cw, [size, size], antialias=True)
    else:
        img = TF.center_crop(TF.resize(img, size, antialias=True), [size, size])
    x = TF.pil_to_tensor(img)
    return normalize_images(x) if normalize else x


def pad_images(images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """uint8 [3, h, w] images of different sizes → one zero-padded [B, 3, H, W] batch
    (`images`) and each image's (h, w) (`sizes`)."""
    hmax = max(x.shape[1] for x in images)
    wmax = max(x.shape[2] for x in images)
    out = torch.zeros(len(images), 3, hmax, wmax, dtype=torch.uint8)
    for i, x in enumerate(images):
        out[i, :, :x.shape[1], :x.shape[2]] = x
    return {"images": out, "sizes": torch.tensor([x.shape[1:] for x in images], dtype=torch.int32)}


def resize_on_device(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """The training crop done where `images` are (the GPU): each padded uint8 image's box
    (top, left, height, width) resized to size x size, antialiased bilinear (PIL's
    filter, as the workers' `image_to_tensor`; within ~1 grey level of it), uint8."""
    import torch.nn.functional as F

    out = torch.empty(images.shape[0], 3, size, size, dtype=torch.uint8, device=images.device)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):  # boxes: a small host tensor
        crop = images[i:i + 1, :, top:top + h, left:left + w].float()
        y = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i] = y[0].round_().clamp_(0, 255).to(torch.uint8)
    return out


class NoReadableSamples(ValueError):
    """A stream opened many shards in a row and could read no sample from any of them."""


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


# ----------------------------------------------------------------------------- stages

def seeded_shuffle(src: Iterable, bufsize: int, rng: random.Random) -> Iterator:
    """A shuffle buffer whose order depends only on its input order and rng."""
    if bufsize <= 1:
        yield from src
        return
    buf: list = []
    for s in src:
        buf.append(s)
        if len(buf) >= bufsize:
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


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


@dataclass
class StreamLayout:
    """How the data order is cut into streams, and what an earlier layout already read.

    A run resumed on another number of ranks (or workers) gets a new layout: `salt`
    reseeds the draws (resampled mode would otherwise replay the run's first samples),
    and `done` lists, per epoch, the shards (indices into the urls) that the old
    layout's streams had opened; the new streams share out the rest of that epoch.
    `start_epoch` is the oldest epoch any old stream had not finished."""

    salt: int = 0
    start_epoch: int = 0
    done: dict = field(default_factory=dict)  # epoch -> sorted shard indices

    def state_dict(self) -> dict:
        return {"salt": self.salt, "start_epoch": self.start_epoch,
                "done": {str(e): list(v) for e, v in self.done.items()}}

    @classmethod
    def from_state(cls, st: Optional[dict]) -> "StreamLayout":
        st = st or {}
        return cls(int(st.get("salt", 0)), int(st.get("start_epoch", 0)),
                   {int(e): sorted(int(i) for i in v) for e, v in st.get("done", {}).items()})


@dataclass
class StreamConfig:
    urls: list
    weights: list
    batch_size: int
    image_size: int = 224
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    resampled: bool = True
    shuffle_buffer: int = 1000
    train: bool = True
    layout: StreamLayout = field(default_factory=StreamLayout)
    ids_width: Optional[int] = None
    """The manifest's max length: id rows of another width are skipped."""
    vocab_size: Optional[int] = None
    """The tokenizer's vocabulary: ids outside [0, vocab_size) are skipped."""
    length_buckets: int = 0
    """>0: batches of similar caption length (see `group_by_length`)."""
    pad_id: int = 1
    resize_on: str = "worker"
    """worker: ship finished crops; device: ship decoded images + crop boxes (`resize_on_device`)."""


class ShardStream(IterableDataset):
    """Infinite training stream of batches for one rank.

    Each DataLoader worker runs one *logical* stream; `state_dict()` (kept by the
    trainer from the batches it consumed) is {logical worker: samples consumed}.
    `load_state_dict` makes a new DataLoader continue exactly there; the DataLoader's
    round robin restarts at worker 0, so physical workers are rotated onto the logical
    stream whose turn it is (`start_batch`)."""

    def __init__(self, cfg: StreamConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.positions: dict[int, int] = {}
        self.skipped: dict[int, dict] = {}
        self.block_done: dict[int, int] = {}
        self.start_batch = 0

    def load_state_dict(self, state: dict) -> None:
        """Continue where a `StreamTracker` with this state left off."""
        t = StreamTracker()
        t.load_state_dict(state)
        self.positions, self.skipped, self.start_batch = t.positions, t.skipped, t.batches
        self.block_done = t.block_done

    def _key(self, *parts: Any) -> tuple:
        # the salt joins the seeds only once a layout change set it: runs that never
        # changed layout keep their data order
        salt = self.cfg.layout.salt
        return (parts[0], salt, *parts[1:]) if salt else parts

    def _shards(self, logical: int, nworkers: int) -> Iterator[dict]:
        c = self.cfg
        if c.resampled:
            rng = random.Random(_seed(*self._key("shards", c.seed, c.rank, logical)))
            while True:
                yield {"url": rng.choices(c.urls, weights=c.weights)[0]}
        yield from epoch_shards(c.urls, c.seed, c.layout, c.rank, c.world_size, logical, nworkers)

    def __iter__(self) -> Iterator[dict]:
        c = self.cfg
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        logical = (wid + self.start_batch) % nworkers
        skips: Counter = Counter(self.skipped.get(logical, {}))
        start = self.positions.get(logical, 0)
        opened = 0  # shards of this stream opened so far: what a new layout must not reread
        good_at = 0  # `opened` when this stream last decoded a sample
        give_up = max(8, min(2 * len(c.urls), 64))

        def counted(shards):
            nonlocal opened
            for sh in shards:
                if opened - good_at >= give_up:
                    # all shards unreadable or missing (or nearly): stop, do not spin forever
                    raise NoReadableSamples(
                        f"no sample could be read from the last {opened - good_at} shards this stream "
                        f"opened (e.g. {sh['url']}; skipped so far: {dict(skips)}); check data.train_shards")
                opened += 1
                yield sh

        samples = read_shards(counted(self._shards(logical, nworkers)), skips)
        shuffled = seeded_shuffle(samples, c.shuffle_buffer,
                                  random.Random(_seed(*self._key("shuffle", c.seed, c.rank, logical))))
        pos = 0
        # samples are decoded in blocks: one batch, or length_buckets batches regrouped
        # by caption length. A checkpoint inside a block resumes at the block's start
        # (re-decoding it) and drops the block's batches already consumed
        k = max(1, c.length_buckets)
        on_device = c.resize_on == "device" and c.train
        block_start, skip_batches = start, self.block_done.get(logical, 0)
        restore_skips = Counter(skips) if skip_batches else None
        images, ids, keys, boxes = [], [], [], []
        for sample in shuffled:
            pos += 1
            if pos <= start:
                good_at = opened
                continue  # resume: replay the order, decode nothing
            rng = random.Random(_seed(*self._key("sample", c.seed, c.rank, logical, pos)))
            try:
                img, all_ids, _ = decode_sample(sample, c.ids_width, c.vocab_size, with_meta=False)
            except BadImage as e:
                skips[f"image_{e.reason}"] += 1
                continue
            except BadSample as e:
                skips[e.reason] += 1
                continue
            good_at = opened
            if on_device:
                box = random_crop_box(img.size, rng)
                images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
                boxes.append(box)
            else:
                images.append(image_to_tensor(img, c.image_size, c.train, rng, normalize=False))
            ids.append(torch.from_numpy(all_ids[rng.randrange(all_ids.shape[0])].copy()))
            keys.append(sample.get("__key__", ""))
            if len(images) < c.batch_size * k:
                continue
            if restore_skips is not None:  # the resumed block's skips were counted before
                skips.clear()
                skips.update(restore_skips)
                restore_skips = None
            if k == 1:
                groups = [list(range(len(images)))]
            else:
                lengths = [int((row != c.pad_id).sum()) for row in ids]
                groups = group_by_length(lengths, c.batch_size, random.Random(
                    _seed(*self._key("buckets", c.seed, c.rank, logical, block_start))))
            for j, g in enumerate(groups):
                if j < skip_batches:
                    continue
                last = j == len(groups) - 1
                batch = {"input_ids": torch.stack([ids[i] for i in g]), "keys": [keys[i] for i in g],
                         "worker": logical, "position": pos if last else block_start,
                         "block_done": 0 if last else j + 1, "opened": opened, "skipped": dict(skips)}
                if on_device:
                    batch.update(pad_images([images[i] for i in g]))
                    batch["boxes"] = torch.tensor([boxes[i] for i in g], dtype=torch.int32)
                else:
                    batch["images"] = torch.stack([images[i] for i in g])
                yield batch
            images, ids, keys, boxes = [], [], [], []
            block_start, skip_batches = pos, 0


def group_by_length(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """A block of k x batch_size samples → k batches of similar caption length: indices
    sorted by length (ties in stream order), cut into batches, the batches' order
    shuffled (seeded) so short and long batches alternate."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(groups)
    return groups


class StreamTracker:
    """What the trainer remembers of the stream: the position of each logical worker
    after the last batch it *consumed* (prefetched batches do not count)."""

    def __init__(self) -> None:
        self.positions: dict[int, int] = {}
        self.opened: dict[int, int] = {}
        self.skipped: dict[int, dict] = {}
        self.block_done: dict[int, int] = {}
        self.batches = 0

    def update(self, batch: dict) -> None:
        w = int(batch["worker"])
        self.positions[w] = int(batch["position"])
        self.block_done[w] = int(batch.get("block_done", 0))
        self.opened[w] = int(batch["opened"])
        self.skipped[w] = dict(batch["skipped"])
        self.batches += 1

    def total_skipped(self) -> dict:
        out: Counter = Counter()
        for v in self.skipped.values():
            out.update(v)
        return dict(out)

    def state_dict(self) -> dict:
        return {"positions": dict(self.positions), "opened": dict(self.opened),
                "skipped": dict(self.skipped), "batches": self.batches,
                "block_done": dict(self.block_done)}

    def load_state_dict(self, state: dict) -> None:
        self.positions = {int(k): int(v) for k, v in state.get("positions", {}).items()}
        self.opened = {int(k): int(v) for k, v in state.get("opened", {}).items()}
        self.skipped = {int(k): dict(v) for k, v in state.get("skipped", {}).items()}
        self.batches = int(state.get("batches", 0))
        self.block_done = {int(k): int(v) for k, v in state.get("block_done", {}).items()}


def epoch_shards(urls: list, seed: int, layout: StreamLayout, rank: int, world_size: int,
                 logical: int, nworkers: int) -> Iterator[dict]:
    """One logical stream's shards in non-resampled mode, epoch after epoch: each epoch's
    seeded shuffle of all shards (less those an earlier layout already opened), split
    rank::world_size, then logical::nworkers."""
    epoch = layout.start_epoch
    while True:
        order = list(range(len(urls)))
        random.Random(_seed("epoch", seed, epoch)).shuffle(order)
        done = set(layout.done.get(epoch, ()))
        left = [i for i in order if i not in done]
        mine = left[rank::world_size][logical::nworkers]
        if not mine and not done:
            raise ValueError(f"{len(urls)} shards cannot feed {world_size} ranks x "
                             f"{nworkers} workers; use data.resampled=true or fewer workers")
        for i in mine:
            yield {"url": urls[i], "epoch": epoch, "index": i}
        epoch += 1


def relayout(urls: list, seed: int, resampled: bool, old: StreamLayout, old_world: int,
             old_workers: int, old_states: dict, salt: int) -> StreamLayout:
    """The layout that continues an old one's data order on another number of ranks or
    workers. `old_states`: {old rank: its StreamTracker state}. Every shard an old stream
    had opened when its last consumed batch was made counts as read: what was left of it
    (and of the shuffle buffer) was in flight and is not replayed this epoch; shards
    that were only prefetched are read again. Resampled streams are only reseeded."""
    if resampled:
        return StreamLayout(salt=salt)
    done: dict[int, set] = {e: set(v) for e, v in old.done.items()}
    nexts = []
    for r in range(old_world):
        opened = (old_states.get(r) or {}).get("opened", {})
        for lw in range(old_workers):
            n = int(opened.get(lw, opened.get(str(lw), 0)))
            it = epoch_shards(urls, seed, old, r, old_world, lw, old_workers)
            for _ in range(n):
                sh = next(it)
                done.setdefault(sh["epoch"], set()).add(sh["index"])
            nexts.append(next(it)["epoch"])
    start = min(nexts)
    while len(done.get(start, ())) == len(urls):  # finished by the streams ahead
        start += 1
    return StreamLayout(salt=salt, start_epoch=start,
                        done={e: sorted(v) for e, v in done.items() if e >= start})


def _worker_init(_: int) -> None:
    # a preempted job signals the whole process group: the workers leave the clean
    # shutdown to the main process, and die with it (Linux parent-death signal), even
    # when blocked in a read that never returns
    import signal
    import sys

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform == "linux":
        try:
            import ctypes

            ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def train_loader(stream: ShardStream, num_workers: int, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over an already-batched stream (pin_memory for asynchronous copies to a GPU)."""
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                       worker_init_fn=_worker_init if num_workers else None,
                                       persistent_workers=False, prefetch_factor=2 if num_workers else None)


def close_loader(it) -> None:
    """Stop a DataLoader iterator's workers now. Left to garbage collection, an iterator
    still referenced by an exception's traceback keeps its workers, which ignore SIGTERM
    (see `_worker_init`), and the interpreter's exit then waits on them for ever."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


# ----------------------------------------------------------------------------- evaluation

def eval_samples(urls: list[str], image_size: int, rank: int = 0, world_size: int = 1,
                 skipped: Optional[Counter] = None, ids_width: Optional[int] = None,
                 vocab_size: Optional[int] = None) -> Iterator[dict]:
    """Each image once, with all its captions, in shard order; this rank's shards only.
    Unusable samples are skipped and counted in `skipped` by reason."""
    skipped = skipped if skipped is not None else Counter()
    shards = ({"url": u} for u in urls[rank::world_size])
    for sample in read_shards(shards, skipped):
        try:
            img, ids, meta = decode_sample(sample, ids_width, vocab_size)
        except BadImage as e:
            skipped[f"image_{e.reason}"] += 1
            continue
        except BadSample as e:
            skipped[e.reason] += 1
            continue
        yield {"key": sample["__key__"], "image": image_to_tensor(img, image_size, train=False),
               "ids": torch.from_numpy(ids), "meta": meta,
               "url": sample.get("__url__", "")}
