"""The smaller points a new user's first hour ran into: each says what it does."""
import json
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, launch_main, root_logging_kept


def test_print_config_of_a_saved_run_config_says_so(tiny_run, capsys):
    from phoclip_cli.train import main

    with root_logging_kept():
        assert main(["--config", str(tiny_run / "config.yaml"), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert f"saved run config {tiny_run / 'config.yaml'}, as that run resolved it" in out
    assert "YAML file" not in out
    with root_logging_kept():  # an ordinary config file still names itself
        assert main(["--config", "launch/configs/tiny-debug.yaml", "--print-config"]) == 0
    assert "(YAML file launch/configs/tiny-debug.yaml" in capsys.readouterr().out


def test_a_part_job_ends_saying_when_to_merge(make_shards, coco_dataset, tiny_tokenizer_dir, tmp_path, capsys):
    ann, imgs, _ = coco_dataset
    out = tmp_path / "shards"
    assert make_shards(["--source", f"coco-jsonl:{ann}:{imgs}", "--out", out, "--tokenizer", tiny_tokenizer_dir,
                        "--segmenter", "none", "--workers", "1", "--num-parts", "3", "--part", "1"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"part 1 of 3 done; run phoclip-shards --merge {out} when all 3 parts are done", last


def test_the_smoke_test_config_saves_once():
    cfg = yaml.safe_load((ROOT / "launch" / "configs" / "tiny-debug.yaml").read_text())
    assert cfg["train"]["save_every"] >= cfg["train"]["max_steps"]


@pytest.mark.parametrize("argv,says", [
    (["phoclip_cli.build_index", "--model", "m", "--images", "/no/such/photos", "--out", "idx"],
     "build_index: --images /no/such/photos: not a folder"),
    (["phoclip_cli.search", "--index", "/no/such/index", "con chó"], "search: --index /no/such/index: not a folder"),
])
def test_argument_errors_come_before_the_heavy_imports(argv, says):
    code = (f"import sys; from {argv[0]} import main; rc = main({argv[1:]!r}); "
            "assert 'torch' not in sys.modules, 'torch imported before the refusal'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(says), r.stderr[-2000:]


def test_the_model_card_names_the_installed_commands():
    from phoclip.models.card import model_card

    card = model_card({"embed_dim": 8, "vision": {}, "text": {}})
    assert "phoclip-serve --index INDEX" in card and "phoclip-export THIS_FOLDER" in card
    assert "launch/serve.py" not in card and "launch/export_model.py" not in card


def test_tests_refuse_another_checkout_of_the_package(tmp_path, monkeypatch):
    """conftest's session check: a package under test found outside this checkout stops
    the session with one line saying so."""
    import importlib.machinery
    import importlib.util

    import conftest

    fake = tmp_path / "other-checkout" / "phoclip" / "__init__.py"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: importlib.machinery.ModuleSpec(
        name, None, origin=str(fake)) if name == "phoclip" else real(name, *a))
    with pytest.raises(pytest.UsageError) as e:
        conftest.pytest_sessionstart(None)
    assert str(e.value) == (f"phoclip is imported from {fake.parent}, not from this checkout ({ROOT}): install "
                            "this checkout (pip install -e .) or put it first on PYTHONPATH")
    monkeypatch.setattr(importlib.util, "find_spec", real)
    conftest.pytest_sessionstart(None)  # this checkout's own: nothing to say


@pytest.mark.slow
def test_search_with_the_onnx_backend_says_it_used_onnxruntime(tiny_run, shapes_shards, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    model = tmp_path / "onnx_model"
    assert launch_main("export_model", [tiny_run, model, "--format", "onnx"]) == 0
    assert launch_main("build_index", ["--model", model, "--shards", shapes_shards[0] / "val-000000.tar",
                                       "--out", tmp_path / "idx"]) == 0
    capsys.readouterr()
    assert launch_main("search", ["--index", tmp_path / "idx", "hình tròn", "--k", "3", "--json",
                                  "--backend", "onnx"]) == 0
    out = capsys.readouterr()
    assert "queries embedded by onnxruntime (" in out.err and "CPUExecutionProvider" in out.err, out.err[-2000:]
    assert json.loads(out.out)["text_to_image"]
