"""Search an index: text → image, image → text, zero-shot tags.

    python launch/search.py --index index/ "xe hơi màu đỏ đậu trước ngôi nhà" --k 25 --html out.html
    phoclip-search --index index/ --image photo.jpg --k 5
    phoclip-search --index index/ --tags tags.txt --k 3

The model is the one the index was built with (recorded in its index.json, relative to
the index folder); --model names another copy of it.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from phoclip.data.images import BadImage, read_image_file
from phoclip.data.text import strip_controls
from phoclip.errors import EXPECTED_ERRORS
from phoclip.log import init_logger
from phoclip.models.loading import load_encoder
from phoclip_cli.common import HelpFormatter, read_lines, refuse

logger = logging.getLogger("search")


def build_parser() -> argparse.ArgumentParser:
    """The search command's arguments."""
    p = argparse.ArgumentParser(prog="phoclip-search", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("queries", nargs="*", help="Vietnamese queries (text → image)")
    p.add_argument("--index", required=True, help="an index folder (written by build_index)")
    p.add_argument("--model", help="default: the model the index was built with (its index.json)")
    p.add_argument("--image", action="append", help="image → text: an image file (repeatable)")
    p.add_argument("--tags", help="zero-shot tagging: a file with one Vietnamese tag per line")
    p.add_argument("--labels", help="with --tags: a TSV of KEY_OR_PATH<TAB>LABEL for zero-shot accuracy")
    p.add_argument("--k", type=int, default=25, help="results per query (tags per image with --tags)")
    p.add_argument("--segmenter", help="default: the one the model's shards were made with")
    p.add_argument("--vncorenlp-dir", help="VnCoreNLP model folder (default: $VNCORENLP_DIR)")
    p.add_argument("--backend", choices=("exact", "faiss", "onnx"), default="exact",
                   help="exact or faiss index search (PyTorch encoder); onnx: queries embedded by "
                        "onnxruntime from the model's ONNX export, exact search")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--html", help="write a self-contained HTML gallery here")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Search and print the results (a table, or JSON); 2 with one line when refused."""
    p = build_parser()
    args = p.parse_args(argv)
    init_logger()
    if not (args.queries or args.image or args.tags):
        p.error("give a query, --image or --tags")
    if args.k < 1:
        p.error("--k must be >= 1")
    # paths checked before the 6-7 s of imports that searching needs
    bad = next((f"{flag} {v}: {why}" for flag, v, ok, why in (
        ("--index", args.index, Path(args.index).is_dir(), "not a folder (an index made by phoclip-index)"),
        *(("--image", f, Path(f).is_file(), "no such file") for f in args.image or ()),
        ("--tags", args.tags, not args.tags or Path(args.tags).is_file(), "no such file")) if not ok), None)
    if bad:
        return refuse("search", FileNotFoundError(bad))
    try:
        return _search(args)
    except EXPECTED_ERRORS as e:
        return refuse("search", e)


def _search(args: argparse.Namespace) -> int:
    from phoclip.search.gallery import write_gallery  # lazy: imports torch (~2 s); --help answers without it
    from phoclip.search.index import EmbeddingIndex  # lazy: imports torch (~2 s); --help answers without it
    from phoclip.models.embed import query_processor  # lazy: imports torch (~2 s)
    from phoclip.search.query import (DEFAULT_TEMPLATES, find_captions, find_matches,  # lazy: imports torch (~2 s)
                                      zero_shot_accuracy, zero_shot_tags)

    index = EmbeddingIndex(args.index)
    if not args.model and index.model_found_via is None:
        looked = " and ".join(index.candidates(index.recorded_model))
        raise FileNotFoundError(f"the index's model {index.recorded_model!r} (recorded in {Path(args.index) / 'index.json'}) "
                                f"holds no model (looked at {looked}); pass --model PATH to the model the index "
                                "was built with")
    # the model the index names is loaded like any other: a model folder, or a
    # checkpoint verified weights-only before anything unpickles it
    encoder = "onnx" if args.backend == "onnx" else "torch"
    model, tok_name = load_encoder(args.model or index.meta["model"], encoder)
    args.backend = "exact" if args.backend == "onnx" else args.backend
    if encoder == "onnx":  # the same table either way: say which runtime embedded the queries
        logger.info("queries embedded by onnxruntime (%s) from the model's ONNX export; exact search",
                    ", ".join(model.providers))
    index.check_model(model)
    logger.info("%s", strip_controls(index.model_line(args.model)))  # which model answers, and why that one
    proc = query_processor(model, tok_name, args.segmenter, args.vncorenlp_dir)
    out: dict = {}
    if args.queries:
        res = find_matches(model, index, args.queries, proc, args.k, args.backend)
        out["text_to_image"] = {q: [vars(m) for m in r] for q, r in zip(args.queries, res)}
        if args.html:
            print(f"gallery: {write_gallery(args.html, args.queries, res)}")
        if not args.json:
            with_captions = any(m.item.get("caption") for r in res for m in r)
            for q, r in zip(args.queries, res):
                print(f"\nquery: {strip_controls(q)}")
                print(f"{'rank':>4} {'cosine':>7}  image" + ("  (its first caption)" if with_captions else ""))
                for m in r:
                    # index items are data: never let them drive the terminal
                    cap = _shown(m.item.get("caption"))
                    print(f"{m.rank:>4} {m.score:7.3f}  {_shown(m.item.get('path') or m.item.get('key'))}"
                          + (f"  ({cap})" if cap else ""))
    if args.image:
        ims = []
        for f in args.image:
            try:
                ims.append(read_image_file(f))
            except BadImage as e:
                raise SystemExit(f"--image {f}: {e}") from None
        res = find_captions(model, index, ims, args.k, args.backend)
        out["image_to_text"] = {f: [vars(m) for m in r] for f, r in zip(args.image, res)}
        if not args.json:
            images = index.items("images")
            for f, r in zip(args.image, res):
                print(f"\nimage: {_shown(f)}")
                print(f"{'rank':>4} {'cosine':>7}  caption  [the indexed image it describes]")
                for m in r:
                    j = m.item.get("image")
                    src = images[j] if isinstance(j, int) and 0 <= j < len(images) else {}
                    print(f"{m.rank:>4} {m.score:7.3f}  {_shown(m.item.get('caption'))}  "
                          f"[{_shown(src.get('path') or src.get('key') or '?')}]")
    if args.tags:
        tags = read_lines(args.tags)
        top = zero_shot_tags(model, index, tags, proc, DEFAULT_TEMPLATES, args.k)
        items = index.items("images")
        out["tags"] = {it.get("path") or it.get("key"): t for it, t in zip(items, top)}
        if not args.json:
            print(f"top {args.k} of {len(tags)} tags per image (cosine similarity of the image and the tag's "
                  "prompts; higher is closer, compare within an image):")
            for it, t in zip(items, top):
                print(f"{_shown(it.get('path') or it.get('key'))}: "
                      + (", ".join(f"{_shown(g)} (cos {s:.2f})" for g, s in t) or "(skipped: damaged index row)"))
        if args.labels:
            lab = dict(l.split("\t", 1) for l in read_lines(args.labels, 64 << 20) if "\t" in l)
            pairs = [(t[0][0], lab.get(it.get("path"), lab.get(it.get("key")))) for it, t in zip(items, top) if t]
            pairs = [(a, b.strip()) for a, b in pairs if b is not None]
            acc = zero_shot_accuracy([a for a, _ in pairs], [b for _, b in pairs])
            out["zero_shot_accuracy"] = acc
            print(f"zero-shot top-1 accuracy: {acc:.1f}% over {len(pairs)} labelled images")
    if args.json:
        print(json.dumps(out, ensure_ascii=False, indent=2))
    return 0


def _shown(x) -> str:
    return strip_controls(str(x if x is not None else "")).replace("\n", " ").replace("\t", " ")


if __name__ == "__main__":
    sys.exit(main())
