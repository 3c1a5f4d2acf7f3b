"""Embed a folder of images, or our shards (images and their captions), into an index: in
parts, one per rank or per job, nothing gathered; then merged into a searchable version.

    phoclip-index --model runs/exp1 --images photos/ --out index/
    python launch/build_index.py --model runs/exp1 --shards shards/ --split val --out index/
    torchrun --nproc_per_node 4 launch/build_index.py --model runs/exp1 --images photos/ --out index/
    phoclip-index --model runs/exp1 --images photos/ --out index/ --part 3 --of 16   # one job of a SLURM array
    phoclip-index --model runs/exp1 --out index/ --merge                             # once all 16 are done
    phoclip-index --model runs/exp1 --images new_photos/ --out index/ --add          # more photos, same index
    phoclip-index --model runs/exp1 --embeddings clip_inference_out/ --out index/    # clip-retrieval's layout

A part that is complete is not computed again (a killed job resumes). The search structure
follows the collection's size, --max-query-ms and --max-index-memory: exact while a query
answers in time (the crossover measured in bench/RESULTS.md), else a faiss IVF index
(SQ or PQ codes) on disk. The index records where its model
and images are, relative to the index folder, so it can be searched from any directory and
moved together with its images.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional, Sequence

from phoclip.data.catalog import check_shards_fit, count_samples, expand_urls
from phoclip.data.text import load_tokenizer
from phoclip.errors import EXPECTED_ERRORS
from phoclip.fileio import atomic_write_json, read_regular
from phoclip.lock import RunLock
from phoclip.log import init_logger
from phoclip.search.ann import parse_bytes
from phoclip.search.meta import check_out_folder, images_root, index_meta, relative
from phoclip_cli.common import HelpFormatter, refuse

MAX_IMAGE_BYTES = 64 << 20  # as phoclip.data.images.MAX_FILE_BYTES (checked by a test), without importing torch for --help


def build_parser() -> argparse.ArgumentParser:
    """The index-building command's arguments."""
    p = argparse.ArgumentParser(prog="phoclip-index", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="model folder, run folder or checkpoint")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--shards", help="shards (indexes images and captions): a shard folder (or its "
                                      "manifest.json; with --split), or a brace pattern of paths, pipe:CMD, "
                                      "http(s):// or fsspec URLs")
    p.add_argument("--split", default="val", choices=("train", "val"), help="with a shard folder: which of its splits")
    p.add_argument("--manifest", help="manifest.json of the shards when not beside them (pipe: shards)")
    src.add_argument("--images", help="a folder of images (searched recursively)")
    src.add_argument("--embeddings", help="a folder in clip-retrieval's layout (img_emb/, text_emb/, metadata/), e.g. "
                                          "clip_inference's output: its parts are linked in (copied across file "
                                          "systems); the model answers text queries and must be as wide")
    p.add_argument("--out", required=True, help="the index folder")
    p.add_argument("--part", type=int, help="with --of: write only part PART (0-based) of OF, e.g. $SLURM_ARRAY_TASK_ID")
    p.add_argument("--of", type=int, help="how many part jobs split the collection")
    p.add_argument("--merge", action="store_true", help="merge the parts written by --part jobs into the index")
    p.add_argument("--add", action="store_true", help="append the new parts to the existing index (a new version; "
                                                       "a service serving it switches without a restart)")
    p.add_argument("--exact", action="store_true", help="exact search whatever the size (no faiss index)")
    p.add_argument("--max-index-memory", default="4G", help="memory the approximate index's codes may take (4G, 512M)")
    p.add_argument("--max-query-ms", type=float, default=10.0,
                   help="latency target: exact search while it answers a query within this (measured: bench/RESULTS.md)")
    p.add_argument("--exact-max-rows", type=int, help="exact search below this many vectors (default: from --max-query-ms "
                                                      "and --max-index-memory)")
    p.add_argument("--rerank", action=argparse.BooleanOptionalAction, default=None,
                   help="re-rank the approximate results exactly from the float16 vectors (default: with PQ/SQ4 codes)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward")
    p.add_argument("--max-image-bytes", type=int, default=MAX_IMAGE_BYTES,
                   help="with --images: larger files are skipped unread")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--map", help="also write a 2-D t-SNE map of the images (PNG), coloured by source")
    p.add_argument("--tensorboard", help="also write a TensorBoard embedding projector (with thumbnails) here")
    p.add_argument("--projector-max", type=int, default=2000, help="at most this many points in the projector and map")
    return p


def _summary(counts: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Embed this rank's (or job's) part, then merge (rank 0 of a run, or --merge) and say
    what was indexed and skipped; 2 with one line when refused."""
    p = build_parser()
    args = p.parse_args(argv)
    if not (args.shards or args.images or args.embeddings or args.merge):
        p.error("give --shards, --images or --embeddings (or --merge)")
    if (args.part is None) != (args.of is None):
        p.error("--part and --of go together")
    if args.of is not None and not 0 <= args.part < args.of:
        p.error("--part must be in [0, --of)")
    if not args.max_query_ms > 0:  # NaN too
        p.error("--max-query-ms must be a positive number of milliseconds")
    if args.merge and args.part is not None:
        p.error("--merge takes no --part: it merges them all")
    # folders checked before the seconds of imports that embedding needs
    for flag, folder in (("--images", args.images), ("--embeddings", args.embeddings)):
        if folder and not Path(folder).is_dir():
            return refuse("build_index", NotADirectoryError(f"{flag} {folder}: not a folder"))
    from phoclip_cli.distributed import cleanup, init_distributed, launcher_rank  # lazy: torch (~1 s), not for --help

    init_logger(rank=launcher_rank())
    info = init_distributed(args.device)
    try:
        if args.part is not None and info.world_size > 1:
            raise ValueError("--part/--of is for separate jobs; under torchrun each rank writes its own part")
        return _run(args, info)
    except EXPECTED_ERRORS as e:
        return refuse("build_index", e)
    finally:
        cleanup()


def _run(args: argparse.Namespace, info) -> int:
    import torch.distributed as dist

    from phoclip.evaluation.retrieval import eval_samples  # lazy: torch (~1 s), not for --help
    from phoclip.models.loading import load_encoder  # lazy: torch (~1 s), not for --help
    from phoclip.search import indexing as ix  # lazy: torch (~1 s), not for --help

    out = Path(args.out)
    max_bytes = parse_bytes(args.max_index_memory)
    check_out_folder(out)  # before the model loads; a user's folder is never written into
    model, tok_name = load_encoder(args.model, device=info.device)
    dim = int(model.config["embed_dim"])
    source = args.shards or args.images or args.embeddings or ""
    cur = ix.current_meta(out) if args.add or args.merge else None
    base = ix.next_part(cur) if args.add else 0
    rank, world = (args.part, args.of) if args.part is not None else (info.rank, info.world_size)
    meta = index_meta(model, str(args.model), str(out.resolve()), source, None)
    others = 0
    if args.embeddings:
        if info.is_main:
            with one_publisher(out):
                names = ix.adopt_embeddings(Path(args.embeddings), out, dim, base)
                meta["images_root"] = None
                return _merge(args, out, meta, names, max_bytes, Counter(), 0)
        return 0
    if args.merge:
        if not source:  # the parts say what they were made from
            first = ix.part_info(out, ix.part_name(base))
            if not first:
                raise ValueError(f"{out}: no complete part {ix.part_name(base)} to merge")
            source, world, base = first.get("source", ""), int(first.get("of", 1)), int(first.get("base", base))
            meta["source"] = source
        # without --add the merge replaces the index's parts, so merging those in use again
        # publishes them anew (after a part's metadata was edited): only an add's may clash
        in_use = [q["name"] for q in cur["parts"]] if cur and args.add else []
        with one_publisher(out):
            names = ix.new_parts(out, in_use, base, world, meta["model_fingerprint"])
            meta["images_root"] = (ix.part_info(out, names[0]) or {}).get("images_root")
            return _merge(args, out, meta, names, max_bytes, Counter(), 0)

    size = model.config["vision"].get("image_size", 224)
    skipped: Counter = Counter()
    if args.shards:
        urls = expand_urls(args.shards, split=args.split, flag="--shards")[0]
        tok = load_tokenizer(tok_name)
        manifest = check_shards_fit(urls, tok, model, tok_name, args.manifest)
        samples = eval_samples(urls, size, rank, world, skipped, manifest.tokenizer.max_length, len(tok), args.manifest)
        try:
            total = count_samples(urls[rank::world], args.manifest)
        except (ValueError, OSError):  # no sizes.json: progress lines without a total
            total = None
        root = images_root(args.shards, [])
    else:
        files, others = ix.list_images(args.images)
        if not files:
            raise ValueError(f"no images found under {args.images} (looked for {', '.join(sorted(ix.IMAGE_EXT))})")
        samples = ix.folder_samples(files, size, rank, world, skipped, args.max_image_bytes)
        total = len(files[rank::world])
        root = images_root(args.images, [])
    name = ix.part_name(base + rank)
    part = {"source": source, "part": rank, "of": world, "base": base, "model_fingerprint": meta["model_fingerprint"],
            "images_root": None if root is None else str(Path(root).resolve())}
    if ix.part_done(out, name, part):
        print(f"part {name} ({rank} of {world}) is complete: skipped")
    else:
        rec = ix.embed_part(model, samples, info.device, args.batch_size, out, name, part,
                            with_captions=bool(args.shards), total=total)
        # the skipped counts are known only once the samples are read: a file beside the part
        print(f"part {name} ({rank} of {world}): {rec['rows']} images" +
              (f", {rec['captions']} captions" if args.shards else "") + f" into {out}")
        _record_skipped(out, name, skipped)
    if args.part is not None:
        print(f"when all {world} parts are written: phoclip-index --model {args.model} --out {out} --merge"
              + (" --add" if args.add else ""))
        return 0
    if world > 1:
        dist.barrier()  # no data: every rank's part is on disk
    if not info.is_main:
        return 0
    with one_publisher(out):
        names = ix.new_parts(out, [q["name"] for q in (cur or {}).get("parts", [])], base, world,
                             meta["model_fingerprint"])
        meta["images_root"] = part["images_root"]
        return _merge(args, out, meta, names, max_bytes, Counter(), others)


@contextlib.contextmanager
def one_publisher(out: Path) -> Iterator[None]:
    """One merge, add or adoption publishes into an index at a time (`RunLock`: OUT/.lock
    with host and pid; a dead holder's lock is taken over): two at once would choose the
    same version or prune each other's parts. A second is refused in one line naming the
    holder. Embedding parts needs no lock: each job writes its own part."""
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _record_skipped(out: Path, name: str, skipped: Counter) -> None:
    """Keep this part's skipped counts beside it (read by the merge of another rank's job)."""

    atomic_write_json(out / "metadata" / f".skipped_{name}.json", dict(skipped))


def _merge(args, out: Path, meta: dict, names: list[str], max_bytes: int, skipped: Counter, others: int) -> int:
    """Merge the parts `names` (each part's skipped counts from its sidecar) and report."""
    import json

    from phoclip.search import indexing as ix  # lazy: torch (~1 s), not for --help

    for n in names:
        f = out / "metadata" / f".skipped_{n}.json"
        if f.is_file():
            try:
                skipped.update(json.loads(read_regular(f, 1 << 20)))
            except (OSError, ValueError):
                pass
    if isinstance(meta.get("images_root"), str) and Path(meta["images_root"]).is_absolute():
        meta["images_root"] = relative(meta["images_root"], meta["built_in"])
    done = ix.merge(out, meta, names, args.add, max_bytes, args.exact, args.rerank, args.exact_max_rows,
                   args.max_query_ms)
    if not args.add:
        ix.remove_unused_parts(out, done)
    _extras(args, out)
    c = done["count"]
    search = done["search"].get("images", {})
    how = "exact search" if search.get("type") == "exact" else \
        f"{search['key']} (nprobe {search['nprobe']}, recall@10 {search['recall_at_10']:.3f}" + \
        (", below the 0.95 target: raise --max-index-memory)" if search.get("recall_target_met") is False else ")")
    print(f"indexed {c['images']} images" + (f" and {c['captions']} captions" if c["captions"] else "")
          + f" into {out} ({len(done['parts'])} parts, version {done['version']}, {how})")
    bad = done.get("skipped", {}).get("images", 0)
    if bad:
        print(f"{bad} stored rows are not finite unit vectors: never returned")
    skipped = Counter({k: v for k, v in skipped.items() if v})
    if skipped:
        print(f"skipped {sum(skipped.values())} unreadable: {_summary(skipped)}")
    if others:
        print(f"ignored {others} files without an image extension")
    return 0


def _extras(args, out: Path) -> None:
    """The map and the projector, over the first --projector-max images."""
    if not (args.map or args.tensorboard):
        return
    import torch

    from phoclip.search.gallery import write_embedding_map  # lazy: torch (~1 s), not for --help
    from phoclip.search.index import EmbeddingIndex  # lazy: torch (~1 s), not for --help
    from phoclip.search.indexing import write_projector  # lazy: torch (~1 s), not for --help

    index = EmbeddingIndex(out)
    n = min(index.count("images"), args.projector_max)
    emb = torch.from_numpy(index.vectors("images", list(range(n))))
    items = index.items_for("images", range(n))
    if args.map:
        print(f"map: {write_embedding_map(args.map, emb, [it['source'] for it in items])}")
    if args.tensorboard:
        write_projector(args.tensorboard, emb, items)
        print(f"projector: tensorboard --logdir {args.tensorboard}")


if __name__ == "__main__":
    sys.exit(main())
