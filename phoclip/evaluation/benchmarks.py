"""Evaluation beyond the training loop: a published test split read from its annotation
file, the results table, the published results to compare with, and the name of a
results file. The command (phoclip_cli.evaluate) parses and calls these; reading the
annotation files is the sharding readers' job, so records come in already read."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Optional

from phoclip.evaluation.retrieval import chance_recall


def format_table(res: dict) -> str:
    """Recall@1/5/10, mean and median rank both ways, and chance, as a text table."""
    n = int(res["n_images"])
    rows = [f"{'':14}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'mean r':>9}{'med r':>7}"]
    for d, name in (("t2i", "text→image"), ("i2t", "image→text")):
        rows.append(f"{name:14}" + "".join(f"{res[f'{d}_R@{k}']:8.1f}" for k in (1, 5, 10))
                    + f"{res[f'{d}_mean_rank']:9.1f}{res[f'{d}_median_rank']:7.0f}")
    rows.append(f"{'chance':14}" + "".join(f"{chance_recall(n, k):8.1f}" for k in (1, 5, 10))
                + f"   ({n} images, {int(res['n_captions'])} captions)")
    return "\n".join(rows)


def benchmark_samples(records: Iterable, model, tok_name: str, size: int, rank: int, world: int,
                      skipped: Counter, vncorenlp_dir: Optional[str] = None) -> Iterator[dict]:
    """Samples (image + all its captions as ids) of a published split's records (with
    `captions`, `path`, `image_id`, `rel`, as the sharding readers yield them), this rank's
    share, prepared as the model's training captions were; unusable records are counted."""
    import torch

    from phoclip.data.images import BadImage, read_image_file
    from phoclip.search.query import query_processor
    from phoclip.data.text import normalize_text
    from phoclip.data.transforms import image_to_tensor

    proc = query_processor(model, tok_name, None, vncorenlp_dir)
    for r in list(records)[rank::world]:
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
    metric, value, source}); a missing file gives none, a malformed one is refused by name."""
    import yaml

    if not references.is_file():
        return []
    try:
        rows = yaml.safe_load(references.read_text(encoding="utf-8")) or []
    except yaml.YAMLError as e:
        raise ValueError(f"{references}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"dataset", "metric", "value", "source"}
                                             <= set(r) for r in rows):
        raise ValueError(f"{references}: expected a list of {{dataset, split, metric, value, source}}")
    return [r for r in rows if str(r["dataset"]).lower() == dataset.lower()]


def format_references(res: dict, rows: list[dict]) -> str:
    """Our figures beside the published ones, metric by metric."""
    if not rows:
        return "no published results listed for this dataset (launch/benchmarks.yaml)"
    out = [f"{'metric':14}{'ours':>8}{'published':>11}  split / source"]
    for r in rows:
        ours = res.get(str(r["metric"]))
        out.append(f"{r['metric']:14}{'' if ours is None else f'{ours:8.1f}':>8}{float(r['value']):11.1f}  "
                   f"{r.get('split', '')} / {r['source']}")
    return "\n".join(out)


def source_slug(benchmark: Optional[str], shards: Optional[str], split: str = "val") -> str:
    """A file-name-safe name of what is evaluated: the benchmark's dataset, or the shards'
    folder and split (`vi-val`), or the pattern's first file."""
    if benchmark:
        fmt, _, rest = benchmark.partition(":")
        name = re.search(r",name=([^,:]+)", rest)
        raw = f"{fmt}-{name.group(1)}" if name else f"{fmt}-{Path(rest.split(':')[0]).stem}"
    else:
        src = (shards or "").split("::")[0].rstrip("/")
        if src.endswith("manifest.json"):
            src = src[: -len("manifest.json")].rstrip("/")
        stem = Path(src.split("{")[0].rstrip("-_/") or src).name or "shards"
        raw = f"{stem}-{split}" if "{" not in src and not src.endswith(".tar") else stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("._") or "shards"
