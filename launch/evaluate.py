"""Retrieval evaluation: recall@1/5/10 both ways, mean and median rank.

    python launch/evaluate.py --model runs/exp1 --shards 'shards/val-{000000..000004}.tar'
    python launch/evaluate.py --model runs/exp1 --benchmark ktvic:KTVIC/test_data.json:KTVIC/public-test-images
    torchrun --nproc_per_node 2 launch/evaluate.py ...    (each rank embeds its part)

--benchmark evaluates straight from a published test split's annotation file (any
make_shards reader format: ktvic, openviic, uitviic, flickr8k-vi, coco-jsonl, jsonl, csv),
no shards needed: every test image and every caption, prepared with the model's own
segmenter and tokenizer, scored with the standard protocol, and printed beside the
published results for that dataset listed in launch/benchmarks.yaml (--references).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional, Sequence


from phoclip.shards import check_manifests, expand_urls
from phoclip.errors import EXPECTED_ERRORS
from phoclip.fileio import atomic_write_json
from phoclip.log import init_logger
from phoclip.retrieval import chance_recall, evaluate_shards
from phoclip.text import load_tokenizer, tokenizer_fingerprint
from phoclip_train.distributed import cleanup, init_distributed, launcher_rank
from phoclip_train.export import load_for_inference


def format_table(res: dict) -> str:
    n = int(res["n_images"])
    rows = [f"{'':14}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'mean r':>9}{'med r':>7}"]
    for d, name in (("t2i", "text→image"), ("i2t", "image→text")):
        rows.append(f"{name:14}" + "".join(f"{res[f'{d}_R@{k}']:8.1f}" for k in (1, 5, 10))
                    + f"{res[f'{d}_mean_rank']:9.1f}{res[f'{d}_median_rank']:7.0f}")
    rows.append(f"{'chance':14}" + "".join(f"{chance_recall(n, k):8.1f}" for k in (1, 5, 10))
                + f"   ({n} images, {int(res['n_captions'])} captions)")
    return "\n".join(rows)


def evaluate_benchmark(args, model, tok_name: str, size: int, info) -> dict:
    """Recall on a published split straight from its annotation file (see the module doc)."""
    from phoclip.retrieval import embed_samples, gather_counts, gather_embeddings, retrieval_metrics
    from phoclip_sharding.readers import SourceSpec

    skipped: Counter = Counter()
    samples = benchmark_samples(args.benchmark, model, tok_name, size, info.rank, info.world_size, skipped,
                                args.vncorenlp_dir)
    parts = embed_samples(model, samples, info.device, args.batch_size, progress=info.is_main)
    img, txt, t2i, _, _ = gather_embeddings(*parts, info.world_size)
    skipped = gather_counts(skipped, info.world_size)
    if img.shape[0] == 0:
        raise ValueError(f"--benchmark {args.benchmark}: no image could be read (skipped: {dict(skipped)})")
    res = retrieval_metrics(img, txt, t2i)
    dataset = SourceSpec.parse(args.benchmark).source_name
    res.update(skipped=dict(sorted(skipped.items())), benchmark=args.benchmark, dataset=dataset,
               references=reference_rows(Path(args.references), dataset))
    return res


def benchmark_samples(spec_text: str, model, tok_name: str, size: int, rank: int, world: int,
                      skipped: Counter, vncorenlp_dir: Optional[str] = None) -> Iterator[dict]:
    """Samples (image + all its captions as ids) of a published split, read with the
    sharding readers and prepared as the model's training captions were."""
    import torch

    from phoclip.transforms import image_to_tensor
    from phoclip.images import BadImage, read_image_file
    from phoclip.search import query_processor
    from phoclip.text import normalize_text
    from phoclip_sharding.readers import SourceSpec, read_source

    spec = SourceSpec.parse(spec_text)
    records = list(read_source(spec))
    if rank == 0:
        skipped.update(spec.skipped)
    proc = query_processor(model, tok_name, None, vncorenlp_dir)
    for r in records[rank::world]:
        caps = [c for c in r.captions if normalize_text(c)]
        if not caps:
            skipped["no_caption"] += 1
            continue
        try:
            img = read_image_file(r.path)
        except BadImage as e:
            skipped[f"image_{e.reason}"] += 1
            continue
        _, ids = proc(caps)
        yield {"key": r.image_id, "image": image_to_tensor(img, size, train=False),
               "ids": torch.from_numpy(ids.astype("int64")), "meta": {"path": [r.rel]}}


def reference_rows(references: Path, dataset: str) -> list[dict]:
    """Published results for `dataset` from a references YAML (a list of {dataset, split,
    metric, value, source}); a missing or malformed file is refused by name."""
    import yaml

    if not references.is_file():
        return []
    try:
        rows = yaml.safe_load(references.read_text(encoding="utf-8")) or []
    except yaml.YAMLError as e:
        raise ValueError(f"{references}: not valid YAML ({e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"dataset", "metric", "value", "source"}
                                             <= set(r) for r in rows):
        raise ValueError(f"{references}: expected a list of {{dataset, split, metric, value, source}}")
    return [r for r in rows if str(r["dataset"]).lower() == dataset.lower()]


def format_references(res: dict, rows: list[dict]) -> str:
    if not rows:
        return "no published results listed for this dataset (launch/benchmarks.yaml)"
    out = [f"{'metric':14}{'ours':>8}{'published':>11}  split / source"]
    for r in rows:
        ours = res.get(str(r["metric"]))
        out.append(f"{r['metric']:14}{'' if ours is None else f'{ours:8.1f}':>8}{float(r['value']):11.1f}  "
                   f"{r.get('split', '')} / {r['source']}")
    return "\n".join(out)


def source_slug(args: argparse.Namespace) -> str:
    """A file-name-safe name of what is evaluated: the benchmark's dataset, or the shards'
    folder and split (`vi-val`), or the pattern's first file."""
    import re

    if args.benchmark:
        fmt, _, rest = args.benchmark.partition(":")
        name = re.search(r",name=([^,:]+)", rest)
        raw = f"{fmt}-{name.group(1)}" if name else f"{fmt}-{Path(rest.split(':')[0]).stem}"
    else:
        src = args.shards.split("::")[0].rstrip("/")
        if src.endswith("manifest.json"):
            src = src[: -len("manifest.json")].rstrip("/")
        stem = Path(src.split("{")[0].rstrip("-_/") or src).name or "shards"
        raw = f"{stem}-{args.split}" if "{" not in src and not src.endswith(".tar") else stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("._") or "shards"


def main(argv: Optional[Sequence[str]] = None) -> int:
    init_logger(rank=launcher_rank())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder, run folder or checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="evaluation shards: a shard folder (or its manifest.json; with --split), "
                                      "or a brace pattern of paths, pipe:CMD, http(s):// or fsspec URLs")
    p.add_argument("--split", default="val", choices=("train", "val"),
                   help="with a shard folder: which of its splits (default: val)")
    p.add_argument("--manifest", help="manifest.json of the shards when not beside them (pipe: shards)")
    src.add_argument("--benchmark", help="FORMAT:ANNOTATIONS:IMAGES of a published test split "
                                         "(the make_shards reader formats; ',name=N' names the dataset)")
    p.add_argument("--references", default=str(Path(__file__).parent / "benchmarks.yaml"),
                   help="published results to print beside ours (default: launch/benchmarks.yaml)")
    p.add_argument("--vncorenlp-dir", help="VnCoreNLP model folder (default: $VNCORENLP_DIR)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, help="default: the model's")
    p.add_argument("--out", help="results JSON (default: MODEL/eval-SOURCE.json, named after the shards "
                                 "or the benchmark)")
    p.add_argument("--force", action="store_true", help="overwrite an existing results file")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.model) / f"eval-{source_slug(args)}.json"
    if out.exists() and not args.force:
        print(f"evaluate: {out} exists (results of an earlier evaluation); pass --force to overwrite it, "
              "or --out elsewhere", file=sys.stderr)
        return 2
    info = init_distributed(args.device)
    try:
        model, tok_name = load_for_inference(args.model, str(info.device))
        size = args.image_size or model.config["vision"].get("image_size", 224)
        if args.benchmark:
            res = evaluate_benchmark(args, model, tok_name, size, info)
        else:
            urls = expand_urls(args.shards, split=args.split)[0]
            tok = load_tokenizer(tok_name)
            manifest = check_manifests(urls, tokenizer_fingerprint(tok), model.pad_id,
                                       model.text.config.max_position_embeddings - 2, tok_name, args.manifest)
            res = evaluate_shards(model, urls, size, info.device, info.rank, info.world_size,
                                  args.batch_size, progress=info.is_main,
                                  ids_width=manifest["tokenizer"]["max_length"], vocab_size=len(tok),
                                  manifest=args.manifest)
        if info.is_main:
            atomic_write_json(out, res, indent=2)
            print(format_table(res))
            if args.benchmark:
                print(format_references(res, res["references"]))
            if res["skipped"]:
                print("skipped samples: " + ", ".join(f"{k} {v}" for k, v in res["skipped"].items()))
            print(f"results: {out}")
        return 0
    except EXPECTED_ERRORS as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
