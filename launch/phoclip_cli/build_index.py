"""Embed a folder of images, or our shards (images and their captions), into an index.

    python launch/build_index.py --model runs/exp1 --shards shards/ --split val --out index/
    phoclip-index --model runs/exp1 --images photos/ --out index/
    torchrun --nproc_per_node 4 launch/build_index.py --model runs/exp1 --images photos/ --out index/

The index records where its model and images are, relative to the index folder (and
where they were when it was built), so it can be searched from any directory and moved
together with its images.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import Optional, Sequence

from phoclip_cli.common import HelpFormatter, refuse

MAX_IMAGE_BYTES = 64 << 20  # as phoclip.data.images.MAX_FILE_BYTES (checked by a test), without importing torch for --help


def build_parser() -> argparse.ArgumentParser:
    """The index-building command's arguments."""
    p = argparse.ArgumentParser(prog="phoclip-index", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="model folder, run folder or checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="shards (indexes images and captions): a shard folder (or its "
                                      "manifest.json; with --split), or a brace pattern of paths, pipe:CMD, "
                                      "http(s):// or fsspec URLs")
    p.add_argument("--split", default="val", choices=("train", "val"), help="with a shard folder: which of its splits")
    p.add_argument("--manifest", help="manifest.json of the shards when not beside them (pipe: shards)")
    src.add_argument("--images", help="a folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="the index folder to write (replaced whole if it is an index)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward")
    p.add_argument("--max-image-bytes", type=int, default=MAX_IMAGE_BYTES,
                   help="with --images: larger files are skipped unread")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--map", help="also write a 2-D t-SNE map of the images (PNG), coloured by source")
    p.add_argument("--tensorboard", help="also write a TensorBoard embedding projector (with thumbnails) here")
    p.add_argument("--projector-max", type=int, default=2000, help="at most this many points in the projector")
    return p


def _summary(counts: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Embed, gather, write the index (rank 0) and say what was indexed and skipped; 2
    with one line when refused."""
    args = build_parser().parse_args(argv)
    from phoclip.errors import EXPECTED_ERRORS
    from phoclip.search.gallery import write_embedding_map
    from phoclip.search.index import write_index
    from phoclip.search.indexing import IMAGE_EXT, folder_samples, index_items, list_images, write_projector
    from phoclip.log import init_logger
    from phoclip.evaluation.retrieval import embed_samples, eval_samples, gather_counts, gather_embeddings
    from phoclip.data.catalog import check_shards_fit, count_samples, expand_urls
    from phoclip.data.text import load_tokenizer
    from phoclip_cli.distributed import cleanup, init_distributed, launcher_rank
    from phoclip.models.loading import load_encoder

    init_logger(rank=launcher_rank())
    info = init_distributed(args.device)
    try:
        model, tok_name = load_encoder(args.model, device=info.device)
        size = model.config["vision"].get("image_size", 224)
        skipped: Counter = Counter()
        others, total = 0, None
        if args.shards:
            urls = expand_urls(args.shards, split=args.split)[0]
            tok = load_tokenizer(tok_name)
            manifest = check_shards_fit(urls, tok, model, tok_name, args.manifest)
            samples = eval_samples(urls, size, info.rank, info.world_size, skipped,
                                   manifest.tokenizer.max_length, len(tok), args.manifest)
            try:
                total = count_samples(urls[info.rank::info.world_size], args.manifest)
            except (ValueError, OSError):  # no sizes.json: progress lines without a total
                total = None
        else:
            files, others = list_images(args.images)
            if not files:
                raise ValueError(f"no images found under {args.images} (looked for {', '.join(sorted(IMAGE_EXT))})")
            samples = folder_samples(files, size, info.rank, info.world_size, skipped, args.max_image_bytes)
            total = len(files[info.rank::info.world_size])
        parts = embed_samples(model, samples, info.device, args.batch_size, progress=info.is_main, total=total)
        img, txt, t2i, keys, metas = gather_embeddings(*parts, info.world_size)
        skipped = gather_counts(skipped, info.world_size)
        if img.shape[0] == 0:
            raise ValueError(f"no readable images in {args.shards or args.images}: skipped {_summary(skipped)}")
        if info.is_main:
            items, cap_items = index_items(keys, metas, t2i, with_captions=bool(args.shards))
            write_index(args.out, model, str(args.model), img, items,
                        txt if args.shards else None, cap_items, args.shards or args.images)
            if args.map:
                print(f"map: {write_embedding_map(args.map, img, [it['source'] for it in items])}")
            if args.tensorboard:
                write_projector(args.tensorboard, img[: args.projector_max], items[: args.projector_max])
                print(f"projector: tensorboard --logdir {args.tensorboard}")
            print(f"indexed {img.shape[0]} images" + (f" and {txt.shape[0]} captions" if args.shards else "")
                  + f" into {args.out}")
            if skipped:
                print(f"skipped {sum(skipped.values())} unreadable: {_summary(skipped)}")
            if others:
                print(f"ignored {others} files without an image extension")
        return 0
    except EXPECTED_ERRORS as e:
        return refuse("build_index", e)
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
