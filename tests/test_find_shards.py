"""Finding things without hand work: a shard folder (or its manifest.json) and a split
name instead of a brace pattern; evaluation results never overwrite each other silently."""
import json
import runpy
import sys

import pytest

from conftest import ROOT
from phoclip.data.catalog import expand_urls


def test_a_shard_folder_or_its_manifest_gives_the_split_it_lists(shapes_shards):
    shards, _, n = shapes_shards
    man = json.loads((shards / "manifest.json").read_text())
    pattern = expand_urls(f"{shards}/train-{{000000..{n - 1:06d}}}.tar")[0]
    for spec in (str(shards), f"{shards}/", str(shards / "manifest.json"), f"file://{shards}"):
        assert expand_urls(spec)[0] == [str(shards / x) for x in man["shards"]["train"]]
        assert sorted(expand_urls(spec, split="val")[0]) == sorted(str(shards / x) for x in man["shards"]["val"])
    assert sorted(expand_urls(str(shards))[0]) == sorted(pattern)
    # weights across a folder and a pattern
    urls, w = expand_urls(f"{shards}::{shards}/val-000000.tar", "1::3", split="train")
    assert urls[-1].endswith("val-000000.tar") and w == [1.0] * n + [3.0]


def test_a_folder_that_is_not_a_shard_folder_says_what_to_give(tmp_path, shapes_shards):
    with pytest.raises(FileNotFoundError, match="no manifest.json there; give a shard folder"):
        expand_urls(str(tmp_path))
    shards = shapes_shards[0]
    d = tmp_path / "bad"
    d.mkdir()
    m = json.loads((shards / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps(dict(m, shards={"train": ["../../etc/passwd"], "val": []})))
    with pytest.raises(ValueError, match="not a list of shard file names"):
        expand_urls(str(d))
    (d / "manifest.json").write_text(json.dumps(dict(m, shards={"train": ["train-000000.tar"], "val": []})))
    with pytest.raises(ValueError, match="no val shards \\(it has: train\\)"):
        expand_urls(str(d), split="val")


def _evaluate(argv, capsys):
    sys.argv = ["evaluate.py", *map(str, argv)]
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "launch/evaluate.py"), run_name="__main__")
    return e.value.code, capsys.readouterr()


def test_evaluation_results_are_named_after_their_source_and_never_overwritten(tmp_path, shapes_shards, capsys):
    shards = shapes_shards[0]
    from phoclip.evaluation.benchmarks import source_slug

    def slug(benchmark=None, shards=None, split="val"):
        return source_slug(benchmark, shards, split)

    assert slug(shards="shards/vi") == "vi-val"
    assert slug(shards="shards/vi/manifest.json", split="train") == "vi-train"
    assert slug(shards="shards/vi/val-{000000..000004}.tar") == "val"
    assert slug(shards="s3://b/x/val-000000.tar") == "val-000000.tar"
    assert slug(benchmark="ktvic:KTVIC/test_data.json:KTVIC/images") == "ktvic-test_data"
    assert slug(benchmark="uitviic:a.json:imgs,name=UIT ViIC") == "uitviic-UIT_ViIC"
    model = tmp_path / "model"
    model.mkdir()
    (model / "eval-shards-val.json").write_text("{}")
    code, out = _evaluate(["--model", model, "--shards", shards], capsys)
    assert code == 2 and "eval-shards-val.json exists" in out.err and "--force" in out.err
    assert (model / "eval-shards-val.json").read_text() == "{}"
    (tmp_path / "mine.json").write_text("{}")
    code, out = _evaluate(["--model", model, "--shards", shards, "--out", tmp_path / "mine.json"], capsys)
    assert code == 2 and "mine.json exists" in out.err


def test_make_shards_prints_the_exact_patterns_it_wrote(coco_dataset, tiny_tokenizer_dir, tmp_path, capsys):
    """make_shards prints the brace pattern of what it wrote (no writing it by hand), and
    each printed pattern expands to exactly the shards of its split."""
    from conftest import run_make_shards

    from phoclip_sharding.record import brace_pattern

    assert brace_pattern(["val-000000.tar"]) == "val-000000.tar"
    assert brace_pattern([f"train-{i:06d}.tar" for i in (2, 0, 1)]) == "train-{000000..000002}.tar"
    assert brace_pattern(["train-000000.tar", "train-000002.tar"]) == "{train-000000.tar,train-000002.tar}"
    ann, images, _ = coco_dataset
    out = tmp_path / "shards"
    assert run_make_shards(["--source", f"coco-jsonl:{ann}:{images}", "--out", str(out), "--tokenizer",
                            str(tiny_tokenizer_dir), "--segmenter", "none", "--shard-size", "4",
                            "--val-fraction", "0.3", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    man = json.loads((out / "manifest.json").read_text())
    for split in ("train", "val"):
        line = next(ln for ln in printed.splitlines() if ln.strip().startswith(split + " "))
        pattern = line.split()[1]
        assert sorted(expand_urls(pattern)[0]) == sorted(str(out / n) for n in man["shards"][split])
    assert f"pass the folder ({out})" in printed
