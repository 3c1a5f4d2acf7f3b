"""Retrieval evaluation: recall@1/5/10 both ways, mean and median rank.

    python launch/evaluate.py --model runs/exp1 --shards 'shards/val-{000000..000004}.tar'
    torchrun --nproc_per_node 2 launch/evaluate.py ...    (each rank embeds its shards)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence


from phoclip.data import check_manifests, expand_urls
from phoclip.errors import EXPECTED_ERRORS
from phoclip.fileio import atomic_write_json
from phoclip.log import init_logger
from phoclip.retrieval import chance_recall, evaluate_shards
from phoclip.text import load_tokenizer, tokenizer_fingerprint
from train.distributed import cleanup, init_distributed
from train.export import load_for_inference


def format_table(res: dict) -> str:
    n = int(res["n_images"])
    rows = [f"{'':14}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'mean r':>9}{'med r':>7}"]
    for d, name in (("t2i", "text→image"), ("i2t", "image→text")):
        rows.append(f"{name:14}" + "".join(f"{res[f'{d}_R@{k}']:8.1f}" for k in (1, 5, 10))
                    + f"{res[f'{d}_mean_rank']:9.1f}{res[f'{d}_median_rank']:7.0f}")
    rows.append(f"{'chance':14}" + "".join(f"{chance_recall(n, k):8.1f}" for k in (1, 5, 10))
                + f"   ({n} images, {int(res['n_captions'])} captions)")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    init_logger()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder, run folder or checkpoint")
    p.add_argument("--shards", required=True, help="brace pattern of evaluation shards")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, help="default: the model's")
    p.add_argument("--out", help="results JSON (default: beside the model)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    info = init_distributed(args.device)
    try:
        model, tok_name = load_for_inference(args.model, str(info.device))
        urls = expand_urls(args.shards)[0]
        tok = load_tokenizer(tok_name)
        manifest = check_manifests(urls, tokenizer_fingerprint(tok), model.pad_id,
                                   model.text.config.max_position_embeddings - 2, tok_name)
        size = args.image_size or model.config["vision"].get("image_size", 224)
        res = evaluate_shards(model, urls, size, info.device, info.rank, info.world_size,
                              args.batch_size, progress=info.is_main,
                              ids_width=manifest["tokenizer"]["max_length"], vocab_size=len(tok))
        if info.is_main:
            out = Path(args.out) if args.out else Path(args.model) / "eval.json"
            atomic_write_json(out, res, indent=2)
            print(format_table(res))
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
