"""One make_shards job (or one part of it), phase by phase:

    collect   read the sources, hash and merge images, split     phoclip_sharding.collect
    plan      the shard plan, its hash, the output claimed        phoclip_sharding.plan
    write     images + text + shards in the worker pool           phoclip_sharding.writer
    record    manifest.json + sizes.json from the .done records   phoclip_sharding.record

`run_job` opens what the phases share (the output, its lock, the job store, the pool)
and closes it on every path."""
from __future__ import annotations

import argparse
import logging
import sqlite3
import time
from pathlib import Path

from phoclip.errors import EXPECTED_ERRORS, one_line
from phoclip.fileio import real_dir
from phoclip.data.text import create_segmenter, load_tokenizer, tokenizer_fingerprint
from phoclip_sharding.collect import collect
from phoclip_sharding.merge import PART_DIR
from phoclip_sharding.output import Output, default_staging, is_url
from phoclip_sharding.plan import ShardPlan, claim_output
from phoclip.data.datasets import SourceSpec
from phoclip_sharding.record import JobSettings, job_record, shard_patterns
from phoclip_sharding.store import STORE_NAME, JobStore, lock_folder
from phoclip_sharding.writer import TextSettings, make_pool, run_tasks

logger = logging.getLogger("make_shards")


def source_specs(args: argparse.Namespace) -> list[SourceSpec]:
    """The --source specs, with the job-wide reading settings where a spec sets none."""
    try:
        specs = [SourceSpec.parse(s) for s in args.source]
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"make_shards: {e}") from None
    for spec, text in zip(specs, args.source):
        if "encoding=" not in text:
            spec.encoding = args.encoding
        spec.allow_outside = args.allow_outside_paths
        spec.max_bytes = args.max_annotation_bytes
    return specs


def output_of(args: argparse.Namespace) -> tuple[Path, str | None]:
    """(the local folder shards are written in, the URL they go to, if any)."""
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
    return out, url


def run_job(args: argparse.Namespace) -> int:
    """The job of parsed make_shards arguments (not --merge); SystemExit with one line
    for what it refuses."""
    t0 = time.time()
    specs = source_specs(args)
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        segmenter = create_segmenter(args.segmenter, args.vncorenlp_dir)
    except EXPECTED_ERRORS as e:
        raise SystemExit(f"make_shards: {one_line(e)}") from None
    out, url = output_of(args)
    lock = lock_folder(out)  # two jobs writing one folder would interleave shards
    for i, spec in enumerate(specs):  # images held inside wds tars / parquet cells land here
        spec.cache_dir = out / ".sources" / f"{i:02d}-{spec.source_name.replace('/', '_')}"
        spec.part = (args.part, args.num_parts)  # ... only this part's

    pool = make_pool(args.workers)
    store = None
    try:
        store = JobStore(out / STORE_NAME)
        return _phases(args, tokenizer, segmenter, Output(out, url), pool, t0, specs, store, lock)
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


def _phases(args, tokenizer, segmenter, output: Output, pool, t0: float, specs, store: JobStore, lock) -> int:
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
    plan = ShardPlan(store, output.local, output.url, args.shard_size, args.image_size, args.jpeg_quality,
                     args.max_pixels, args.max_image_bytes, text, refresh=lock.refresh)
    names, todo, plan_hash = plan.survey(output, [
        args.image_size, args.jpeg_quality, args.max_length, tokenizer_fingerprint(tokenizer),
        args.max_pixels, args.max_image_bytes, segmenter.name, segmenter.version])
    claim_output(output, plan_hash)
    if todo < n_samples:
        logger.info("resuming: %d of %d samples already in complete shards", n_samples - todo, n_samples)
    t_plan = time.time()

    run_tasks((t for t in plan.tasks() if not output.is_complete(t.name)), pool, todo)
    logger.info("time: read+hash %.1fs, plan %.1fs, images+text+shards %.1fs",
                t_read - t0, t_plan - t_read, time.time() - t_plan)

    settings = JobSettings(args.source, args.tokenizer, args.max_length, args.image_size, args.jpeg_quality,
                           args.max_pixels, args.max_image_bytes, args.seed, args.val_fraction, args.part,
                           args.num_parts)
    manifest, sizes = job_record(settings, tokenizer, segmenter, output, names, store, skipped, merged)
    output.write_json("manifest.json", manifest.to_dict())
    output.write_json("sizes.json", sizes)
    dt = time.time() - t0
    counts = manifest.counts
    total = counts["train"] + counts["val"]
    print(f"wrote {total} samples ({counts['train']} train, {counts['val']} val) in "
          f"{len(names)} shards to {output} in {dt:.1f}s ({total / max(dt, 1e-9):.1f} img/s)")
    if skipped:
        print("skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())))
    print(shard_patterns(str(output), manifest.shards))
    return 0
