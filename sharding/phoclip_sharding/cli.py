"""Vietnamese caption datasets → pre-segmented, pre-tokenized WebDataset shards.

    python sharding/make_shards.py --source ktvic:train_data.json:images \\
        --source ktvic:test_data.json:images,split=val --out shards/ktvic \\
        --tokenizer vinai/phobert-large --segmenter vncorenlp --vncorenlp-dir /abs/vncorenlp

Output: {train,val}-NNNNNN.tar (KEY.jpg, KEY.json, KEY.ids.npy), manifest.json, sizes.json.

One job in N parts on N machines (any scheduler; launch/slurm/make_shards.sbatch is a
SLURM array), then one merge:

    python sharding/make_shards.py --source ... --out shards/vi --num-parts 8 --part $I
    python sharding/make_shards.py --merge shards/vi

An image belongs to the part its content hash says (sha256 mod N; a file that cannot be
read, by its path): every part reads and hashes every image, so byte-identical images
always meet in one part (their captions and
sources merge exactly as in one job), and the train/val split (by the same hash) is the
single job's. Each part decodes, resizes, segments and tokenizes only its own images, into
OUT/part-IIII/ (its own manifest, resumable on its own). The merge links every part's
shards into OUT as one sequence and writes the global manifest.json and sizes.json: the
same samples as the job run in one piece.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sqlite3
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional, Sequence


from phoclip import __version__
from phoclip.errors import EXPECTED_ERRORS, one_line
from phoclip.fileio import real_dir
from phoclip.images import MAX_FILE_BYTES, MAX_IMAGE_PIXELS
from phoclip.log import init_logger
from phoclip.text import (SEGMENTERS, create_segmenter, load_tokenizer, normalize_text, strip_controls,
                          tokenizer_fingerprint)
from phoclip_sharding.readers import MAX_ANNOTATION_BYTES, READERS, SourceSpec, part_of, read_source
from phoclip_sharding.store import STORE_NAME, JobStore, lock_folder
from phoclip_sharding.output import Output, default_staging, is_url
from phoclip_sharding.writer import ShardTask, TextSettings, check_images, make_pool, run_tasks

logger = logging.getLogger("make_shards")

MANIFEST_VERSION = 1


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", action="append",
                   help="FORMAT:ANNOTATIONS[:IMAGE_DIR][,split=train|val][,name=N]"
                        "[,image_field=F][,caption_field=F]; repeatable. FORMAT is one of: "
                        + ", ".join(sorted(READERS)))
    p.add_argument("--out", help="output folder, or an fsspec URL (s3://bucket/vi, gs://..., file://...): "
                                 "each finished shard is uploaded atomically")
    p.add_argument("--staging", help="with a URL --out: the local folder where shards are written before "
                                     "upload, with the job's hash journal and source cache "
                                     "(default: ~/.cache/phoclip/make_shards/HASH)")
    p.add_argument("--num-parts", type=int, default=1, help="split the job into N parts (machines)")
    p.add_argument("--part", type=int, default=0, help="which part this run makes (0..N-1)")
    p.add_argument("--merge", metavar="OUT", help="merge the parts in OUT/part-*/ into OUT")
    p.add_argument("--tokenizer", default="vinai/phobert-large", help="hub name or local folder")
    p.add_argument("--segmenter", default="vncorenlp", choices=SEGMENTERS)
    p.add_argument("--vncorenlp-dir",
                   help="folder of the VnCoreNLP model (default: $VNCORENLP_DIR)")
    p.add_argument("--max-length", type=int, default=70)
    p.add_argument("--image-size", type=int, default=256, help="shorter side after resizing")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--max-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help="refuse images with more pixels (decompression bombs)")
    p.add_argument("--max-image-bytes", type=int, default=MAX_FILE_BYTES,
                   help="refuse image files larger than this, unread")
    p.add_argument("--encoding", default="utf-8",
                   help="text encoding of the annotation files (per source: ,encoding=NAME)")
    p.add_argument("--max-annotation-bytes", type=int, default=MAX_ANNOTATION_BYTES,
                   help="refuse annotation files (json, jsonl, csv, txt: read whole) larger than this, unread")
    p.add_argument("--allow-outside-paths", action="store_true",
                   help="accept image paths that are absolute or lead out of the image folder")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--text-batch", type=int, default=512, help="captions per segmentation batch")
    args = p.parse_args(argv)
    if args.merge:
        return args
    if not args.source or not args.out:
        p.error("--source and --out are required (or --merge OUT)")
    if args.staging and not is_url(args.out):
        p.error("--staging is for an --out URL (shards go to OUT directly otherwise)")
    if args.num_parts < 1 or not 0 <= args.part < args.num_parts:
        p.error(f"--part must be in [0, --num-parts) = [0, {args.num_parts})")
    if not 0.0 <= args.val_fraction < 1.0:
        p.error("--val-fraction must be in [0, 1)")
    if args.shard_size < 1 or args.max_length < 4 or args.image_size < 8:
        p.error("--shard-size >= 1, --max-length >= 4 and --image-size >= 8 are required")
    if args.max_pixels < 1 or args.max_image_bytes < 1 or args.max_annotation_bytes < 1:
        p.error("--max-pixels, --max-image-bytes and --max-annotation-bytes must be positive")
    return args


def _split_of(sha: str, seed: int, val_fraction: float) -> str:
    h = int.from_bytes(hashlib.sha256(f"{seed}:{sha}".encode()).digest()[:8], "big")
    return "val" if h / 2**64 < val_fraction else "train"


RECORD_BATCH = 10_000  # records read from the sources per store transaction
HASH_PAGE = 8_192      # image paths hashed per page


def _hash_images(store: JobStore, pool, max_pixels: int, max_bytes: int) -> None:
    """Give every image path of the records a current entry in the store's hash journal:
    files whose (size, mtime) match their entry are not read again; the rest are hashed
    in the pool, a page at a time."""
    new = total = 0
    for paths in store.path_pages(HASH_PAGE):
        known = store.journal(paths)
        stamps, todo = {}, []
        for p in paths:
            try:
                st = os.stat(p)
                stamps[p] = (st.st_size, st.st_mtime_ns)
            except OSError:
                stamps[p] = (None, None)
            old = known.get(p)
            if stamps[p][0] is None or old is None or tuple(old[:2]) != stamps[p]:
                todo.append(p)
        total += len(paths)
        new += len(todo)
        checks = check_images(todo, pool, max_pixels, max_bytes)
        store.put_hashes((p, *stamps[p], c.sha, c.reason) for p, c in checks.items())
    if new < total:
        logger.info("hashed %d new or changed of %d images (the rest: unchanged since %s)", new, total, store.path)


def collect(specs: list[SourceSpec], pool, store: JobStore, max_pixels: int, max_bytes: int = MAX_FILE_BYTES,
            num_parts: int = 1, part: int = 0, seed: int = 0, val_fraction: float = 0.0):
    """Read every source, hash every image, merge byte-identical images; keep the images
    of `part` (of `num_parts`, by content hash), count only their skips, and give each a
    split. Everything streams through `store`: memory does not grow with the job.

    Returns (number of samples, skipped Counter, number of merged duplicate images)."""
    store.begin_run([max_pixels, max_bytes])
    skipped: Counter = Counter()
    for spec in specs:
        n, batch = 0, []
        for r in read_source(spec):
            batch.append((r.source, r.image_id, str(r.path), r.rel or r.path.name, r.captions, r.split, r.origin))
            if len(batch) >= RECORD_BATCH:
                store.add_records(batch)
                n, batch = n + len(batch), []
        store.add_records(batch)
        n += len(batch)
        if part == 0:  # annotation-level skips (no image yet): counted by part 0 only
            skipped.update(spec.skipped)
        logger.info("%s: %d images in %s", spec.source_name, n, spec.annotations)
    store.index_records()
    _hash_images(store, pool, max_pixels, max_bytes)
    for path, source, reason, sha in store.bad_records():
        if part_of(sha or path, num_parts) == part:
            skipped[reason] += 1
            logger.warning("skipping image %s (%s): %s", path, source, reason)

    merged, rows = 0, []
    for sha, group in store.record_groups():
        if part_of(sha, num_parts) != part:
            continue  # another part's image (all of its records go there)
        s = {"sources": [], "image_ids": [], "paths": [], "rel_paths": [], "captions": [], "pins": set(),
             "origins": []}
        seen: set = set()
        for source, image_id, path, rel, captions, pin, origin in group:
            if origin:
                s["origins"].append(origin)
            s["sources"].append(source)
            s["image_ids"].append(image_id)
            s["paths"].append(path)
            s["rel_paths"].append(rel)
            if pin:
                s["pins"].add(pin)
            for raw in captions:
                norm = normalize_text(raw)
                if not norm:
                    skipped["empty_caption"] += 1
                elif norm in seen:
                    skipped["duplicate_caption"] += 1
                else:
                    seen.add(norm)
                    s["captions"].append(raw)
        if not s["captions"]:
            skipped["no_caption"] += 1
            logger.warning("skipping image %s: it has no non-empty caption", s["paths"][0])
            continue
        merged += len(s["paths"]) - 1
        # split by image: a pinned source wins (val over train), else the seeded hash
        split = ("val" if "val" in s["pins"] else "train" if "train" in s["pins"]
                 else _split_of(sha, seed, val_fraction))
        # paths relative to each source's image folder: shards travel between machines,
        # and a machine's absolute paths are nobody else's business
        meta = {"key": sha[:24], "sha256": sha, "split": split, "source": s["sources"],
                "image_id": s["image_ids"], "path": s["rel_paths"],
                "captions": [normalize_text(c) for c in s["captions"]],
                "captions_raw": [strip_controls(c) for c in s["captions"]]}
        if s["origins"]:  # web-scale inputs: the original key and URL
            meta["origin"] = s["origins"]
        rows.append((sha, split, _shard_order(sha, seed, split), len(s["captions"]), s["paths"][0], meta,
                     s["captions"]))
        if len(rows) >= RECORD_BATCH:
            store.add_samples(rows)
            rows = []
    store.add_samples(rows)
    store.index_samples()
    if merged:
        logger.info("merged %d byte-identical duplicate images", merged)
    return store.count(), skipped, merged


def _shard_order(sha: str, seed: int, split: str) -> str:
    """A sample's place in its split's shard sequence: a seeded hash, i.e. a shuffle
    (mixing sources) that needs no list of the whole split in memory."""
    return hashlib.sha256(f"{seed}:{split}:order:{sha}".encode()).hexdigest()


def main(argv: Optional[Sequence[str]] = None) -> int:
    init_logger()
    args = parse_args(argv)
    if args.merge:
        try:
            return merge_parts(args.merge)
        except (ValueError, KeyError, TypeError, OSError) as e:  # a damaged part folder
            raise SystemExit(f"make_shards --merge: {e}") from None
    t0 = time.time()
    try:
        specs = [SourceSpec.parse(s) for s in args.source]
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"make_shards: {e}") from None
    for spec, text in zip(specs, args.source):
        if "encoding=" not in text:
            spec.encoding = args.encoding
        spec.allow_outside = args.allow_outside_paths
        spec.max_bytes = args.max_annotation_bytes
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        segmenter = create_segmenter(args.segmenter, args.vncorenlp_dir)
    except EXPECTED_ERRORS as e:
        raise SystemExit(f"make_shards: {one_line(e)}") from None
    url = None
    if is_url(args.out):  # shards go to object storage through a local staging folder
        url = args.out.rstrip("/") + (f"/{PART_DIR.format(args.part)}" if args.num_parts > 1 else "")
        out = Path(args.staging) if args.staging else default_staging(url, args.part)
        logger.info("writing to %s through the staging folder %s", url, out)
    else:
        out = Path(args.out)
        if args.num_parts > 1:
            out = out / PART_DIR.format(args.part)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if args.num_parts > 1 and not url:
            real_dir(out)  # a part folder planted as a link would send the part's files elsewhere
    except OSError as e:
        raise SystemExit(f"make_shards: {one_line(e)}") from None
    lock = lock_folder(out)  # two jobs writing one folder would interleave shards
    for i, spec in enumerate(specs):  # images held inside wds tars / parquet cells land here
        spec.cache_dir = out / ".sources" / f"{i:02d}-{spec.source_name.replace('/', '_')}"
        spec.part = (args.part, args.num_parts)  # ... only this part's

    pool = make_pool(args.workers)
    store = None
    try:
        store = JobStore(out / STORE_NAME)
        return _run_job(args, tokenizer, segmenter, Output(out, url), pool, t0, specs, store, lock)
    except EXPECTED_ERRORS as e:
        raise SystemExit(f"make_shards: {one_line(e)}") from None
    except sqlite3.Error as e:  # e.g. the disk holding the job store is full
        raise SystemExit(f"make_shards: {out / STORE_NAME}: {e}") from None
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if store is not None:
            store.close()
        lock.release()


def _run_job(args, tokenizer, segmenter, output: Output, pool, t0: float, specs, store: JobStore,
             lock) -> int:
    out = output.local
    try:
        n_samples, skipped, merged = collect(specs, pool, store, args.max_pixels, args.max_image_bytes,
                                             args.num_parts, args.part, args.seed, args.val_fraction)
    except ValueError as e:  # an annotation file that cannot be read as its format says
        raise SystemExit(f"make_shards: {e}") from None
    t_read = time.time()
    if not n_samples and args.num_parts == 1:
        raise SystemExit("no usable image-caption pair in the sources; see the warnings above")

    # text: normalise → segment → tokenize, once per caption, in the workers that write
    # each shard (captions/s scale with --workers; a resumed job segments only the
    # shards it still writes)
    text = TextSettings(args.tokenizer, args.segmenter, args.vncorenlp_dir, args.max_length, args.text_batch)

    def tasks():
        """The deterministic shard plan, a shard at a time: each split in the seeded
        order of its samples' hashes, cut every --shard-size samples."""
        for split in ("train", "val"):
            for idx, rows in enumerate(store.shard_rows(split, args.shard_size)):
                lock.refresh()  # about once per finished shard: a live job's lock never looks stale
                items = [(sha[:24], path, meta, caps) for sha, path, meta, caps in rows]
                yield ShardTask(split, idx, str(out), args.image_size, args.jpeg_quality, items,
                                args.max_pixels, args.max_image_bytes, text, remote=output.url)

    plan = hashlib.sha256()
    names, todo = [], 0
    for t in tasks():
        names.append(t.name)
        todo += 0 if output.is_complete(t.name) else len(t.samples)
        plan.update(json.dumps([t.name, [(k, p, caps) for k, p, _, caps in t.samples]]).encode())
    plan.update(json.dumps([args.image_size, args.jpeg_quality, args.max_length, tokenizer_fingerprint(tokenizer),
                            args.max_pixels, args.max_image_bytes, segmenter.name, segmenter.version]).encode())
    plan_hash = plan.hexdigest()[:16]
    old_plan = output.read_text(".plan")
    if old_plan is not None and old_plan.strip() != plan_hash:
        raise SystemExit(f"{output} holds shards of a different job (inputs or settings changed). "
                         "Use a new --out folder, or delete the old one.")
    output.write_text(".plan", plan_hash)

    if todo < n_samples:
        logger.info("resuming: %d of %d samples already in complete shards", n_samples - todo, n_samples)
    t_plan = time.time()
    run_tasks((t for t in tasks() if not output.is_complete(t.name)), pool, todo)
    logger.info("time: read+hash %.1fs, plan %.1fs, images+text+shards %.1fs",
                t_read - t0, t_plan - t_read, time.time() - t_plan)

    sizes, lost, truncated = {}, set(), 0
    for name, rec in output.read_done(names).items():
        if rec is None:
            raise SystemExit(f"make_shards: {output}/.done/{name}.json is missing or unreadable after "
                             "writing its shard (disk full?); run the same command again")
        sizes[name] = rec["count"]
        skipped.update(rec["skipped"])
        lost.update(rec.get("lost_keys", []))
        truncated += int(rec.get("truncated_captions", 0))
    # what was written: an image that failed to decode in its shard is not counted; a
    # merged image counts once for each of its sources
    counts = {sp: sum(n for name, n in sizes.items() if name.startswith(sp + "-")) for sp in ("train", "val")}
    per_source: dict = defaultdict(lambda: {"train": 0, "val": 0})
    captions = {"train": 0, "val": 0}
    for sha, split, n_caps, sources in store.sample_stats():
        if sha[:24] in lost:
            continue
        captions[split] += n_caps
        for src in set(sources):
            per_source[src][split] += 1

    manifest = {
        "format_version": MANIFEST_VERSION,
        "phoclip_version": __version__,
        "counts": counts,
        "captions": captions,
        "sources": {k: dict(v) for k, v in sorted(per_source.items())},
        "source_specs": args.source,
        "tokenizer": {"name": args.tokenizer, "class": type(tokenizer).__name__,
                      "fingerprint": tokenizer_fingerprint(tokenizer),
                      "vocab_size": len(tokenizer), "pad_id": tokenizer.pad_token_id,
                      "max_length": args.max_length, "truncated_captions": truncated},
        "segmenter": {"name": segmenter.name, "version": segmenter.version},
        "image": {"size": args.image_size, "resize": "shorter_side", "format": "jpeg",
                  "quality": args.jpeg_quality, "max_pixels": args.max_pixels,
                  "max_bytes": args.max_image_bytes},
        "split": {"seed": args.seed, "val_fraction": args.val_fraction, "by": "image_sha256"},
        "merged_duplicate_images": merged,
        "skipped": dict(sorted(skipped.items())),
        "shards": {sp: [n for n in names if n.startswith(sp + "-")] for sp in ("train", "val")},
        "part": {"index": args.part, "of": args.num_parts},
    }
    output.write_json("manifest.json", manifest)
    output.write_json("sizes.json", sizes)
    dt = time.time() - t0
    total = counts["train"] + counts["val"]
    print(f"wrote {total} samples ({counts['train']} train, {counts['val']} val) in "
          f"{len(names)} shards to {output} in {dt:.1f}s ({total / max(dt, 1e-9):.1f} img/s)")
    if skipped:
        print("skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())))
    print(shard_patterns(str(output), manifest["shards"]))
    return 0


def brace_pattern(names: list[str]) -> str:
    """`train-000000.tar ... train-000007.tar` → `train-{000000..000007}.tar` (names that do
    not form one run are joined with commas: `{a,b}`)."""
    import re

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
    for sp in _SPLITS:
        if shards.get(sp):
            key = "data.train_shards" if sp == "train" else "data.val_shards / evaluate --shards"
            lines.append(f"  {sp:5} {folder}{sep}{brace_pattern(shards[sp])}   ({key})")
    return "\n".join(lines)


PART_DIR = "part-{:04d}"


def merge_parts(out: str | Path) -> int:
    """Link every part's shards (OUT/part-IIII/) into OUT as one numbered sequence per
    split (part order, then shard order) and write the global manifest.json and
    sizes.json. OUT may be a local folder or the URL the parts were written to. Refuses
    parts of different jobs or settings, and a missing part."""
    import tempfile

    with tempfile.TemporaryDirectory() as staging:  # a URL's small files are written here first
        url = str(out) if is_url(str(out)) else None
        return _merge(Output(Path(staging) if url else Path(out), url))


_SPLITS = ("train", "val")
_SHARD_NAME = {sp: re.compile(rf"{sp}-[0-9]{{6}}\.tar") for sp in _SPLITS}  # the writer's SHARD_PATTERN
_SAME = ("tokenizer.fingerprint", "tokenizer.max_length", "tokenizer.pad_id", "segmenter.name",
         "segmenter.version", "image", "split", "source_specs")


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


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _load_part(folder: Output, d: str) -> tuple[dict, dict]:
    """A finished part's manifest and sizes, checked so that merging cannot reach outside
    the output nor give other samples than the part says: shard names are the writer's
    plain names, each listed once with a count in sizes.json, and they add up to the
    part's counts. Refused in one line naming the file."""
    where = f"{folder}/{d}/manifest.json"
    m = _json_file(folder, f"{d}/manifest.json")
    if m is None:
        raise ValueError(f"{folder}/{d} has no manifest.json: that part has not finished")
    part = m.get("part") if isinstance(m, dict) else None
    if not (isinstance(part, dict) and isinstance(m.get("shards"), dict) and isinstance(m.get("counts"), dict)
            and _count(part.get("index")) and _count(part.get("of")) and part["of"] >= 1
            and all(isinstance(m["shards"].get(sp), list) and _count(m["counts"].get(sp)) for sp in _SPLITS)):
        raise ValueError(f"{where}: not a part manifest written by make_shards --num-parts")
    if d != PART_DIR.format(part["index"]):
        raise ValueError(f"{where}: says it is part {part['index']}, but lies in {d}")
    if not (all(isinstance(m.get(k), dict) for k in ("captions", "sources", "skipped", "tokenizer"))
            and all(_count(m["captions"].get(sp)) for sp in _SPLITS)
            and all(isinstance(c, dict) and all(_count(c.get(sp, 0)) for sp in _SPLITS)
                    for c in m["sources"].values())
            and all(_count(v) for v in m["skipped"].values())
            and _count(m.get("merged_duplicate_images")) and _count(m["tokenizer"].get("truncated_captions"))):
        raise ValueError(f"{where}: counts missing or not non-negative integers; not a manifest make_shards wrote")
    sizes = _json_file(folder, f"{d}/sizes.json")
    if sizes is None:
        raise ValueError(f"{folder}/{d} has no sizes.json: that part has not finished")
    if not isinstance(sizes, dict):
        raise ValueError(f"{folder}/{d}/sizes.json: not an object shard -> sample count")
    for sp in _SPLITS:
        names = m["shards"][sp]
        for name in names:
            if not (isinstance(name, str) and _SHARD_NAME[sp].fullmatch(name)):
                raise ValueError(f"{where}: {sp} shard name {name!r} is not a plain {sp}-NNNNNN.tar name; refused")
            if not _count(sizes.get(name)):
                raise ValueError(f"{folder}/{d}/sizes.json: no sample count for {name}")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"{where}: {sp} shard {dup} is listed more than once; refused")
        total = sum(sizes[n] for n in names)
        if total != m["counts"][sp]:
            raise ValueError(f"{where}: counts.{sp} is {m['counts'][sp]} but its shards hold {total} "
                             f"samples (sizes.json); refused")
    return m, sizes


def _merge(folder: Output) -> int:
    parts = folder.parts()
    if not parts:
        raise ValueError(f"no part-NNNN folders in {folder}")
    loaded = [_load_part(folder, d) for d in parts]  # every part checked before anything is linked
    mans = [m for m, _ in loaded]
    n = mans[0]["part"]["of"]
    for d, m in zip(parts, mans):
        if m["part"]["of"] != n:
            raise ValueError(f"{folder}/{d}/manifest.json: part of a {m['part']['of']}-part job, but "
                             f"{folder}/{parts[0]}/manifest.json is of a {n}-part job: not parts of one job")
    got = [m["part"]["index"] for m in mans]
    if len(got) != n or got != list(range(len(got))):
        raise ValueError(f"expected parts 0..{n - 1} of {n}, found {got}")
    for key in _SAME:
        ref = json.dumps(_get(mans[0], key), sort_keys=True)
        for d, m in zip(parts, mans):
            if json.dumps(_get(m, key), sort_keys=True) != ref:
                raise ValueError(f"{folder}/{d}/manifest.json disagrees with {folder}/{parts[0]}/manifest.json "
                                 f"on {key}: not parts of one job")
    sizes: dict[str, int] = {}
    shards: dict[str, list] = {"train": [], "val": []}
    for d, (m, part_sizes) in zip(parts, loaded):
        for split in _SPLITS:
            for name in m["shards"][split]:
                new = f"{split}-{len(shards[split]):06d}.tar"
                folder.link(f"{d}/{name}", new)
                sizes[new] = part_sizes[name]
                shards[split].append(new)
    total = dict(mans[0])
    total.pop("part", None)
    for key in ("counts", "captions"):
        total[key] = {sp: sum(m[key][sp] for m in mans) for sp in _SPLITS}
    sources: dict = defaultdict(lambda: {"train": 0, "val": 0})
    skipped: Counter = Counter()
    for m in mans:
        for src, c in m["sources"].items():
            for sp in _SPLITS:
                sources[src][sp] += c.get(sp, 0)
        skipped.update(m["skipped"])
    total.update(sources={k: dict(v) for k, v in sorted(sources.items())}, skipped=dict(sorted(skipped.items())),
                 merged_duplicate_images=sum(m["merged_duplicate_images"] for m in mans),
                 shards=shards, merged_from={"parts": len(mans)})
    total["tokenizer"] = dict(total["tokenizer"], truncated_captions=sum(
        m["tokenizer"]["truncated_captions"] for m in mans))
    folder.write_json("sizes.json", sizes)
    folder.write_json("manifest.json", total)
    print(f"merged {len(mans)} parts: {total['counts']['train']} train and {total['counts']['val']} val "
          f"samples in {len(sizes)} shards in {folder}")
    print(shard_patterns(str(folder), shards))
    return 0


def _get(m: dict, dotted: str):
    for k in dotted.split("."):
        m = m.get(k) if isinstance(m, dict) else None
    return m

