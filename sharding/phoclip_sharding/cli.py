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
import os
import sys
from typing import Optional, Sequence

from phoclip.data.images import MAX_FILE_BYTES, MAX_IMAGE_PIXELS
from phoclip.log import init_logger
from phoclip.data.text import SEGMENTERS
from phoclip_sharding.job import run_job
from phoclip_sharding.merge import merge_parts
from phoclip_sharding.output import is_url
from phoclip.data.datasets import MAX_ANNOTATION_BYTES, READERS
from phoclip_sharding.record import brace_pattern, shard_patterns

__all__ = ["brace_pattern", "build_parser", "console_main", "main", "parse_args", "shard_patterns"]


def build_parser() -> argparse.ArgumentParser:
    """Every make_shards option (checked together by `parse_args`)."""
    from phoclip_cli.common import HelpFormatter

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
    p.add_argument("--num-parts", type=int, default=1, help="split the job into N parts (machines)")
    p.add_argument("--part", type=int, default=0, help="which part this run makes (0..N-1)")
    p.add_argument("--merge", metavar="OUT", help="merge the parts in OUT/part-*/ into OUT")
    p.add_argument("--tokenizer", default="vinai/phobert-large", help="hub name or local folder")
    p.add_argument("--segmenter", default="vncorenlp", choices=SEGMENTERS,
                   help="Vietnamese word segmentation before tokenising (PhoBERT expects VnCoreNLP's; "
                        "underthesea and pyvi run offline; none for pre-segmented captions)")
    p.add_argument("--vncorenlp-dir",
                   help="folder of the VnCoreNLP model (default: $VNCORENLP_DIR)")
    p.add_argument("--max-length", type=int, default=70,
                   help="tokens per caption, <s> and </s> included (longer captions are cut)")
    p.add_argument("--image-size", type=int, default=256, help="shorter side after resizing")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of the resized images in the shards")
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
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of images put in the val split (by content hash) for sources without split=")
    p.add_argument("--seed", type=int, default=0, help="seed of the shard order and the val split's hash")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="processes that decode, resize, segment and tokenise (default: CPUs - 1)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--text-batch", type=int, default=512, help="captions per segmentation batch")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The options, parsed and checked together (argparse's usage error on a bad mix)."""
    p = build_parser()
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


def main(argv: Optional[Sequence[str]] = None, own_process: bool = False) -> int:
    """make_shards: parse, then run the job (`phoclip_sharding.job`) or the merge
    (`phoclip_sharding.merge`); what either refuses ends the command with one line.
    `own_process`: the command runs in its own process, which never runs a model: its
    tokenizing workers start without torch (in-process callers keep their torch)."""
    args = parse_args(argv)
    init_logger()
    if own_process:
        from phoclip_sharding.writer import without_torch

        without_torch()  # before the workers are spawned: they inherit it
    if args.merge:
        try:
            return merge_parts(args.merge)
        except (ValueError, KeyError, TypeError, OSError) as e:  # a damaged part folder
            raise SystemExit(f"make_shards --merge: {e}") from None
    return run_job(args)


def console_main(argv: Optional[Sequence[str]] = None) -> None:
    """`phoclip-shards` and `python sharding/make_shards.py`: the command in its own process."""
    sys.exit(main(argv, own_process=True))
