"""Embed a folder of images, or our shards (images and their captions), into an index.

    python launch/build_index.py --model runs/exp1 --shards 'shards/val-{000000..000004}.tar' --out index/
    torchrun --nproc_per_node 4 launch/build_index.py --model runs/exp1 --images photos/ --out index/
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from phoclip.retrieval import eval_samples
from phoclip.shards import check_manifests, expand_urls
from phoclip.transforms import image_to_tensor
from phoclip.errors import EXPECTED_ERRORS, one_line
from phoclip.images import MAX_FILE_BYTES, BadImage, read_image_file
from phoclip.log import init_logger
from phoclip.retrieval import embed_samples, gather_counts, gather_embeddings
from phoclip.gallery import load_item_image, write_embedding_map
from phoclip.index import write_index
from phoclip.text import load_tokenizer, tokenizer_fingerprint
from phoclip_train.distributed import cleanup, init_distributed, launcher_rank
from phoclip_train.export import load_for_inference

logger = logging.getLogger("build_index")

IMAGE_EXT = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_images(folder: str) -> tuple[list[Path], int]:
    """Image files under `folder`, recursively, sorted; and how many other files were seen.
    Symlinked folders are not followed (no loops); a symlinked file is checked when read."""
    root = Path(folder)
    if not root.is_dir():
        raise SystemExit(f"--images {folder}: not a folder")
    files, others = [], 0
    for dirpath, _, names in os.walk(root):
        for n in names:
            f = Path(dirpath) / n
            if f.suffix.lower() in IMAGE_EXT:
                files.append(f)
            else:
                others += 1
    return sorted(files), others


def folder_samples(files: list[Path], image_size: int, rank: int, world: int,
                   skipped: Counter, max_bytes: int = MAX_FILE_BYTES) -> Iterator[dict]:
    """This rank's share of the files as samples without captions; unreadable files
    (broken, not an image, too large, not a regular file) are skipped and counted."""
    for f in files[rank::world]:
        try:
            img = read_image_file(f, max_bytes)
        except BadImage as e:
            skipped[e.reason] += 1
            logger.warning("skipped %s: %s", f, e)
            continue
        yield {"key": str(f), "image": image_to_tensor(img, image_size, train=False),
               "ids": torch.zeros(0, 2, dtype=torch.long), "meta": {"path": [str(f)]}}


def write_projector(logdir: str, emb: torch.Tensor, items: list[dict], thumb: int = 48) -> None:
    """TensorBoard's embedding projector with image thumbnails."""
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter

    thumbs = []
    for it in items:
        im = load_item_image(it).resize((thumb, thumb))
        thumbs.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255)
    with SummaryWriter(logdir) as w:
        w.add_embedding(emb, metadata=[it.get("caption") or it["key"] for it in items],
                        label_img=torch.stack(thumbs), tag="phoclip_images")


def _summary(counts: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing"


def main(argv: Optional[Sequence[str]] = None) -> int:
    init_logger(rank=launcher_rank())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="shards (indexes images and captions): a shard folder (or its "
                                      "manifest.json; with --split), or a brace pattern of paths, pipe:CMD, "
                                      "http(s):// or fsspec URLs")
    p.add_argument("--split", default="val", choices=("train", "val"),
                   help="with a shard folder: which of its splits (default: val)")
    p.add_argument("--manifest", help="manifest.json of the shards when not beside them (pipe: shards)")
    src.add_argument("--images", help="a folder of images (searched recursively)")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-image-bytes", type=int, default=MAX_FILE_BYTES,
                   help="with --images: larger files are skipped unread")
    p.add_argument("--device", default="auto")
    p.add_argument("--map", help="also write a 2-D t-SNE map of the images (PNG), coloured by source")
    p.add_argument("--tensorboard", help="also write a TensorBoard embedding projector (with thumbnails) here")
    p.add_argument("--projector-max", type=int, default=2000, help="at most this many points in the projector")
    args = p.parse_args(argv)
    info = init_distributed(args.device)
    try:
        model, tok_name = load_for_inference(args.model, str(info.device))
        size = model.config["vision"].get("image_size", 224)
        skipped: Counter = Counter()
        others = 0
        if args.shards:
            urls = expand_urls(args.shards, split=args.split)[0]
            tok = load_tokenizer(tok_name)
            manifest = check_manifests(urls, tokenizer_fingerprint(tok), model.pad_id,
                                       model.text.config.max_position_embeddings - 2, tok_name, args.manifest)
            samples = eval_samples(urls, size, info.rank, info.world_size, skipped,
                                   manifest["tokenizer"]["max_length"], len(tok), args.manifest)
        else:
            files, others = list_images(args.images)
            if not files:
                raise SystemExit(f"no images found under {args.images} "
                                 f"(looked for {', '.join(sorted(IMAGE_EXT))})")
            samples = folder_samples(files, size, info.rank, info.world_size, skipped,
                                     args.max_image_bytes)
        parts = embed_samples(model, samples, info.device, args.batch_size, progress=info.is_main)
        img, txt, t2i, keys, metas = gather_embeddings(*parts, info.world_size)
        skipped = gather_counts(skipped, info.world_size)
        if img.shape[0] == 0:
            raise SystemExit(f"no readable images in {args.shards or args.images}: "
                             f"skipped {_summary(skipped)}")
        if info.is_main:
            items = [{"key": k, "path": (m.get("path") or [""])[0],
                      "source": (m.get("source") or ["folder"])[0], "shard": m.get("__shard_url__", ""),
                      "caption": (m.get("captions") or [""])[0]} for k, m in zip(keys, metas)]
            cap_items = None
            if args.shards:
                cap_items, n_before = [], Counter()  # captions already listed per image
                for i in t2i.tolist():
                    caps = metas[i].get("captions") or []
                    c = n_before[i]
                    n_before[i] += 1
                    cap_items.append({"caption": caps[c] if c < len(caps) else "",
                                      "image_key": keys[i], "image": i})
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
        print(f"build_index: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
