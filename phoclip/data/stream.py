"""The shard reader pipeline: a list of small stages over our WebDataset shards, composed
in one place (`ShardStream.__iter__`):

    shards        epoch_shards (rank::world, then worker) | resampled_shards (seeded draws)
    → ShardHealth.track_shards / ShardMemory.choose / read_shards / ShardHealth.track_samples
                          (tar → samples; a remote shard given up is passed over for a while)
    → seeded_shuffle                                                      (shuffle buffer)
    → skip_to             resume: drop the positions consumed before the checkpoint, undecoded
    → decode_counted_stage  bad samples dropped, counted by reason, their shard told
    → augment             crop + caption pick (per-sample seeded RNG)
    → fixed_blocks → batched(BatchMaker)   blocks of k batches, by caption length if k > 1

Every random choice is seeded from (seed, epoch or stream position, rank, worker), so a
run's data order is a pure function of its config, and the position of each worker's
stream (how many shuffled samples it consumed) is all a checkpoint needs to resume it
exactly. Bad samples are skipped and counted, never raised.
"""
from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from phoclip.data.health import ShardHealth, ShardMemory
from phoclip.data.samples import decode_counted
from phoclip.data.tar import read_shards
from phoclip.data.transforms import image_to_tensor, pad_images, random_crop_box

logger = logging.getLogger(__name__)


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


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
    given_up: dict = field(default_factory=dict)
    """url -> how often the old layout's streams gave it up: the new streams start by
    passing it over (`ShardMemory`) rather than paying its retries again."""

    def state_dict(self) -> dict:
        st = {"salt": self.salt, "start_epoch": self.start_epoch,
              "done": {str(e): list(v) for e, v in self.done.items()}}
        if self.given_up:
            st["given_up"] = dict(self.given_up)
        return st

    @classmethod
    def from_state(cls, st: Optional[dict]) -> "StreamLayout":
        st = st or {}
        return cls(int(st.get("salt", 0)), int(st.get("start_epoch", 0)),
                   {int(e): sorted(int(i) for i in v) for e, v in st.get("done", {}).items()},
                   {str(u): int(k) for u, k in st.get("given_up", {}).items()})


@dataclass(kw_only=True)
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
    manifest: Optional[str] = None
    """Where manifest.json is when not beside the shards (sizes.json beside it)."""


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
        self.given_up: dict[int, list] = {}
        self.opened: dict[int, int] = {}
        self.start_batch = 0

    def load_state_dict(self, state: dict) -> None:
        """Continue where a `StreamTracker` with this state left off."""
        t = StreamTracker()
        t.load_state_dict(state)
        self.positions, self.skipped, self.start_batch = t.positions, t.skipped, t.batches
        self.block_done, self.given_up, self.opened = t.block_done, t.given_up, t.opened

    def _key(self, *parts: Any) -> tuple:
        # the salt joins the seeds only once a layout change set it: runs that never
        # changed layout keep their data order
        salt = self.cfg.layout.salt
        return (parts[0], salt, *parts[1:]) if salt else parts

    def _rng(self, what: str, logical: int, *more: Any) -> random.Random:
        """The seeded generator of one of the stream's random choices."""
        c = self.cfg
        return random.Random(_seed(*self._key(what, c.seed, c.rank, logical, *more)))

    def __iter__(self) -> Iterator[dict]:
        """The pipeline, stage by stage (each stage a generator below)."""
        c = self.cfg
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        logical = (wid + self.start_batch) % nworkers
        skips: Counter = Counter(self.skipped.get(logical, {}))
        start = self.positions.get(logical, 0)
        health = ShardHealth(max(8, min(2 * len(c.urls), 64)), skips)
        memory = ShardMemory(len(c.urls), skips, self.given_up.get(logical, ()), c.layout.given_up,
                             self.opened.get(logical, 0))

        if c.resampled:
            shards = resampled_shards(c.urls, c.weights, self._rng("shards", logical))
        else:
            shards = epoch_shards(c.urls, c.seed, c.layout, c.rank, c.world_size, logical, nworkers)
        shards = memory.choose(health.track_shards(shards), health)
        samples = health.track_samples(read_shards(shards, skips, c.manifest, gave_up=memory.gave_up))
        samples = seeded_shuffle(samples, c.shuffle_buffer, self._rng("shuffle", logical))
        numbered = skip_to(enumerate(samples, 1), start, health)
        decoded = decode_counted_stage(numbered, skips, health, c.ids_width, c.vocab_size)
        examples = augment(decoded, lambda pos: self._rng("sample", logical, pos), c.image_size,
                           c.resize_on == "device")
        blocks = fixed_blocks(examples, c.batch_size * max(1, c.length_buckets))
        yield from batched(blocks, BatchMaker(c, logical, health, skips, start, self.block_done.get(logical, 0),
                                              lambda block_start: self._rng("buckets", logical, block_start),
                                              memory))


def resampled_shards(urls: list, weights: list, rng: random.Random) -> Iterator[dict]:
    """Shards drawn with replacement, by weight, for ever (data.resampled=true)."""
    while True:
        yield {"url": rng.choices(urls, weights=weights)[0]}


def skip_to(numbered: Iterable[tuple[int, dict]], start: int, health: ShardHealth) -> Iterator[tuple[int, dict]]:
    """Resume: drop the first `start` (position, sample) pairs undecoded (they were
    consumed before the checkpoint; the shard health counts them as good)."""
    for pos, sample in numbered:
        if pos <= start:
            health.decoded(sample, True)
            continue
        yield pos, sample


def decode_counted_stage(numbered: Iterable[tuple[int, dict]], skips: Counter, health: ShardHealth,
                         width: Optional[int], vocab_size: Optional[int]) -> Iterator[tuple[int, dict, Any, Any]]:
    """(position, sample) → (position, sample, PIL image, ids [n, L]); a bad sample is
    dropped and counted by reason (`phoclip.data.samples.decode_counted`), and its shard told."""
    for pos, sample in numbered:
        out = decode_counted(sample, skips, width, vocab_size, with_meta=False)
        health.decoded(sample, out is not None)
        if out is not None:
            yield pos, sample, out[0], out[1]


@dataclass
class Example:
    """One training example: the stream position of its sample, the finished crop (or
    the decoded image and its crop box), and the one caption row picked."""

    pos: int
    key: str
    image: torch.Tensor
    ids: torch.Tensor
    box: Optional[tuple] = None


def augment(decoded: Iterable[tuple[int, dict, Any, Any]], rng_at: Callable[[int], random.Random], image_size: int,
            on_device: bool) -> Iterator[Example]:
    """The random crop and the caption pick, from a generator seeded by the sample's
    stream position (`rng_at(pos)`): the same sample at the same place gets the same
    crop and caption, however the stream was resumed."""
    for pos, sample, img, all_ids in decoded:
        rng = rng_at(pos)
        box = None
        if on_device:  # ship the decoded image and its box; the device crops and resizes
            box = random_crop_box(img.size, rng)
            image = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
        else:
            image = image_to_tensor(img, image_size, True, rng, normalize=False)
        ids = torch.from_numpy(all_ids[rng.randrange(all_ids.shape[0])].copy())
        yield Example(pos, sample.get("__key__", ""), image, ids, box)


def fixed_blocks(examples: Iterable[Example], size: int) -> Iterator[list[Example]]:
    """Consecutive lists of `size` examples, each yielded as soon as it is full (a
    partial last one is dropped: the stream is infinite)."""
    block: list[Example] = []
    for ex in examples:
        block.append(ex)
        if len(block) == size:
            yield block
            block = []


class BatchMaker:
    """Cuts a block of k x batch_size examples into k batches (k = length_buckets, or 1),
    regrouped by caption length when k > 1, each tagged with what the trainer keeps
    (`StreamTracker`). A checkpoint inside a block resumes at the block's start: the block
    is decoded again, its batches already consumed (`skip_batches`) are dropped, and its
    skips, already counted before the checkpoint, are restored rather than counted twice."""

    def __init__(self, cfg: StreamConfig, logical: int, health: ShardHealth, skips: Counter, start: int,
                 skip_batches: int, bucket_rng: Callable[[int], random.Random],
                 memory: Optional["ShardMemory"] = None) -> None:
        self.cfg, self.logical, self.health, self.skips, self.memory = cfg, logical, health, skips, memory
        self.block_start, self.skip_batches, self.bucket_rng = start, skip_batches, bucket_rng
        self.restore_skips = Counter(skips) if skip_batches else None

    def __call__(self, block: list[Example]) -> Iterator[dict]:
        c = self.cfg
        if self.restore_skips is not None:
            self.skips.clear()
            self.skips.update(self.restore_skips)
            self.restore_skips = None
        if c.length_buckets <= 1:
            groups = [list(range(len(block)))]
        else:
            lengths = [int((ex.ids != c.pad_id).sum()) for ex in block]
            groups = group_by_length(lengths, c.batch_size, self.bucket_rng(self.block_start))
        pos = block[-1].pos
        for j, g in enumerate(groups):
            if j < self.skip_batches:
                continue
            last = j == len(groups) - 1
            batch = {"input_ids": torch.stack([block[i].ids for i in g]), "keys": [block[i].key for i in g],
                     "worker": self.logical, "position": pos if last else self.block_start,
                     "block_done": 0 if last else j + 1, "opened": self.health.opened, "skipped": dict(self.skips),
                     "given_up": self.memory.state() if self.memory else []}
            if c.resize_on == "device":
                batch.update(pad_images([block[i].image for i in g]))
                batch["boxes"] = torch.tensor([block[i].box for i in g], dtype=torch.int32)
            else:
                batch["images"] = torch.stack([block[i].image for i in g])
            yield batch
        self.block_start, self.skip_batches = pos, 0


def batched(blocks: Iterable[list[Example]], make: BatchMaker) -> Iterator[dict]:
    """Blocks → batches (`BatchMaker`)."""
    for block in blocks:
        yield from make(block)


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
        self.given_up: dict[int, list] = {}
        self.batches = 0

    def update(self, batch: dict) -> None:
        w = int(batch["worker"])
        self.positions[w] = int(batch["position"])
        self.block_done[w] = int(batch.get("block_done", 0))
        self.opened[w] = int(batch["opened"])
        self.skipped[w] = dict(batch["skipped"])
        if batch.get("given_up"):
            self.given_up[w] = [list(e) for e in batch["given_up"]]
        self.batches += 1

    def given_up_shards(self) -> list[str]:
        """The shards any stream of this rank gave up, by name."""
        return sorted({str(e[1]) for v in self.given_up.values() for e in v})

    def total_skipped(self) -> dict:
        out: Counter = Counter()
        for v in self.skipped.values():
            out.update(v)
        return dict(out)

    def state_dict(self) -> dict:
        st = {"positions": dict(self.positions), "opened": dict(self.opened),
              "skipped": dict(self.skipped), "batches": self.batches,
              "block_done": dict(self.block_done)}
        if self.given_up:
            st["given_up"] = {w: [list(e) for e in v] for w, v in self.given_up.items()}
        return st

    def load_state_dict(self, state: dict) -> None:
        self.positions = {int(k): int(v) for k, v in state.get("positions", {}).items()}
        self.opened = {int(k): int(v) for k, v in state.get("opened", {}).items()}
        self.skipped = {int(k): dict(v) for k, v in state.get("skipped", {}).items()}
        self.batches = int(state.get("batches", 0))
        self.block_done = {int(k): int(v) for k, v in state.get("block_done", {}).items()}
        self.given_up = {int(k): [[int(e[0]), str(e[1]), int(e[2])] for e in v]
                         for k, v in state.get("given_up", {}).items()}


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
    given_up: Counter = Counter()  # the most times any old stream gave each shard up
    for st in old_states.values():
        for events in ((st or {}).get("given_up") or {}).values():
            for url, k in Counter(str(e[1]) for e in events).items():
                given_up[url] = max(given_up[url], k)
    for url, k in old.given_up.items():
        given_up[url] = max(given_up[url], int(k))
    if resampled:
        return StreamLayout(salt=salt, given_up=dict(given_up))
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
                        done={e: sorted(v) for e, v in done.items() if e >= start}, given_up=dict(given_up))
