"""Evaluation beyond the training loop: a published test split read from its annotation
file, the results table, the published results to compare with, and the name of a
results file. The command (phoclip_cli.evaluate) parses and calls these; reading the
annotation files is the sharding readers' job, so records come in already read."""
from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch
import yaml

from phoclip.data.images import BadImage, read_image_file
from phoclip.data.text import normalize_text
from phoclip.data.transforms import image_to_tensor
from phoclip.evaluation.retrieval import chance_recall
from phoclip.fileio import read_regular
from phoclip.models.embed import query_processor

MAX_REFERENCES_BYTES = 1 << 20  # a references file is a few hundred lines
MAX_REFERENCES_DEPTH = 8  # a list of flat mappings needs 2 levels


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


class _ReferencesLoader(yaml.SafeLoader):
    """Safe YAML with nesting capped while it is parsed (PyYAML composes recursively:
    20,000 levels ended in a RecursionError) and no aliases (nothing to share here)."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.MarkedYAMLError(problem="an alias is not accepted: write the entry out",
                                       problem_mark=self.peek_event().start_mark)
        if self._depth >= MAX_REFERENCES_DEPTH:
            raise yaml.MarkedYAMLError(problem=f"nested deeper than {MAX_REFERENCES_DEPTH} levels",
                                       problem_mark=self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


REFERENCE_FIELDS = "{dataset, split, metric, value, source}"


def read_references(references: Path) -> list[dict]:
    """Published results from a references YAML: a list of {dataset, split, metric,
    value, source}, every entry checked (text fields, a finite number). A missing file
    gives none; anything else that is not such a list is a one-line ValueError naming
    the file (read capped, a regular file only: a FIFO would block). Read before an
    evaluation starts, so a bad file costs nothing."""
    if not references.exists():
        return []
    try:
        text = read_regular(references, MAX_REFERENCES_BYTES).decode("utf-8")
        rows = yaml.load(text, Loader=_ReferencesLoader) or []
    except UnicodeDecodeError:
        raise ValueError(f"{references}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ValueError(f"{references}: not a valid references YAML: {problem}{at}") from None
    if not isinstance(rows, list):
        raise ValueError(f"{references}: expected a list of {REFERENCE_FIELDS}")
    for i, r in enumerate(rows):
        if not (isinstance(r, dict) and {"dataset", "metric", "value", "source"} <= set(r)):
            raise ValueError(f"{references}: entry {i + 1}: expected a mapping with {REFERENCE_FIELDS}")
        text_fields = [k for k in ("dataset", "metric", "source", "split")
                       if k in r and not isinstance(r[k], (str, int, float))]
        if text_fields:
            raise ValueError(f"{references}: entry {i + 1}: {text_fields[0]} must be text")
        v = r["value"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{references}: entry {i + 1}: value must be a finite number, not {str(v)[:40]!r}")
    return rows


def reference_rows(rows: list[dict], dataset: str) -> list[dict]:
    """The entries of `read_references` for `dataset`."""
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
