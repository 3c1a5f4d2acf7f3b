"""One make_shards job (or one part of it), phase by phase:

    collect   read the sources, hash and merge images, split     phoclip_sharding.collect
    plan      the shard plan, its hash, the output claimed        phoclip_sharding.plan
    write     images + text + shards in the worker pool           phoclip_sharding.writer
    record    manifest.json + sizes.json from the .done records   phoclip_sharding.record

`run_job` opens what the phases share (the output, its lock, the job store, the pool)
and closes it on every path."""
from __future__ import annotations

import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from phoclip.data.datasets import parse_source
from phoclip.data.sources import MAX_ANNOTATION_BYTES, SourceSpec
from phoclip.data.images import MAX_FILE_BYTES, MAX_IMAGE_PIXELS
from phoclip.data.text import SEGMENTERS, create_segmenter, load_tokenizer, tokenizer_fingerprint
from phoclip.fileio import real_dir
from phoclip_sharding.collect import collect
from phoclip_sharding.merge import PART_DIR
from phoclip_sharding.output import Output, default_staging, is_url
from phoclip_sharding.plan import ShardPlan, claim_output
from phoclip_sharding.record import JobSettings, job_record, shard_patterns
from phoclip_sharding.store import STORE_NAME, JobStore, lock_folder
from phoclip_sharding.writer import TextSettings, make_pool, run_tasks

logger = logging.getLogger("make_shards")


def default_workers() -> int:
    """Processes that decode, resize, segment and tokenise: one CPU left to the parent."""
    return max(1, (os.cpu_count() or 2) - 1)


@dataclass(frozen=True, kw_only=True)
class JobOptions:
    """One make_shards job (or one part of it), as the command's flags set it; checked
    when built (a ValueError naming the flag). `phoclip-shards --help` says the same."""

    sources: tuple[str, ...]
    """FORMAT:ANNOTATIONS[:IMAGE_DIR][,key=value...] specs (`parse_source`)."""
    out: str
    """Output folder, or an fsspec URL whose shards are uploaded atomically."""
    staging: str | None = None
    """With a URL `out`: the local folder shards are written in before upload."""
    num_parts: int = 1
    """The job split into this many parts (machines)."""
    part: int = 0
    """Which part this run makes (0..num_parts-1)."""
    tokenizer: str = "vinai/phobert-large"
    """Hub name or local folder."""
    segmenter: str = "vncorenlp"
    """Word segmentation before tokenising: one of `phoclip.data.text.SEGMENTERS`."""
    vncorenlp_dir: str | None = None
    """Folder of the VnCoreNLP model (None: $VNCORENLP_DIR)."""
    max_length: int = 70
    """Tokens per caption, <s> and </s> included."""
    image_size: int = 256
    """Shorter side after resizing."""
    jpeg_quality: int = 90
    """JPEG quality of the resized images."""
    max_pixels: int = MAX_IMAGE_PIXELS
    """Images with more pixels are refused (decompression bombs)."""
    max_image_bytes: int = MAX_FILE_BYTES
    """Image files larger than this are refused unread."""
    encoding: str = "utf-8"
    """Text encoding of the annotation files where a source sets none."""
    max_annotation_bytes: int = MAX_ANNOTATION_BYTES
    """Annotation files larger than this are refused unread."""
    allow_outside_paths: bool = False
    """Accept image paths that are absolute or lead out of the image folder."""
    val_fraction: float = 0.05
    """Share of images put in the val split (by content hash) for sources without split=."""
    seed: int = 0
    """Seed of the shard order and of the val split's hash."""
    workers: int = field(default_factory=default_workers)
    """Worker processes (1: everything in this process)."""
    shard_size: int = 1000
    """Samples per shard."""
    text_batch: int = 512
    """Captions per segmentation batch."""

    def __post_init__(self) -> None:
        if not self.sources or not self.out:
            raise ValueError("--source and --out are required (or --merge OUT)")
        if self.segmenter not in SEGMENTERS:
            raise ValueError(f"--segmenter must be one of {', '.join(SEGMENTERS)}, not {self.segmenter!r}")
        if self.staging and not is_url(self.out):
            raise ValueError("--staging is for an --out URL (shards go to OUT directly otherwise)")
        if self.num_parts < 1 or not 0 <= self.part < self.num_parts:
            raise ValueError(f"--part must be in [0, --num-parts) = [0, {self.num_parts})")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError("--val-fraction must be in [0, 1)")
        if self.shard_size < 1 or self.max_length < 4 or self.image_size < 8:
            raise ValueError("--shard-size >= 1, --max-length >= 4 and --image-size >= 8 are required")
        if self.max_pixels < 1 or self.max_image_bytes < 1 or self.max_annotation_bytes < 1:
            raise ValueError("--max-pixels, --max-image-bytes and --max-annotation-bytes must be positive")


def source_specs(opts: JobOptions) -> list[SourceSpec]:
    """The --source specs, with the job-wide reading settings where a spec sets none."""
    specs = [parse_source(s) for s in opts.sources]
    for spec, text in zip(specs, opts.sources):
        if "encoding=" not in text:
            spec.encoding = opts.encoding
        spec.allow_outside = opts.allow_outside_paths
        spec.max_bytes = opts.max_annotation_bytes
    return specs


def output_of(opts: JobOptions) -> tuple[Path, str | None]:
    """(the local folder shards are written in, the URL they go to, if any)."""
    url = None
    if is_url(opts.out):  # shards go to object storage through a local staging folder
        url = opts.out.rstrip("/") + (f"/{PART_DIR.format(opts.part)}" if opts.num_parts > 1 else "")
        out = Path(opts.staging) if opts.staging else default_staging(url, opts.part)
        logger.info("writing to %s through the staging folder %s", url, out)
    else:
        out = Path(opts.out)
        if opts.num_parts > 1:
            out = out / PART_DIR.format(opts.part)
    out.mkdir(parents=True, exist_ok=True)
    if opts.num_parts > 1 and not url:
        real_dir(out)  # a part folder planted as a link would send the part's files elsewhere
    return out, url


def run_job(opts: JobOptions) -> int:
    """Run the job; 0 when done. What it refuses (a source, the tokenizer or segmenter,
    the output folder, its lock or job store) is an error of `phoclip.errors.EXPECTED_ERRORS`
    with a one-line message, raised after the pool, store and lock are closed."""
    t0 = time.time()
    specs = source_specs(opts)
    tokenizer = load_tokenizer(opts.tokenizer)
    segmenter = create_segmenter(opts.segmenter, opts.vncorenlp_dir)
    out, url = output_of(opts)
    lock = lock_folder(out)  # two jobs writing one folder would interleave shards
    for i, spec in enumerate(specs):  # images held inside wds tars / parquet cells land here
        spec.cache_dir = out / ".sources" / f"{i:02d}-{spec.source_name.replace('/', '_')}"
        spec.part = (opts.part, opts.num_parts)  # ... only this part's

    pool = make_pool(opts.workers)
    store = None
    try:
        store = JobStore(out / STORE_NAME)
        return _phases(opts, tokenizer, segmenter, Output(out, url), pool, t0, specs, store, lock)
    except sqlite3.Error as e:  # e.g. the disk holding the job store is full
        raise OSError(f"{out / STORE_NAME}: {e}") from None
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if store is not None:
            store.close()
        lock.release()


def _phases(opts: JobOptions, tokenizer, segmenter, output: Output, pool, t0: float, specs, store: JobStore,
            lock) -> int:
    n_samples, skipped, merged = collect(specs, pool, store, opts.max_pixels, opts.max_image_bytes,
                                         opts.num_parts, opts.part, opts.seed, opts.val_fraction)
    t_read = time.time()
    if not n_samples and opts.num_parts == 1:
        raise ValueError("no usable image-caption pair in the sources; see the warnings above")

    # text: normalise → segment → tokenize, once per caption, in the workers that write
    # each shard (captions/s scale with --workers; a resumed job segments only the
    # shards it still writes)
    text = TextSettings(opts.tokenizer, opts.segmenter, opts.vncorenlp_dir, opts.max_length, opts.text_batch)
    plan = ShardPlan(store, output.local, output.url, opts.shard_size, opts.image_size, opts.jpeg_quality,
                     opts.max_pixels, opts.max_image_bytes, text, refresh=lock.refresh)
    names, todo, plan_hash = plan.survey(output, [
        opts.image_size, opts.jpeg_quality, opts.max_length, tokenizer_fingerprint(tokenizer),
        opts.max_pixels, opts.max_image_bytes, segmenter.name, segmenter.version])
    claim_output(output, plan_hash)
    if todo < n_samples:
        logger.info("resuming: %d of %d samples already in complete shards", n_samples - todo, n_samples)
    t_plan = time.time()

    run_tasks((t for t in plan.tasks() if not output.is_complete(t.name)), pool, todo)
    logger.info("time: read+hash %.1fs, plan %.1fs, images+text+shards %.1fs",
                t_read - t0, t_plan - t_read, time.time() - t_plan)

    settings = JobSettings(list(opts.sources), opts.tokenizer, opts.max_length, opts.image_size, opts.jpeg_quality,
                           opts.max_pixels, opts.max_image_bytes, opts.seed, opts.val_fraction, opts.part,
                           opts.num_parts)
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
    if opts.num_parts > 1:  # a part's shards are one piece: train on the merge of every part
        print(f"part {opts.part} of {opts.num_parts} done; run phoclip-shards --merge {opts.out} when all {opts.num_parts} "
              "parts are done")
    return 0
