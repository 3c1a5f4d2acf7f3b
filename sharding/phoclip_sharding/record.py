"""The last phase of a make_shards job: what was written, as the shards' manifest.json and
sizes.json (from the shards' `.done` records and the job store), and the shard patterns
to pass to training and evaluation."""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass

from phoclip import __version__
from phoclip.data.manifest import FORMAT_VERSION, SPLITS, Manifest, PartInfo, SegmenterInfo, TokenizerInfo
from phoclip.data.text import tokenizer_fingerprint
from phoclip_sharding.output import Output
from phoclip_sharding.store import JobStore


@dataclass
class JobSettings:
    """The settings a manifest records (make_shards' flags, resolved)."""

    source_specs: list
    tokenizer_name: str
    max_length: int
    image_size: int
    jpeg_quality: int
    max_pixels: int
    max_image_bytes: int
    seed: int
    val_fraction: float
    part: int
    num_parts: int


def job_record(s: JobSettings, tokenizer, segmenter, output: Output, names: list[str], store: JobStore,
               skipped: Counter, merged: int) -> tuple[Manifest, dict[str, int]]:
    """(manifest, sizes) of a finished job: counts of what was written (an image that
    failed to decode in its shard is not counted; a merged image counts once for each of
    its sources), the shards' skips added to the collect phase's."""
    sizes, lost, truncated = {}, set(), 0
    for name, rec in output.read_done(names).items():
        if rec is None:
            raise OSError(f"{output}/.done/{name}.json is missing or unreadable after writing its shard "
                          "(disk full?); run the same command again")
        sizes[name] = rec["count"]
        skipped.update(rec["skipped"])
        lost.update(rec.get("lost_keys", []))
        truncated += int(rec.get("truncated_captions", 0))
    counts = {sp: sum(n for name, n in sizes.items() if name.startswith(sp + "-")) for sp in SPLITS}
    per_source: dict = defaultdict(lambda: {"train": 0, "val": 0})
    captions = {"train": 0, "val": 0}
    for sha, split, n_caps, sources in store.sample_stats():
        if sha[:24] in lost:
            continue
        captions[split] += n_caps
        for src in set(sources):
            per_source[src][split] += 1
    manifest = Manifest(
        format_version=FORMAT_VERSION, phoclip_version=__version__, counts=counts, captions=captions,
        sources={k: dict(v) for k, v in sorted(per_source.items())}, source_specs=s.source_specs,
        tokenizer=TokenizerInfo(name=s.tokenizer_name, cls=type(tokenizer).__name__,
                                fingerprint=tokenizer_fingerprint(tokenizer), vocab_size=len(tokenizer),
                                pad_id=tokenizer.pad_token_id, max_length=s.max_length, truncated_captions=truncated),
        segmenter=SegmenterInfo(segmenter.name, segmenter.version),
        image={"size": s.image_size, "resize": "shorter_side", "format": "jpeg", "quality": s.jpeg_quality,
               "max_pixels": s.max_pixels, "max_bytes": s.max_image_bytes},
        split={"seed": s.seed, "val_fraction": s.val_fraction, "by": "image_sha256"},
        merged_duplicate_images=merged, skipped=dict(sorted(skipped.items())),
        shards={sp: [n for n in names if n.startswith(sp + "-")] for sp in SPLITS},
        part=PartInfo(s.part, s.num_parts), where=f"{output}/manifest.json")
    manifest.validate()
    return manifest, sizes


def brace_pattern(names: list[str]) -> str:
    """`train-000000.tar ... train-000007.tar` → `train-{000000..000007}.tar` (names that do
    not form one run are joined with commas: `{a,b}`)."""
    if len(names) == 1:
        return names[0]
    m = [re.fullmatch(r"(.*-)(\d+)(\.tar)", n) for n in sorted(names)]
    if all(m) and len({(x.group(1), x.group(3), len(x.group(2))) for x in m}) == 1:
        nums = [int(x.group(2)) for x in m]
        if nums == list(range(nums[0], nums[0] + len(nums))):
            a, w = m[0], len(m[0].group(2))
            return f"{a.group(1)}{{{nums[0]:0{w}d}..{nums[-1]:0{w}d}}}{a.group(3)}"
    return "{" + ",".join(sorted(names)) + "}"


def shard_patterns(folder: str, shards: dict) -> str:
    """What to pass to training and evaluation: the folder itself, or each split's exact pattern."""
    sep = "" if folder.endswith("/") else "/"
    lines = [f"shards: pass the folder ({folder}) with a split, or these patterns:"]
    for sp in SPLITS:
        if shards.get(sp):
            key = "data.train_shards" if sp == "train" else "data.val_shards / evaluate --shards"
            lines.append(f"  {sp:5} {folder}{sep}{brace_pattern(shards[sp])}   ({key})")
    return "\n".join(lines)
