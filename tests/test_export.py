"""Shipping the model: the model card in every exported folder, from_pretrained, and both
towers as ONNX, checked against PyTorch and used by search through onnxruntime."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_torchrun, train_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(shapes_shards, tmp_path_factory):
    shards, tok, n = shapes_shards
    run = tmp_path_factory.mktemp("exp") / "run"
    run_torchrun(1, "launch/train_ddp.py", ["--config", "launch/configs/tiny-debug.yaml", *train_overrides(
        shards, tok, n, run, **{"train.max_steps": 4, "train.save_every": 4})])
    return run


def _cli(*args):
    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def test_every_export_path_writes_a_model_card_and_from_pretrained_loads_it(trained, tmp_path):
    import phoclip
    from phoclip.model import model_fingerprint

    _cli("launch/export_model.py", trained / "checkpoints" / "step_00000004", tmp_path / "exported")
    for folder in (trained / "model", tmp_path / "exported"):
        card = (folder / "README.md").read_text()
        for needle in ("# PhoCLIP model: tiny-debug", "## Architecture", "test_resnet", "word segmentation with "
                       "underthesea", "max 24 tokens", "## Training", "| steps | 4 |", "## Data",
                       "| images (train / val) | 171 / 29 |", "## Evaluation", "t2i_R@1", "phoclip.load_model",
                       "weights fingerprint"):
            assert needle in card, (folder, needle)
        m = phoclip.PhoCLIP.from_pretrained(folder)
        assert model_fingerprint(m) in card
    a = phoclip.load_model(trained / "model").eval()
    b = phoclip.PhoCLIP.from_pretrained(tmp_path / "exported").eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a.encode_image(x), b.encode_image(x))


def test_onnx_towers_match_pytorch_and_search_runs_on_onnxruntime(trained, shapes_shards, tmp_path):
    import phoclip
    from phoclip.model import model_fingerprint
    from phoclip.onnx_backend import OnnxModel

    out = tmp_path / "onnx_model"
    r = _cli("launch/export_model.py", trained, out, "--format", "onnx")
    assert "checked against PyTorch" in r.stdout
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
    _cli("launch/build_index.py", "--model", out, "--shards", shards / "val-000000.tar", "--out", tmp_path / "idx")
    q = "hai hình tròn màu đỏ"
    res = {}
    for backend in ("exact", "onnx"):
        r = _cli("launch/search.py", "--index", tmp_path / "idx", q, "--k", "5", "--json", "--backend", backend)
        res[backend] = json.loads(r.stdout)["text_to_image"][q]
    assert [m["id"] for m in res["onnx"]] == [m["id"] for m in res["exact"]]
    for a, b in zip(res["onnx"], res["exact"]):
        assert a["score"] == pytest.approx(b["score"], abs=1e-3)
