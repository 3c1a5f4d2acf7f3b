"""Building an index: the images of a folder as samples, the items recorded beside the
embeddings, and TensorBoard's embedding projector. The command (phoclip_cli.build_index)
parses and calls these; phoclip.search.index writes and reads the index folder."""
from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Iterator

import torch

from phoclip.data.images import MAX_FILE_BYTES, BadImage, read_image_file
from phoclip.data.transforms import image_to_tensor

logger = logging.getLogger(__name__)

IMAGE_EXT = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_images(folder: str | os.PathLike) -> tuple[list[Path], int]:
    """Image files under `folder`, recursively, sorted; and how many other files were seen.
    Symlinked folders are not followed (no loops); a symlinked file is checked when read."""
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"--images {folder}: not a folder")
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


def index_items(keys: list, metas: list[dict], text_to_image: torch.Tensor,
                with_captions: bool) -> tuple[list[dict], list[dict] | None]:
    """The image items (key, path, source, shard, first caption) and, from shards, one
    caption item per embedded caption (its text, its image's key and row)."""
    items = [{"key": k, "path": (m.get("path") or [""])[0], "source": (m.get("source") or ["folder"])[0],
              "shard": m.get("__shard_url__", ""), "caption": (m.get("captions") or [""])[0]}
             for k, m in zip(keys, metas)]
    if not with_captions:
        return items, None
    cap_items, n_before = [], Counter()  # captions already listed per image
    for i in text_to_image.tolist():
        caps = metas[i].get("captions") or []
        c = n_before[i]
        n_before[i] += 1
        cap_items.append({"caption": caps[c] if c < len(caps) else "", "image_key": keys[i], "image": i})
    return items, cap_items


def write_projector(logdir: str, emb: torch.Tensor, items: list[dict], thumb: int = 48) -> None:
    """TensorBoard's embedding projector with image thumbnails."""
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter

    from phoclip.search.gallery import load_item_image

    thumbs = []
    for it in items:
        try:
            im = load_item_image(it).resize((thumb, thumb))
        except Exception as e:  # a moved or unreadable picture: a blank thumbnail, not a failed build
            logger.warning("no projector thumbnail for %s: %s", it.get("key"), e)
            thumbs.append(torch.zeros(3, thumb, thumb))
            continue
        thumbs.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255)
    with SummaryWriter(logdir) as w:
        w.add_embedding(emb, metadata=[it.get("caption") or it["key"] for it in items],
                        label_img=torch.stack(thumbs), tag="phoclip_images")
