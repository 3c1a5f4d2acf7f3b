"""Building an index: the images of a folder as samples, the items recorded beside the
embeddings, one part embedded streaming (nothing crosses ranks), the merge of the parts
into a published version (the search structure chosen in phoclip.search.ann), parts of
another tool adopted, and TensorBoard's embedding projector. The command
(phoclip_cli.build_index) parses and calls these; phoclip.search.index reads the folder."""
from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from phoclip.data.images import MAX_FILE_BYTES, BadImage, read_image_file
from phoclip.data.transforms import image_to_tensor
from phoclip.evaluation.retrieval import ProgressLog, embed_samples
from phoclip.fileio import fsync_dir, read_regular, real_dir
from phoclip.search.gallery import load_item_image
from phoclip.search.meta import (
    INDEX_META,
    KINDS,
    MAX_META_BYTES,
    VERSIONS,
    caption_rows,
    check_meta,
    image_rows,
    new_version,
    publish,
)
from phoclip.search.metadata import arrow_of, ensure_arrow
from phoclip.search.parts import (
    IMG,
    META,
    TEXT,
    TEXT_META,
    PartWriter,
    check_part,
    check_unchanged,
    files_of,
    open_embeddings,
    part_info,
    part_name,
    part_names,
    part_stamp,
)

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


# ---------------------------------------------------------------- parts, merge, add

BLOCK = 1024  # samples embedded between two writes of a part (memory stays flat)


def embed_part(model, samples: Iterator[dict], device: torch.device, batch_size: int, out: Path, name: str,
               info: dict, with_captions: bool, total: Optional[int] = None, progress: bool = True) -> dict:
    """Embed `samples` into part `name` of index folder `out`, streaming (BLOCK samples at a
    time), with progress lines (done / total, rate, time left). Returns the part's record."""
    from itertools import islice


    home = os.path.abspath(out)
    dim = int(model.config["embed_dim"])
    bar = ProgressLog(f"part {name}", total, enabled=progress)
    it = iter(samples)
    with PartWriter(out, name, dim, with_captions) as w:
        while True:
            img, txt, t2i, keys, metas = embed_samples(model, islice(it, BLOCK), device, batch_size)
            if img.shape[0] == 0:
                break
            items, cap_items = index_items(keys, metas, t2i, with_captions)
            base = w.img.rows
            w.add(img.to(torch.float16).numpy(), image_rows(items, home),
                  txt.to(torch.float16).numpy() if with_captions else None,
                  [dict(r, image_row=r["image_row"] + base) for r in caption_rows(cap_items or [], items, 0)])
            bar.update(img.shape[0])
        rec = w.close(info)
    bar.close()
    return rec


def current_meta(out: Path) -> Optional[dict]:
    """The index.json of `out` when it is an index (checked), else None."""

    f = out / INDEX_META
    if not f.exists():
        return None
    try:
        m = json.loads(read_regular(f, MAX_META_BYTES))
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"{f}: unreadable ({type(e).__name__}: {e})") from None
    check_meta(m, f)
    return m


def next_part(meta: Optional[dict]) -> int:
    """The number of the first part an add writes: one past the parts in use."""
    return 1 + max((int(p["name"]) for p in meta["parts"]), default=-1) if meta else 0


def part_done(out: Path, name: str, info: dict) -> bool:
    """Whether part `name` is complete and was made by the same job (source, part, of,
    model): a finished part of a killed job is not computed again."""
    got = part_info(out, name)
    keys = ("source", "part", "of", "model_fingerprint")
    return bool(got) and all(got.get(k) == info.get(k) for k in keys)


def new_parts(out: Path, in_use: Sequence[str], base: int, of: int, fingerprint: str) -> list[str]:
    """The names of the `of` parts from `base` a merge takes, all complete and made by
    model `fingerprint`; ValueError in one line naming the first missing one."""
    names = [part_name(base + i) for i in range(of)]
    done = [n for n in names if (part_info(out, n) or {}).get("model_fingerprint") == fingerprint]
    missing = [n for n in names if n not in done]
    if missing:
        raise ValueError(f"{out}: part {missing[0]} of {names[0]}..{names[-1]} is missing or incomplete "
                         f"({len(done)} of {of} written); run its job again, then --merge")
    clash = set(names) & set(in_use)
    if clash:
        raise ValueError(f"{out}: parts {sorted(clash)} are already in the index")
    return names


def adopt_embeddings(src: Path, out: Path, dim: int, base: int) -> list[str]:
    """Parts of another tool's folder in clip-retrieval's layout (img_emb/, text_emb/,
    metadata/) taken into `out` as parts from number `base`: each checked first (float16,
    `dim` wide, rows = metadata rows: one line naming the part otherwise), then hard-linked
    (the files are never written in place, so a link is safe) or copied across file systems."""
    import shutil

    names = part_names(src)
    if not names:
        raise ValueError(f"--embeddings {src}: no img_emb/img_emb_*.npy (clip-retrieval's layout)")
    out_names = []
    was = {j: part_stamp(out, part_name(base + j)) for j in range(len(names))}
    for j, n in enumerate(names):
        check_part(src, n, dim)
        new = part_name(base + j)
        for k, f in files_of(src, n).items():
            if not f.exists():
                continue
            check_unchanged(out, new, was[j])
            dst = files_of(out, new)[k]
            real_dir(dst.parent)
            tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)
            try:
                os.link(os.path.realpath(f), tmp)  # the file a link names: a relative link would name another here
            except OSError:  # another file system
                shutil.copyfile(f, tmp)
            os.replace(tmp, dst)
        out_names.append(new)
    return out_names


def merge(out: Path, meta: dict, names: Sequence[str], add: bool, max_bytes: int, exact: bool = False,
          rerank: Optional[bool] = None, exact_max_rows: Optional[int] = None,
          max_query_ms: Optional[float] = None) -> dict:
    """Publish the parts `names` (checked) as the index of `out`, appended to its parts in
    use with `add`: the search structure chosen for the total (exact, or faiss within
    `max_bytes`; exact while it answers within `max_query_ms`), built into a new version
    folder, then index.json replaced atomically.
    A failure leaves the index as it was. Returns the new index.json."""
    from phoclip.search import ann  # lazy: faiss loads only where an index is merged

    cur = current_meta(out) if add else None
    if add and cur is None:
        raise ValueError(f"--add: {out} is not an index yet; build it first (without --add)")
    if cur is not None and (cur["model_fingerprint"] != meta["model_fingerprint"] or cur["dim"] != meta["dim"]):
        raise ValueError(f"--add: {out} was built with model {cur['model_fingerprint']} ({cur['dim']}-wide), "
                         f"not {meta['model_fingerprint']} ({meta['dim']}-wide)")
    records = [check_part(out, n, meta["dim"]) for n in names]
    parts = (cur["parts"] if cur else []) + records
    arrow_copies(out, parts)
    count = {"images": sum(p["rows"] for p in parts), "captions": sum(p.get("captions", 0) for p in parts)}
    if count["images"] == 0:
        raise ValueError(f"{out}: the parts hold no images")
    version = new_version(out, cur.get("version") if cur else None)
    real_dir(out / VERSIONS)  # a link there would put the new version, and publish's clean-up, in a folder elsewhere
    vdir = real_dir(out / VERSIONS / version)
    old_search = (cur or {}).get("search", {})
    search = {}
    try:
        for kind in KINDS:
            if count[kind] == 0:
                continue
            arrays, start = [], 0
            for p in parts:
                n = p["rows"] if kind == "images" else p.get("captions", 0)
                if n:
                    f = files_of(out, p["name"])[IMG if kind == "images" else TEXT]
                    arrays.append((start, open_embeddings(f, meta["dim"], n, f"part {p['name']}")))
                start += n
            kw = {k: v for k, v in (("exact_max_rows", exact_max_rows), ("max_query_ms", max_query_ms)) if v is not None}
            choice = ann.choose(count[kind], meta["dim"], max_bytes, exact, **kw)
            prev = old_search.get(kind, {})
            if choice["type"] == "exact":
                search[kind] = {"type": "exact", "skipped": _count_bad(arrays)}
                continue
            if rerank is not None:
                choice["rerank"] = rerank
            if prev.get("type") == "faiss" and count[kind] <= 4 * prev.get("ntotal", 0) + 1 and cur is not None:
                # an add: the trained quantizer kept, only the new parts' vectors encoded
                old_v = out / VERSIONS / cur["version"]
                new_start = sum(p["rows"] if kind == "images" else p.get("captions", 0) for p in cur["parts"])
                new_arrays = [(s, a) for s, a in arrays if s >= new_start]
                kept = {k: prev[k] for k in ("key", "nlist", "code_bytes", "rerank")}
                held = prev.get("held_out")
                held = old_v / held if ann.own_file(held) else None
                if not new_arrays:  # no new rows of this kind: its index as it was
                    search[kind] = ann.carry(old_v, prev, vdir)
                    continue
                info = ann.build(new_arrays, kept, vdir, kind, trained=old_v / prev["trained"],
                                 old_index=old_v / prev["file"], all_arrays=arrays, held_out=held)
                info["skipped"] += prev.get("skipped", 0)
            else:
                info = ann.build(arrays, choice, vdir, kind)
            search[kind] = info
        meta = dict(meta, count=count, parts=parts, version=version, search=search,
                    skipped={k: search[k].get("skipped", 0) for k in search})
        fsync_dir(vdir)
        publish(out, meta)
    except BaseException:
        import shutil

        shutil.rmtree(vdir, ignore_errors=True)
        raise
    return meta


def arrow_copies(out: Path, parts: Sequence[dict]) -> int:
    """Make each part's metadata Arrow copy current (`phoclip.search.metadata.write_arrow`),
    so that a search reads its results' items memory-mapped, a row at a time; the parts of
    another tool and any whose parquet changed get theirs here. Returns how many were written."""
    t, written = time.perf_counter(), 0
    for p in parts:
        f = files_of(out, p["name"])
        for k in (META, TEXT_META):
            if k == META or f[k].exists():
                written += ensure_arrow(f[k])
    if written:
        logger.info("metadata: %d Arrow copies written in %.1f s", written, time.perf_counter() - t)
    return written


def _count_bad(arrays) -> int:
    """Rows that are not finite unit vectors (skipped by every search), counted by a read of the parts."""
    import numpy as np

    bad = 0
    for _, a in arrays:
        for s in range(0, a.shape[0], 65536):
            x = np.asarray(a[s:s + 65536], dtype=np.float32)
            with np.errstate(invalid="ignore", over="ignore"):
                norm = np.linalg.norm(x, axis=1)
            bad += int((~(np.isfinite(norm) & (np.abs(norm - 1) <= 0.05))).sum())
    return bad


def remove_unused_parts(out: Path, meta: dict) -> int:
    """Remove part files the index does not name (a rebuild into the same folder with fewer
    parts); returns how many parts went."""
    keep = {p["name"] for p in meta["parts"]}
    gone = 0
    for n in part_names(out):
        if n not in keep:
            for k, f in files_of(out, n).items():
                f.unlink(missing_ok=True)
                if k in (META, TEXT_META):
                    arrow_of(f).unlink(missing_ok=True)
            gone += 1
    return gone
