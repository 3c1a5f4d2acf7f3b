"""Retrieval evaluation: recall@1/5/10 both ways, mean and median rank.

    python launch/evaluate.py --model runs/exp1 --shards shards/ --split val
    phoclip-eval --model runs/exp1 --shards 'shards/val-{000000..000004}.tar'
    phoclip-eval --model runs/exp1 --benchmark ktvic:KTVIC/test_data.json:KTVIC/public-test-images
    torchrun --nproc_per_node 2 launch/evaluate.py ...    (each rank embeds its part)

--benchmark evaluates straight from a published test split's annotation file (any
make_shards reader format: ktvic, openviic, uitviic, flickr8k-vi, coco-jsonl, jsonl, csv),
no shards needed: every test image and every caption, prepared with the model's own
segmenter and tokenizer, scored with the standard protocol, and printed beside the
published results for that dataset listed in launch/benchmarks.yaml (--references).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

from phoclip.data.catalog import check_shards_fit, expand_urls
from phoclip.data.datasets import parse_source, read_source
from phoclip.data.sources import SourceSpec
from phoclip.data.text import load_tokenizer
from phoclip.errors import EXPECTED_ERRORS
from phoclip.evaluation import EVAL_BATCH_SIZE
from phoclip.fileio import atomic_write_json
from phoclip.log import init_logger
from phoclip.models.loading import load_encoder
from phoclip_cli.common import HelpFormatter, refuse

# the benchmark results shipped beside the launch scripts
DEFAULT_REFERENCES = Path(__file__).resolve().parents[1] / "benchmarks.yaml"


def build_parser() -> argparse.ArgumentParser:
    """The evaluation command's arguments."""
    p = argparse.ArgumentParser(prog="phoclip-eval", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="model folder, run folder or checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="evaluation shards: a shard folder (or its manifest.json; with --split), "
                                      "or a brace pattern of paths, pipe:CMD, http(s):// or fsspec URLs")
    p.add_argument("--split", default="val", choices=("train", "val"),
                   help="with a shard folder: which of its splits")
    p.add_argument("--manifest", help="manifest.json of the shards when not beside them (pipe: shards)")
    src.add_argument("--benchmark", help="FORMAT:ANNOTATIONS:IMAGES of a published test split "
                                         "(the make_shards reader formats; ',name=N' names the dataset)")
    p.add_argument("--references", default=str(DEFAULT_REFERENCES),
                   help="published results to print beside ours")
    p.add_argument("--vncorenlp-dir", help="VnCoreNLP model folder (default: $VNCORENLP_DIR)")
    p.add_argument("--batch-size", type=int, default=EVAL_BATCH_SIZE,
                   help="images per forward; a run's validation uses the same, so both give the same numbers "
                        "to the last digit (another size can reorder near-ties, docs/evaluation.md)")
    p.add_argument("--image-size", type=int, help="evaluation crop size (default: the model's)")
    p.add_argument("--out", help="results JSON (default: MODEL/eval-SOURCE.json, named after the shards "
                                 "or the benchmark)")
    p.add_argument("--force", action="store_true", help="overwrite an existing results file")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    return p


def evaluate_benchmark(args: argparse.Namespace, model, tok_name: str, size: int, info, spec: SourceSpec,
                       records: list, references: list[dict]) -> dict:
    """Recall on a published split straight from its annotation file (see the module doc);
    `spec`, its `records` and the `references` read before the model was loaded."""
    from phoclip.evaluation.benchmarks import benchmark_samples, reference_rows  # lazy: imports torch (~2 s)
    from phoclip.evaluation.retrieval import (embed_samples, gather_counts, gather_embeddings,  # lazy: imports torch
                                              retrieval_metrics)

    skipped: Counter = Counter()
    if info.rank == 0:
        skipped.update(spec.skipped)
    samples = benchmark_samples(records, model, tok_name, size, info.rank, info.world_size, skipped,
                                args.vncorenlp_dir)
    parts = embed_samples(model, samples, info.device, args.batch_size, progress=info.is_main,
                          total=len(records[info.rank::info.world_size]))
    img, txt, t2i, _, _ = gather_embeddings(*parts, info.world_size)
    skipped = gather_counts(skipped, info.world_size)
    if img.shape[0] == 0:
        raise ValueError(f"--benchmark {args.benchmark}: no image could be read (skipped: {dict(skipped)})")
    res = retrieval_metrics(img, txt, t2i)
    res.update(skipped=dict(sorted(skipped.items())), benchmark=args.benchmark, dataset=spec.source_name,
               references=reference_rows(references, spec.source_name))
    return res


def check_out_folder(out: Path) -> None:
    """The results file's folder exists and takes files (it is written last, after the
    whole evaluation): else an OSError naming it."""
    folder = out.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: no such folder for the results file {out.name} (--out)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{folder}: the results file {out.name} cannot be written there (--out)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Evaluate, print the table and write the results JSON; 2 with one line when refused."""
    args = build_parser().parse_args(argv)
    # torch takes about 2 s to import: --help (answered above) must not wait for it
    from phoclip.evaluation.benchmarks import (format_references, format_table, read_references,  # lazy: imports torch
                                               source_slug)
    from phoclip.evaluation.retrieval import eval_memory_format, evaluate_shards  # lazy: imports torch
    from phoclip_cli.distributed import cleanup, init_distributed, launcher_rank  # lazy: imports torch

    init_logger(rank=launcher_rank())
    out = Path(args.out) if args.out else Path(args.model) / f"eval-{source_slug(args.benchmark, args.shards, args.split)}.json"
    if out.exists() and not args.force:
        return refuse("evaluate", FileExistsError(f"{out} exists (results of an earlier evaluation); pass --force "
                                                  "to overwrite it, or --out elsewhere"))
    try:  # every input read and checked before the model loads: a bad one costs nothing
        if args.out or Path(args.model).is_dir():  # else the model's own refusal says more
            check_out_folder(out)
        references = read_references(Path(args.references)) if args.benchmark else []
        spec = parse_source(args.benchmark) if args.benchmark else None
        records = list(read_source(spec)) if spec else []
        urls = [] if spec else expand_urls(args.shards, split=args.split, flag="--shards")[0]
    except EXPECTED_ERRORS as e:
        return refuse("evaluate", e)
    info = init_distributed(args.device)
    try:
        model, tok_name = load_encoder(args.model, device=info.device)
        eval_memory_format(model, info.device)
        size = args.image_size or model.config["vision"].get("image_size", 224)
        if spec is not None:
            res = evaluate_benchmark(args, model, tok_name, size, info, spec, records, references)
        else:
            tok = load_tokenizer(tok_name)
            manifest = check_shards_fit(urls, tok, model, tok_name, args.manifest)
            res = evaluate_shards(model, urls, size, info.device, info.rank, info.world_size,
                                  args.batch_size, progress=info.is_main,
                                  ids_width=manifest.tokenizer.max_length, vocab_size=len(tok),
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
        return refuse("evaluate", e)
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
