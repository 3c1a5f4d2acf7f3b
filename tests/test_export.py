"""Shipping the model: the model card in every exported folder, from_pretrained, and both
towers as ONNX, checked against PyTorch and used by search through onnxruntime."""
import json

import pytest
import torch

from conftest import launch_main, train_main, train_overrides


def test_export_command_answers_help_at_once_and_documents_every_flag():
    """`python launch/export_model.py --help` parses before any heavy import; the
    command's parser (phoclip_cli.export.build_parser, behind phoclip-export) has help
    text for every argument."""
    import subprocess
    import sys
    import time

    from conftest import ROOT
    from phoclip_cli.export import build_parser

    t = time.monotonic()
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "export_model.py"), "--help"], capture_output=True,
                       text=True, timeout=60)
    took = time.monotonic() - t
    assert r.returncode == 0 and "--format" in r.stdout, r.stderr
    assert took < 5, f"--help took {took:.1f} s"
    undocumented = [a.dest for a in build_parser()._actions if not a.help]
    assert not undocumented, undocumented


slow = pytest.mark.slow


@pytest.fixture()
def trained(tiny_run):
    """The shared 4-step run (conftest.tiny_run): read only."""
    return tiny_run


@pytest.fixture()
def cli(capsys):
    """launch/<script>.py main(argv) in this process; must succeed; returns its stdout."""
    def run(script, *args):
        rc = launch_main(script, args)
        out = capsys.readouterr()
        assert rc == 0, out.out[-2000:] + out.err[-3000:]
        return out.out
    return run


@slow
def test_a_run_folder_without_an_export_exports_its_newest_verified_checkpoint(trained, tmp_path, cli):
    import shutil

    import phoclip
    from phoclip.models.pretrained import model_fingerprint

    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("model", "tensorboard"))
    (run / "checkpoints" / "step_00000004" / "state.pt").write_bytes(b"torn")  # passed over
    out = cli("export_model", run, tmp_path / "out")
    assert f"model written to {tmp_path / 'out'}" in out
    want = phoclip.load(trained / "checkpoints" / "step_00000002")
    assert model_fingerprint(phoclip.load(tmp_path / "out").module) == model_fingerprint(want.module)
    rc = launch_main("export_model", [tmp_path / "nothing", tmp_path / "out2"])
    assert rc == 2 and not (tmp_path / "out2").exists()


@slow
def test_every_export_path_writes_a_model_card_and_from_pretrained_loads_it(trained, tmp_path, cli):
    import phoclip
    from phoclip.models.pretrained import model_fingerprint

    cli("export_model", trained / "checkpoints" / "step_00000004", tmp_path / "exported")
    for folder in (trained / "model", tmp_path / "exported"):
        card = (folder / "README.md").read_text()
        for needle in ("# PhoCLIP model: tiny-debug", "## Architecture", "test_resnet", "word segmentation with "
                       "underthesea", "max 24 tokens", "## Training", "| steps | 4 |", "## Data",
                       "| images (train / val) | 171 / 29 |", "## Evaluation", "t2i_R@1", "phoclip.load(",
                       "weights fingerprint"):
            assert needle in card, (folder, needle)
        m = phoclip.PhoCLIP.from_pretrained(folder)
        assert model_fingerprint(m) in card
    a = phoclip.load_model(trained / "model").eval()
    b = phoclip.PhoCLIP.from_pretrained(tmp_path / "exported").eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a.encode_image(x), b.encode_image(x))


@slow
def test_onnx_towers_match_pytorch_and_search_runs_on_onnxruntime(trained, shapes_shards, tmp_path, cli):
    import phoclip
    from phoclip.models.pretrained import model_fingerprint
    from phoclip.models.onnx import OnnxModel

    out = tmp_path / "onnx_model"
    assert "checked against PyTorch" in cli("export_model", trained, out, "--format", "onnx")
    assert (out / "onnx" / "image.onnx").is_file() and (out / "onnx" / "text.onnx").is_file()
    torch_model, onnx_model = phoclip.load_model(out).eval(), OnnxModel(out)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 3, 32, 32, generator=g)  # another batch size than the export's
    ids = torch.randint(4, 40, (7, 23), generator=g)  # another batch and length
    ids[:, 0] = 0
    ids[2, 5:] = 1
    ids[6, 12:] = 1
    with torch.no_grad():
        assert (onnx_model.encode_image(x) - torch_model.encode_image(x)).abs().max() <= 1e-3
        assert (onnx_model.encode_text(ids) - torch_model.encode_text(ids)).abs().max() <= 1e-3
    meta = json.loads((out / "onnx" / "meta.json").read_text())
    assert meta["fingerprint"] == model_fingerprint(torch_model) and max(meta["max_abs_diff"].values()) <= 1e-3
    # search: the same results from the ONNX encoders as from PyTorch
    shards = shapes_shards[0]
    cli("build_index", "--model", out, "--shards", shards / "val-000000.tar", "--out", tmp_path / "idx")
    q = "hai hình tròn màu đỏ"
    res = {}
    for backend in ("exact", "onnx"):
        out = cli("search", "--index", tmp_path / "idx", q, "--k", "5", "--json", "--backend", backend)
        res[backend] = json.loads(out)["text_to_image"][q]
    assert [m["id"] for m in res["onnx"]] == [m["id"] for m in res["exact"]]
    for a, b in zip(res["onnx"], res["exact"]):
        assert a["score"] == pytest.approx(b["score"], abs=1e-3)


@slow
def test_benchmark_evaluation_from_a_published_annotation_file(trained, shapes_shards, tmp_path, cli):
    """evaluate.py --benchmark reads a test split in its published format (here the same
    200 images as Flickr8k-vi captions and as KTVIC JSON), prepares captions with the
    model's segmenter and tokenizer, and scores every image and every caption; published
    numbers from the references file are printed beside ours."""
    data = shapes_shards[0].parent / "data"
    lines = (data / "captions_vi.txt").read_text(encoding="utf-8").splitlines()
    files = sorted({l.split("\t")[0].split("#")[0] for l in lines})
    kt = {"images": [{"id": i, "filename": f} for i, f in enumerate(files)],
          "annotations": [{"image_id": files.index(l.split("\t")[0].split("#")[0]), "caption": l.split("\t", 1)[1]}
                          for l in lines]}
    (tmp_path / "test_data.json").write_text(json.dumps(kt, ensure_ascii=False), encoding="utf-8")
    refs = tmp_path / "refs.yaml"
    refs.write_text("- {dataset: ktvic, split: test, metric: t2i_R@1, value: 12.5, source: 'Example et al. 2099'}\n"
                    "- {dataset: other, split: test, metric: t2i_R@1, value: 99.0, source: 'not this one'}\n")
    res = {}
    for name, spec in (("flickr", f"flickr8k-vi:{data / 'captions_vi.txt'}:{data / 'images'}"),
                       ("ktvic", f"ktvic:{tmp_path / 'test_data.json'}:{data / 'images'}")):
        out = cli("evaluate", "--model", trained, "--benchmark", spec, "--references", refs,
                  "--out", tmp_path / f"{name}.json")
        res[name] = json.loads((tmp_path / f"{name}.json").read_text())
        assert "text→image" in out
        if name == "ktvic":
            assert "Example et al. 2099" in out and "12.5" in out and "not this one" not in out
        else:
            assert "no published results listed" in out
    a, b = res["flickr"], res["ktvic"]
    assert a["n_images"] == b["n_images"] == 200 and a["n_captions"] == b["n_captions"] == len(lines)
    for k in ("t2i_R@1", "t2i_R@5", "i2t_R@1", "i2t_R@10", "t2i_mean_rank"):
        assert a[k] == pytest.approx(b[k]), k  # one protocol, whatever the format


@slow
def test_named_eval_sets_are_evaluated_and_logged_separately(shapes_shards, tmp_path):
    from conftest import read_metrics

    shards, tok, n = shapes_shards
    run = tmp_path / "run"
    rc, log = train_main(["--config", "launch/configs/tiny-debug.yaml", *train_overrides(
        shards, tok, n, run, **{"train.max_steps": 2, "train.save_every": 2,
                                "train.eval_sets": "{again: '" + str(shards / "val-000000.tar") + "', "
                                                   "trainpart: '" + str(shards / "train-000000.tar") + "'}"})])
    assert rc == 0, log[-4000:]
    val, again, part = (read_metrics(run, k)[2] for k in ("val", "val_again", "val_trainpart"))
    assert again["t2i_R@1"] == val["t2i_R@1"] and again["n_images"] == val["n_images"]  # the same shards
    assert part["n_images"] == 30 and part["n_images"] != val["n_images"]
    events = b"".join(f.read_bytes() for f in (run / "tensorboard").rglob("events*"))
    assert b"val_again/t2i_R@1" in events and b"val_trainpart/t2i_R@1" in events
