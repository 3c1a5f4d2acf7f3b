"""The Python API against hostile and careless inputs: what open() would take as a file
descriptor, a long list whose last path is no image (refused before any embedding, or
skipped and named), an empty list or a folder, progress as the ecosystem shows it, and
model folders whose weights cannot embed (NaN, all zero) refused at load in one line."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch
from PIL import Image

import phoclip
import phoclip.models.api as api
from phoclip.errors import one_line


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from phoclip.models.factory import create_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("hapi") / "model"
    create_model("tiny-debug", text={"hf_config": {"vocab_size": 64}, "segmenter": "none"}).eval().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model(model_dir):
    return phoclip.load(model_dir, device="cpu")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("hphotos")
    out = []
    for i in range(6):
        out.append(d / f"p{i}.png")
        Image.new("RGB", (40 + 3 * i, 30), (40 * i, 90, 200 - 30 * i)).save(out[-1])
    return out


@pytest.fixture()
def forwards(monkeypatch):
    """How many image batches reached the model."""
    calls = []
    real = api.embed.embed_images
    monkeypatch.setattr(api.embed, "embed_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("images", [3, b"photo.jpg", bytearray(b"ab"), [0], [str], [b"photo.jpg"]])
def test_ints_and_bytes_are_refused_as_image_paths(model, images):
    """open(3) reads file descriptor 3, and list(b"...") is ints: neither is a path."""
    with pytest.raises(TypeError) as e:
        model.embed_images(images)
    assert "embed_images takes image paths (str or pathlib.Path) or PIL images" in one_line(e.value)
    assert "\n" not in str(e.value)


def test_a_long_list_whose_last_is_no_image_is_refused_before_embedding(model, photos, tmp_path, forwards):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    gone = tmp_path / "gone.jpg"
    with pytest.raises(ValueError) as e:
        model.embed_images([*photos * 20, bad, gone], batch_size=4)
    msg = one_line(e.value)
    assert msg.startswith(f"{bad}: not a usable image (not_an_image") and "1 more of 122" in msg, msg
    assert "on_error='skip'" in msg
    assert forwards == []  # nothing embedded first


def test_skip_embeds_the_others_and_says_which_were_skipped(model, photos, tmp_path, caplog):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    torn = tmp_path / "torn.png"  # a header that reads, data that does not decode
    data = photos[0].read_bytes()
    torn.write_bytes(data[:len(data) // 2])
    whole = model.embed_images(photos)
    with caplog.at_level(logging.WARNING, logger="phoclip.models.api"):
        res = model.embed_images([photos[0], bad, photos[1], torn, tmp_path / "gone.jpg", *photos[2:]],
                                 batch_size=2, on_error="skip")
    assert isinstance(res, api.ImageEmbeddings)
    assert res.indices == [0, 2, 5, 6, 7, 8]
    torch.testing.assert_close(res.embeddings, whole, atol=1e-5, rtol=1e-4)
    assert [(i, x) for i, x, _ in res.skipped] == [(1, bad), (3, torn), (4, tmp_path / "gone.jpg")]
    assert "no such file" in res.skipped[2][2] and "not_an_image" in res.skipped[0][2]
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning and warning[0].startswith(f"skipped 3 of 9 images (not usable): {bad} (not_an_image"), warning
    # the same torn file under the default: refused naming it, when it is met
    with pytest.raises(ValueError, match="torn.png: not a usable image"):
        model.embed_images([photos[0], torn])
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'"):
        model.embed_images(photos, on_error="ignore")


def test_an_empty_list_or_a_folder_is_said_where_it_happens(model, tmp_path):
    """An empty folder's glob gave an empty tensor and the next line an IndexError."""
    with pytest.raises(ValueError, match="embed_images got no images"):
        model.embed_images(sorted(tmp_path.glob("*.jpg")))
    with pytest.raises(ValueError, match="a folder: pass its pictures"):
        model.embed_images(tmp_path)
    with pytest.raises(ValueError, match="none of the 1 images is usable"):
        model.embed_images([tmp_path], on_error="skip")


def test_progress_is_a_bar_for_a_person_log_lines_elsewhere_or_nothing(model, photos, caplog, capsys, monkeypatch):
    monkeypatch.setattr(api, "PROGRESS_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="phoclip.models.api"):
        model.embed_images(photos, batch_size=2, progress=False)
        assert not [r for r in caplog.records if r.name == "phoclip.models.api"]
        monkeypatch.setattr(api, "_interactive", lambda: True)
        model.embed_images(photos, batch_size=2)
        assert not [r for r in caplog.records if r.name == "phoclip.models.api"]  # the bar, not lines
    assert "embedding: 100%" in capsys.readouterr().err


def _damaged(src, dst, edit):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    w = load_file(str(dst / "model.safetensors"))
    save_file({k: edit(k, v) for k, v in w.items()}, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("edit, needle", [
    (lambda k, v: v.clone().fill_(float("nan")) if k.startswith("text.encoder.layer.1.") else v,
     "non-finite weights (NaN or inf) in"),
    (lambda k, v: torch.zeros(v.shape, dtype=torch.int8),
     "the image tower, text tower, image projection, text projection weights are all zero"),
    (lambda k, v: torch.zeros_like(v) if k.startswith("text_head.") else v, "the text projection weights are all zero"),
])
def test_weights_that_cannot_embed_are_refused_at_load(model_dir, tmp_path, edit, needle):
    folder = _damaged(model_dir, tmp_path / "m", edit)
    with pytest.raises(ValueError) as e:
        phoclip.load(folder, device="cpu")
    assert one_line(e.value).startswith(f"{folder}: ") and needle in one_line(e.value), one_line(e.value)


def test_an_onnx_export_config_gets_the_model_folders_caps(model_dir, tmp_path):
    """onnx/meta.json's config was read without the caps phoclip_config.json gets: a
    text.max_length of 200,000,000 loaded."""
    import json

    from phoclip.models.onnx import export_onnx

    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    export_onnx(phoclip.load(folder, device="cpu").module, folder)
    meta = json.loads((folder / "onnx" / "meta.json").read_text())
    meta["config"]["text"]["max_length"] = 200_000_000
    (folder / "onnx" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError) as e:
        phoclip.load(folder, backend="onnx")
    assert one_line(e.value) == (f"{folder / 'onnx' / 'meta.json'}: model config text.max_length must be at most 512, "
                                 "not 200000000")
