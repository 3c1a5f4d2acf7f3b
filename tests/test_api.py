"""The Python API (`phoclip.load` -> embed_images / embed_texts / similarity): one way to
load every kind of saved model, text prepared as at training, both backends alike, and
one-line refusals naming the path."""
import json
import logging
import shutil

import pytest
import torch
from PIL import Image

import phoclip


def _tiny_model(vocab: int = 64, seed: int = 0):
    from phoclip.models.factory import create_model

    torch.manual_seed(seed)
    return create_model("tiny-debug", text={"hf_config": {"vocab_size": vocab}, "segmenter": "none"}).eval()


@pytest.fixture(scope="module")
def model_dir(tiny_tokenizer_dir, tmp_path_factory):
    """A saved tiny model (with its tokenizer; captions recorded as unsegmented)."""
    from phoclip.data.text import load_tokenizer

    tok = load_tokenizer(str(tiny_tokenizer_dir))
    out = tmp_path_factory.mktemp("api") / "model"
    _tiny_model(len(tok)).save_pretrained(out, tokenizer=tok)
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    paths = []
    for i, colour in enumerate(("red", "blue", "green", "yellow", "white")):
        im = Image.new("RGB", (60 + 7 * i, 45), colour)
        im.paste(Image.new("RGB", (20, 20), "black"), (5 * i, 10))
        paths.append(d / f"p{i}.{'png' if i % 2 else 'jpg'}")
        im.save(paths[-1])
    return paths


TEXTS = ["Một con chó chạy trên bãi cỏ", "hai hình tròn màu đỏ", "ba tam giác", "Một hình vuông"]


def _checkpoint(model, tok_dir, folder, meta_extra=None):
    """A DDP-format checkpoint folder as the trainer writes it (state.pt with the model's
    weights, a rank file, meta.json with the model config, the tokenizer)."""
    folder.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "optimizer": {}}, folder / "state.pt")
    torch.save({"data": {}}, folder / "rank00000.pt")
    shutil.copytree(tok_dir, folder / "tokenizer")
    meta = {"step": 3, "world_size": 1, "model_config": model.config, **(meta_extra or {})}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_five_lines_embed_and_compare(model_dir, photos):
    model = phoclip.load(model_dir, device="cpu")
    assert model.backend == "torch" and model.device == torch.device("cpu")
    assert model.config["embed_dim"] == 64 and model.config["text"]["segmenter"] == "none"
    img = model.embed_images([str(photos[0]), Image.open(photos[1])])  # a path and a PIL image
    txt = model.embed_texts(TEXTS)
    assert img.shape == (2, 64) and txt.shape == (4, 64) and img.dtype == txt.dtype == torch.float32
    torch.testing.assert_close(img.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(txt.norm(dim=1), torch.ones(4))
    sim = model.similarity(img, txt)
    assert sim.shape == (2, 4)
    torch.testing.assert_close(sim, img @ txt.T)
    # the same numbers as the model's own towers on the prepared inputs (NFC, tokenizer)
    from phoclip.models.embed import embed_texts

    torch.testing.assert_close(txt, embed_texts(model.module, model.text_processor, TEXTS))
    # one item is one row; a path object works as a string does
    torch.testing.assert_close(model.embed_texts(TEXTS[1]), txt[1:2])
    torch.testing.assert_close(model.embed_images(photos[0]), img[:1])


def test_batches_give_the_same_embeddings_and_log_progress(model_dir, photos, caplog, monkeypatch):
    import phoclip.models.api as api

    model = phoclip.load(str(model_dir), device="cpu")
    whole_img, whole_txt = model.embed_images(photos), model.embed_texts(TEXTS)
    monkeypatch.setattr(api, "PROGRESS_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="phoclip.models.api"):
        img = model.embed_images(photos, batch_size=2)
        txt = model.embed_texts(TEXTS, batch_size=1)
    torch.testing.assert_close(img, whole_img, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(txt, whole_txt, atol=1e-5, rtol=1e-4)
    progress = [r.getMessage() for r in caplog.records if r.name == "phoclip.models.api"]
    assert "embedded 2/5 images" in progress[0] and any("embedded 3/4 texts" in m for m in progress), progress
    assert model.embed_texts([]).shape == (0, 64)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        model.embed_texts(TEXTS, batch_size=0)
    with pytest.raises(TypeError, match="takes strings"):
        model.embed_texts([b"bytes"])


def test_a_file_that_is_not_an_image_is_refused_naming_it(model_dir, tmp_path):
    model = phoclip.load(model_dir, device="cpu")
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    with pytest.raises(ValueError, match=f"{bad}: not a usable image"):
        model.embed_images([bad])


def test_model_folder_run_folder_and_checkpoint_load_the_same_model(model_dir, tiny_tokenizer_dir, tmp_path, photos):
    """One call for every kind of saved model: an exported folder, a run folder (its
    model/, else its newest checkpoint that verifies), a checkpoint folder."""
    from phoclip.models.pretrained import model_fingerprint

    exported = phoclip.load(model_dir, device="cpu")
    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "model")
    ckpt = _checkpoint(exported.module, tiny_tokenizer_dir, run / "checkpoints" / "step_00000003")
    older = _checkpoint(_tiny_model(exported.config["text"]["hf_config"]["vocab_size"], seed=1), tiny_tokenizer_dir,
                        run / "checkpoints" / "step_00000001")
    want = model_fingerprint(exported.module)
    want_txt = exported.embed_texts(TEXTS)
    for path in (run, ckpt):
        m = phoclip.load(path, device="cpu")
        assert model_fingerprint(m.module) == want, path
        assert not m.module.training
        torch.testing.assert_close(m.embed_texts(TEXTS), want_txt)
    shutil.rmtree(run / "model")  # a run folder without an export: its newest checkpoint
    assert model_fingerprint(phoclip.load(run, device="cpu").module) == want
    # the newest checkpoint damaged: passed over for the newest that verifies
    (ckpt / "state.pt").write_bytes(b"\x80\x04junk")
    assert model_fingerprint(phoclip.load(run, device="cpu").module) != want
    assert phoclip.load(older, device="cpu").embed_images(photos[:1]).shape == (1, 64)


def test_a_checkpoint_that_would_unpickle_code_is_refused_before_loading(model_dir, tiny_tokenizer_dir, tmp_path):
    import os

    from phoclip.errors import EXPECTED_ERRORS, one_line

    model = phoclip.load(model_dir, device="cpu").module
    ckpt = _checkpoint(model, tiny_tokenizer_dir, tmp_path / "step_00000003")
    torch.save({"model": model.state_dict(), "hook": os.system}, ckpt / "state.pt")  # a global: refused
    with pytest.raises(EXPECTED_ERRORS) as e:
        phoclip.load(ckpt)
    assert f"{ckpt}/state.pt: refused, not loadable with weights_only=True" in one_line(e.value)


@pytest.mark.parametrize("case, needle", [
    ("empty", "not a model folder (phoclip_config.json + model.safetensors), run folder or checkpoint folder"),
    ("run without anything", "a run folder with no exported model and no complete checkpoint"),
    ("checkpoint without model_config", "meta.json: no 'model_config'"),
    ("incomplete checkpoint", "incomplete, missing state.pt"),
    ("weights missing", "model.safetensors: missing"),
    ("weights torn", "model.safetensors: not a readable safetensors file"),
    ("config not JSON", "phoclip_config.json: not valid JSON"),
    ("unknown backend", "backend must be one of ('torch', 'onnx'), not 'tf'"),
    ("onnx without export", "has no ONNX export (onnx/meta.json)"),
    ("onnx not a model", "the onnx backend needs an exported model folder"),
])
def test_refusals_are_one_line_naming_the_path(model_dir, tiny_tokenizer_dir, tmp_path, case, needle):
    from phoclip.errors import EXPECTED_ERRORS, one_line

    d, backend = tmp_path / "x", "torch"
    if case in ("empty", "onnx not a model"):
        d.mkdir()
        backend = "onnx" if case == "onnx not a model" else "torch"
    elif case == "run without anything":
        (d / "checkpoints").mkdir(parents=True)
    elif case == "checkpoint without model_config":
        ckpt = _checkpoint(phoclip.load(model_dir).module, tiny_tokenizer_dir, d)
        meta = json.loads((ckpt / "meta.json").read_text())
        del meta["model_config"]
        (ckpt / "meta.json").write_text(json.dumps(meta))
    elif case == "incomplete checkpoint":
        _checkpoint(phoclip.load(model_dir).module, tiny_tokenizer_dir, d)
        (d / "state.pt").unlink()
    else:
        shutil.copytree(model_dir, d)
        if case == "weights missing":
            (d / "model.safetensors").unlink()
        elif case == "weights torn":
            (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100])
        elif case == "config not JSON":
            (d / "phoclip_config.json").write_text("{")
        elif case == "unknown backend":
            backend = "tf"
        elif case == "onnx without export":
            backend = "onnx"
    with pytest.raises(EXPECTED_ERRORS) as e:
        phoclip.load(d, backend=backend, device="cpu")
    msg = one_line(e.value)
    assert needle in msg, msg
    assert case == "unknown backend" or str(d) in msg, msg


def test_onnx_backend_gives_the_torch_embeddings(model_dir, tmp_path, photos):
    """The same five lines on onnxruntime: the same embeddings within the export's
    tolerance; an ONNX file onnxruntime refuses is named in one line."""
    from phoclip.errors import EXPECTED_ERRORS, one_line
    from phoclip.models.onnx import TOLERANCE, export_onnx

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    export_onnx(phoclip.load(folder).module, folder)
    t, o = phoclip.load(folder, device="cpu"), phoclip.load(folder / "onnx", backend="onnx")
    assert o.backend == "onnx" and o.device == torch.device("cpu") and o.config["embed_dim"] == 64
    texts = TEXTS + ["một câu dài hơn nhiều với rất nhiều từ " * 3]  # padded rows in the batch
    ti, oi = t.embed_images(photos), o.embed_images(photos, batch_size=2)
    tt, ot = t.embed_texts(texts), o.embed_texts(texts, batch_size=3)
    assert (ti - oi).abs().max() <= TOLERANCE and (tt - ot).abs().max() <= TOLERANCE
    assert (t.similarity(ti, tt) - o.similarity(oi, ot)).abs().max() <= 2 * TOLERANCE
    (folder / "onnx" / "text.onnx").write_bytes(b"not onnx")
    with pytest.raises(EXPECTED_ERRORS) as e:
        phoclip.load(folder, backend="onnx")
    assert f"{folder}/onnx/text.onnx: onnxruntime refuses it" in one_line(e.value)


def test_a_model_without_a_tokenizer_embeds_images_and_refuses_texts_naming_it(model_dir, tiny_tokenizer_dir,
                                                                             tmp_path, photos):
    ckpt = _checkpoint(phoclip.load(model_dir).module, tiny_tokenizer_dir, tmp_path / "step_00000003")
    shutil.rmtree(ckpt / "tokenizer")
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["model_config"]["text"]["tokenizer"] = None
    (ckpt / "meta.json").write_text(json.dumps(meta))
    model = phoclip.load(ckpt, device="cpu")
    assert model.embed_images(photos[:2]).shape == (2, 64)
    with pytest.raises(ValueError, match=f"{ckpt}: the model records no tokenizer"):
        model.embed_texts(TEXTS)


def test_a_model_without_a_recorded_segmenter_asks_for_one(model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    cfg = json.loads((folder / "phoclip_config.json").read_text())
    cfg["text"]["segmenter"] = None
    (folder / "phoclip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"{folder}: the model does not record which segmenter.*segmenter=NAME"):
        phoclip.load(folder, device="cpu").embed_texts(TEXTS)
    want = phoclip.load(model_dir, device="cpu").embed_texts(TEXTS)
    torch.testing.assert_close(phoclip.load(folder, device="cpu", segmenter="none").embed_texts(TEXTS), want)


def _python_blocks(text: str) -> list[str]:
    import re

    return [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "phoclip.load" in b]


def _loaded_paths(code: str, calls: tuple = ("load", "load_model")) -> list[str]:
    """The string paths the code passes to phoclip.load / phoclip.load_model (or `calls`)."""
    import ast

    out = []
    for node in ast.walk(ast.parse(code)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in calls
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append(node.args[0].value)
    return out


def _photo_index(out, model_dir, photos) -> None:
    """A small index of `photos` made with the model of `model_dir`, as phoclip.open_index reads."""
    from phoclip.models.factory import load_model
    from phoclip.search.index import write_index

    emb = phoclip.load(model_dir, device="cpu").embed_images(photos)
    write_index(out, load_model(model_dir), str(model_dir), emb,
                [{"key": p.name, "path": str(p), "caption": f"ảnh {i}"} for i, p in enumerate(photos)])


def test_the_documented_python_examples_run_as_written(model_dir, photos, tmp_path, monkeypatch):
    """Every Python example that loads a model (README.md, docs/*.md, the model card's
    text) runs as written, the folders and photos it names made in a scratch folder: the
    documented API cannot drift from the code."""
    from conftest import ROOT
    from phoclip.models.card import API_EXAMPLE, BATCH_EXAMPLE

    sources = {f.relative_to(ROOT).as_posix(): _python_blocks(f.read_text(encoding="utf-8"))
               for f in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if f.is_file()}
    sources["model card"] = ["\n".join(API_EXAMPLE).replace("THIS_FOLDER", "card_model"), "\n".join(BATCH_EXAMPLE)]
    assert sum(map(len, sources.values())) >= 3, sources  # the README's two, the card's two at least
    for n, (where, blocks) in enumerate(sources.items()):
        page = tmp_path / str(n)  # each page its own folder: one page's runs/X/export is not another's run folder
        (page / "Pictures").mkdir(parents=True)
        for i, p in enumerate(photos):
            shutil.copy(p, page / "Pictures" / f"p{i}.jpg")
        shutil.copy(photos[0], page / "photo.jpg")
        monkeypatch.chdir(page)
        monkeypatch.setenv("HOME", str(page))
        scope: dict = {}  # one namespace per page: a later block uses the model of an earlier one
        for code in blocks:
            for path in _loaded_paths(code):
                if not (page / path).exists():
                    shutil.copytree(model_dir, page / path)
            for path in _loaded_paths(code, ("open_index",)):
                if not (page / path).exists():
                    _photo_index(page / path, model_dir, photos)
            try:
                exec(compile(code, where, "exec"), scope)
            except Exception as e:  # which page and block, not only the exception
                raise AssertionError(f"{where}: the example fails ({type(e).__name__}: {e}):\n{code}") from e
        if "model" in scope and hasattr(scope["model"], "embed_texts"):
            assert scope["model"].backend == "torch"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_a_zero_checkpoint_loads_as_the_trained_model(shapes_shards, tmp_path, stage):
    """A DeepSpeed ZeRO checkpoint (partitions gathered to fp32 after the folder verified,
    BatchNorm statistics from the module state) loads through phoclip.load, without
    training code, as the model the run exported at its end."""
    from conftest import ROOT, run_torchrun, train_overrides
    from phoclip.models.pretrained import model_fingerprint

    shards, tok, n = shapes_shards
    ds_json = json.loads((ROOT / "launch" / "deepspeed" / f"zero{stage}_bf16.json").read_text())
    ds_json.pop("torch_autocast")  # fp32: no bf16 on this CPU
    (tmp_path / "ds.json").write_text(json.dumps(ds_json))
    run = tmp_path / "run"
    run_torchrun(2, "launch/train_deepspeed.py", [
        "--config", "launch/configs/tiny-debug.yaml", "--deepspeed_config", str(tmp_path / "ds.json"),
        *train_overrides(shards, tok, n, run, **{"train.max_steps": 2, "train.save_every": 2})], timeout=400)
    exported = phoclip.load(run / "model", device="cpu")
    ckpt = phoclip.load(run / "checkpoints" / "step_00000002", device="cpu")
    assert model_fingerprint(ckpt.module) == model_fingerprint(exported.module)
    texts = ["hai hình tròn màu đỏ", "một tam giác"]
    torch.testing.assert_close(ckpt.embed_texts(texts), exported.embed_texts(texts))
