"""`make_shards --merge OUT`: link every part's shards (OUT/part-IIII/) into OUT as one
numbered sequence per split (part order, then shard order) and write the global
manifest.json and sizes.json: the same samples as the job run in one piece. Every part
is checked before anything is linked (`Manifest.validate_part`); parts of different jobs
or settings, and a missing part, are refused."""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

from phoclip.data.manifest import SPLITS, Manifest, ManifestError, TokenizerInfo
from phoclip_sharding.output import Output, is_url
from phoclip_sharding.record import shard_patterns

PART_DIR = "part-{:04d}"
# what the parts of one job must agree on (dotted paths into the manifest's JSON)
SAME = ("tokenizer.fingerprint", "tokenizer.max_length", "tokenizer.pad_id", "segmenter.name",
        "segmenter.version", "image", "split", "source_specs")


def merge_parts(out: str | Path) -> int:
    """Merge the parts in `out` (a local folder or the URL the parts were written to)."""
    import tempfile

    with tempfile.TemporaryDirectory() as staging:  # a URL's small files are written here first
        url = str(out) if is_url(str(out)) else None
        return _merge(Output(Path(staging) if url else Path(out), url))


def _json_file(folder: Output, name: str):
    """A JSON file of the output, or None when missing; refused in one line naming it
    when it is not JSON or nested too deeply to parse."""
    data = folder.read(name)
    if data is None:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise ValueError(f"{folder}/{name}: JSON nested too deeply") from None
    except ValueError as e:
        raise ValueError(f"{folder}/{name}: not valid JSON ({e})") from None


def load_part(folder: Output, d: str) -> tuple[Manifest, dict]:
    """A finished part's manifest and sizes, checked (`Manifest.validate_part`) so that
    merging cannot reach outside the output nor give other samples than the part says."""
    where = f"{folder}/{d}/manifest.json"
    raw = _json_file(folder, f"{d}/manifest.json")
    if raw is None:
        raise ValueError(f"{folder}/{d} has no manifest.json: that part has not finished")
    if not (isinstance(raw, dict) and isinstance(raw.get("part"), dict)):
        raise ManifestError(f"{where}: not a part manifest written by make_shards --num-parts")
    try:
        m = Manifest.from_dict(raw, where)
    except ManifestError as e:
        raise ManifestError(f"{e}; not a part manifest written by make_shards --num-parts") from None
    if d != PART_DIR.format(m.part.index):
        raise ManifestError(f"{where}: says it is part {m.part.index}, but lies in {d}")
    sizes = _json_file(folder, f"{d}/sizes.json")
    if sizes is None:
        raise ValueError(f"{folder}/{d} has no sizes.json: that part has not finished")
    m.validate_part(sizes, f"{folder}/{d}/sizes.json")
    return m, sizes


def _merge(folder: Output) -> int:
    parts = folder.parts()
    if not parts:
        raise ValueError(f"no part-NNNN folders in {folder}")
    loaded = [load_part(folder, d) for d in parts]  # every part checked before anything is linked
    mans = [m for m, _ in loaded]
    n = mans[0].part.of
    for d, m in zip(parts, mans):
        if m.part.of != n:
            raise ValueError(f"{folder}/{d}/manifest.json: part of a {m.part.of}-part job, but "
                             f"{folder}/{parts[0]}/manifest.json is of a {n}-part job: not parts of one job")
    got = [m.part.index for m in mans]
    if len(got) != n or got != list(range(len(got))):
        raise ValueError(f"expected parts 0..{n - 1} of {n}, found {got}")
    raws = [m.to_dict() for m in mans]
    for key in SAME:
        ref = json.dumps(_get(raws[0], key), sort_keys=True)
        for d, raw in zip(parts, raws):
            if json.dumps(_get(raw, key), sort_keys=True) != ref:
                raise ValueError(f"{folder}/{d}/manifest.json disagrees with {folder}/{parts[0]}/manifest.json "
                                 f"on {key}: not parts of one job")
    sizes: dict[str, int] = {}
    shards: dict[str, list] = {"train": [], "val": []}
    for d, (m, part_sizes) in zip(parts, loaded):
        for split in SPLITS:
            for name in m.shards[split]:
                new = f"{split}-{len(shards[split]):06d}.tar"
                folder.link(f"{d}/{name}", new)
                sizes[new] = part_sizes[name]
                shards[split].append(new)
    total = merged_manifest(mans, shards, f"{folder}/manifest.json")
    folder.write_json("sizes.json", sizes)
    folder.write_json("manifest.json", total.to_dict())
    print(f"merged {len(mans)} parts: {total.counts['train']} train and {total.counts['val']} val "
          f"samples in {len(sizes)} shards in {folder}")
    print(shard_patterns(str(folder), shards))
    return 0


def merged_manifest(mans: list[Manifest], shards: dict, where: str) -> Manifest:
    """The parts' manifests as one: counts, captions, sources, skips and merged images
    added up; the settings (checked equal) from the first part."""
    sources: dict = defaultdict(lambda: {"train": 0, "val": 0})
    skipped: Counter = Counter()
    for m in mans:
        for src, c in m.sources.items():
            for sp in SPLITS:
                sources[src][sp] += c.get(sp, 0)
        skipped.update(m.skipped)
    first = mans[0]
    tok: TokenizerInfo = replace(first.tokenizer, truncated_captions=sum(m.tokenizer.truncated_captions for m in mans))
    total = replace(
        first, part=None, shards=shards, merged_from={"parts": len(mans)}, tokenizer=tok,
        counts={sp: sum(m.counts[sp] for m in mans) for sp in SPLITS},
        captions={sp: sum(m.captions[sp] for m in mans) for sp in SPLITS},
        sources={k: dict(v) for k, v in sorted(sources.items())}, skipped=dict(sorted(skipped.items())),
        merged_duplicate_images=sum(m.merged_duplicate_images for m in mans), where=where)
    total.validate()
    return total


def _get(m: dict, dotted: str):
    for k in dotted.split("."):
        m = m.get(k) if isinstance(m, dict) else None
    return m
