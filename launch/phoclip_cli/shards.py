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
import dataclasses
import sys
from typing import Optional, Sequence

from phoclip.data.datasets import READERS
from phoclip.data.text import SEGMENTERS
from phoclip.errors import EXPECTED_ERRORS
from phoclip.log import init_logger
from phoclip_cli.common import HelpFormatter, refuse
from phoclip_sharding.job import JobOptions, default_workers, run_job
from phoclip_sharding.merge import merge_parts
from phoclip_sharding.writer import without_torch

__all__ = ["build_parser", "console_main", "job_options", "main", "parse_args"]

def build_parser() -> argparse.ArgumentParser:
    """Every make_shards option (checked together by `parse_args`); the defaults are
    `JobOptions`'."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--source", action="append",
                   help="FORMAT:ANNOTATIONS[:IMAGE_DIR][,split=train|val][,name=N]"
                        "[,image_field=F][,caption_field=F]; repeatable. FORMAT is one of: "
                        + ", ".join(sorted(READERS)))
    p.add_argument("--out", help="output folder, or an fsspec URL (s3://bucket/vi, gs://..., file://...): "
                                 "each finished shard is uploaded atomically")
    p.add_argument("--staging", help="with a URL --out: the local folder where shards are written before "
                                     "upload, with the job's hash journal and source cache "
                                     "(default: ~/.cache/phoclip/make_shards/HASH)")
    p.add_argument("--num-parts", type=int, default=JobOptions.num_parts, help="split the job into N parts (machines)")
    p.add_argument("--part", type=int, default=JobOptions.part, help="which part this run makes (0..N-1)")
    p.add_argument("--merge", metavar="OUT", help="merge the parts in OUT/part-*/ into OUT")
    p.add_argument("--tokenizer", default=JobOptions.tokenizer, help="hub name or local folder")
    p.add_argument("--segmenter", default=JobOptions.segmenter, choices=SEGMENTERS,
                   help="Vietnamese word segmentation before tokenising (PhoBERT expects VnCoreNLP's; "
                        "underthesea and pyvi run offline; none for pre-segmented captions)")
    p.add_argument("--vncorenlp-dir",
                   help="folder of the VnCoreNLP model (default: $VNCORENLP_DIR)")
    p.add_argument("--max-length", type=int, default=JobOptions.max_length,
                   help="tokens per caption, <s> and </s> included (longer captions are cut)")
    p.add_argument("--image-size", type=int, default=JobOptions.image_size, help="shorter side after resizing")
    p.add_argument("--jpeg-quality", type=int, default=JobOptions.jpeg_quality,
                   help="JPEG quality of the resized images in the shards")
    p.add_argument("--max-pixels", type=int, default=JobOptions.max_pixels,
                   help="refuse images with more pixels (decompression bombs)")
    p.add_argument("--max-image-bytes", type=int, default=JobOptions.max_image_bytes,
                   help="refuse image files larger than this, unread")
    p.add_argument("--encoding", default=JobOptions.encoding,
                   help="text encoding of the annotation files (per source: ,encoding=NAME)")
    p.add_argument("--max-annotation-bytes", type=int, default=JobOptions.max_annotation_bytes,
                   help="refuse annotation files (json, jsonl, csv, txt: read whole) larger than this, unread")
    p.add_argument("--allow-outside-paths", action="store_true",
                   help="accept image paths that are absolute or lead out of the image folder")
    p.add_argument("--val-fraction", type=float, default=JobOptions.val_fraction,
                   help="share of images put in the val split (by content hash) for sources without split=")
    p.add_argument("--seed", type=int, default=JobOptions.seed, help="seed of the shard order and the val split's hash")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="processes that decode, resize, segment and tokenise (default: CPUs - 1)")
    p.add_argument("--shard-size", type=int, default=JobOptions.shard_size, help="samples per shard")
    p.add_argument("--text-batch", type=int, default=JobOptions.text_batch, help="captions per segmentation batch")
    return p


def job_options(args: argparse.Namespace) -> JobOptions:
    """The typed options of parsed make_shards arguments (not --merge); a ValueError
    naming the flag for a bad mix."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(JobOptions) if f.name != "sources"}
    return JobOptions(sources=tuple(args.source or ()), **kw)


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, Optional[JobOptions]]:
    """(the parsed flags, the job's options; None with --merge), checked together:
    argparse's usage error (exit 2) on a bad mix."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.merge:
        return args, None
    try:
        return args, job_options(args)
    except ValueError as e:
        p.error(str(e))


def main(argv: Optional[Sequence[str]] = None, own_process: bool = False) -> int:
    """make_shards: parse, then run the job (`phoclip_sharding.job`) or the merge
    (`phoclip_sharding.merge`); 0 when done, 2 with one line for what either refuses.
    `own_process`: the command runs in its own process, which never runs a model: its
    tokenizing workers start without torch (in-process callers keep their torch)."""
    args, opts = parse_args(argv)
    init_logger()
    if own_process:
        without_torch()  # before the workers are spawned: they inherit it
    if opts is None:
        try:
            return merge_parts(args.merge)
        except (*EXPECTED_ERRORS, KeyError, TypeError) as e:  # a damaged part folder
            return refuse("make_shards --merge", e)
    try:
        return run_job(opts)
    except EXPECTED_ERRORS as e:
        return refuse("make_shards", e)


def console_main(argv: Optional[Sequence[str]] = None) -> None:
    """`phoclip-shards` and `python sharding/make_shards.py`: the command in its own process."""
    sys.exit(main(argv, own_process=True))
