"""Hostile saved models and checkpoints (review findings H1, H2, M3, M4): a meta.json
whose world_size would make verification list a billion files, FIFOs and links named
*.pt inside a checkpoint, model configs with sizes no machine can hold, and model
folders whose config would send the loader to the Hugging Face hub. Each is refused in
one line naming the file and the field, without a hang, a memory blow-up or the
network; an ordinary model and checkpoint still load. Tiny untrained models only."""
from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import pytest
import torch

from phoclip.errors import EXPECTED_ERRORS, CheckpointError, one_line

TIMEOUT = 15  # seconds a verification may take before the test calls it a hang


def _tiny_model():
    import phoclip

    torch.manual_seed(0)
    return phoclip.create_model("tiny-debug").eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model, saved once as a model folder (no tokenizer: not needed to load)."""
    model = _tiny_model()
    folder = model.save_pretrained(tmp_path_factory.mktemp("tiny") / "model")
    return model, folder


def _copy_folder(src: Path, dst: Path, edit=None) -> Path:
    import shutil

    from phoclip.models.pretrained import CONFIG_NAME

    shutil.copytree(src, dst)
    if edit is not None:
        cfg = json.loads((dst / CONFIG_NAME).read_text())
        edit(cfg)
        (dst / CONFIG_NAME).write_text(json.dumps(cfg))
    return dst


def _checkpoint(run: Path, model, meta: dict | None = None, extra=None) -> Path:
    """runs/NAME/checkpoints/step_00000001 as the DDP trainer writes it, plus `extra(d)`."""
    d = run / "checkpoints" / "step_00000001"
    d.mkdir(parents=True)
    torch.save({"rng": torch.zeros(2)}, d / "rank00000.pt")
    torch.save({"model": model.state_dict()}, d / "state.pt")
    (d / "meta.json").write_text(json.dumps(dict({"step": 1, "world_size": 1, "model_config": model.config},
                                                 **(meta or {}))))
    if extra is not None:
        extra(d)
    return d


def _within(fn, fifos=()):
    """fn() in a thread, at most TIMEOUT seconds: (returned value or raised exception).
    On a hang, the FIFOs are opened for writing and closed, which ends the blocked read,
    and the test fails."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # the thread's result, checked by the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(TIMEOUT)
    if t.is_alive():
        for f in fifos:
            try:
                os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        t.join(TIMEOUT)
        pytest.fail(f"hung over {TIMEOUT}s")
    return out.get("error", out.get("value"))


# ---------------------------------------------------------------- H1: meta.json bounds
@pytest.mark.parametrize("meta, message", [
    ({"world_size": 10 ** 9}, "'world_size' must be 1 to 65536, not 1000000000"),
    ({"world_size": 65537}, "'world_size' must be 1 to 65536, not 65537"),
    ({"world_size": 0}, "'world_size' must be 1 to 65536, not 0"),
    ({"world_size": -5}, "'world_size' must be 1 to 65536, not -5"),
    ({"world_size": True}, "no integer 'step' and 'world_size'"),
    ({"step": True}, "no integer 'step' and 'world_size'"),
    ({"step": -1}, "'step' must be >= 0, not -1"),
])
def test_meta_json_step_and_world_size_are_bounded(tmp_path, meta, message):
    """read_meta refuses what would make verification build a list per rank of a billion
    ranks (hang, then out of memory), or none (a negative world_size required no rank
    files), before anything else is looked at."""
    from phoclip.models.checkpoints import read_meta

    d = tmp_path / "step_00000001"
    d.mkdir()
    (d / "meta.json").write_text(json.dumps(dict({"step": 1, "world_size": 1}, **meta)))
    with pytest.raises(CheckpointError) as e:
        read_meta(d)
    assert one_line(e.value) == f"{d / 'meta.json'}: {message}"


def test_a_checkpoint_with_a_bad_world_size_is_refused_by_load_run_and_checkpoint(tmp_path, tiny):
    """Through the user's entry (phoclip.load on the checkpoint and on its run folder);
    the -5 case passed verification without any rank file before."""
    import phoclip

    model, _ = tiny
    for ws in (-5, 10 ** 9):
        run = tmp_path / f"run{ws}"
        ckpt = _checkpoint(run, model, {"world_size": ws})
        (ckpt / "rank00000.pt").unlink()
        for path in (ckpt, run):
            err = _within(lambda: phoclip.load(path))
            assert isinstance(err, EXPECTED_ERRORS), err
            assert "'world_size' must be 1 to 65536" in one_line(err), one_line(err)


# ---------------------------------------------------------------- H2: FIFOs and links
def _extra_fifo(d):
    os.mkfifo(d / "zzz.pt")


def _deepspeed_fifo(d):
    (d / "state.pt").unlink()
    ds = d / "deepspeed"
    ds.mkdir()
    torch.save({"x": torch.ones(1)}, ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"x": torch.ones(1)}, ds / "a_model_states.pt")
    os.mkfifo(ds / "b_model_states.pt")


@pytest.mark.parametrize("plant, name, why", [
    (_extra_fifo, "zzz.pt", "not a regular file (a device, FIFO or socket)"),
    (_deepspeed_fifo, "deepspeed/b_model_states.pt", "not a regular file (a device, FIFO or socket)"),
    (lambda d: os.symlink("/dev/zero", d / "zero.pt"), "zero.pt", "a link, not a file"),
    (lambda d: os.symlink(d / "state.pt", d / "again.pt"), "again.pt", "a link, not a file"),
    (lambda d: (d / "dir.pt").mkdir(), "dir.pt", "a folder"),
])
def test_a_fifo_device_or_link_named_pt_in_a_checkpoint_is_refused_unread(tmp_path, tiny, plant, name, why):
    from phoclip.models.checkpoints import verify_checkpoint

    model, _ = tiny
    ckpt = _checkpoint(tmp_path / "run", model, extra=plant)
    err = _within(lambda: verify_checkpoint(ckpt), fifos=[p for p in ckpt.rglob("*.pt") if p.is_fifo()])
    assert isinstance(err, CheckpointError), err
    assert one_line(err) == f"{ckpt / name}: refused, {why}"


def test_a_linked_folder_is_not_followed_out_of_the_checkpoint(tmp_path, tiny):
    """rglob does not descend into a linked folder (nor a link loop): a FIFO outside the
    checkpoint, reached only through a link, is never opened, and the checkpoint loads."""
    import phoclip

    model, _ = tiny
    outside = tmp_path / "outside"
    outside.mkdir()
    os.mkfifo(outside / "trap.pt")

    def links(d):
        os.symlink(outside, d / "elsewhere")
        os.symlink(".", d / "loop")

    ckpt = _checkpoint(tmp_path / "run", model, extra=links)
    loaded = _within(lambda: phoclip.load(ckpt), fifos=[outside / "trap.pt"])
    assert not isinstance(loaded, BaseException), loaded
    ids = torch.randint(3, 100, (2, 8))
    with torch.no_grad():
        assert torch.allclose(loaded.module.encode_text(ids), model.encode_text(ids), atol=1e-5)


class _Payload:
    """Unpickled with weights_only=False, it creates `marker`: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _linked_deepspeed_folder(tmp_path: Path, model) -> tuple[Path, Path, Path]:
    """A DeepSpeed-shaped checkpoint whose `deepspeed/` is a relative link (it survives a
    tarball) to a folder outside the checkpoint holding a planted pickle payload."""
    outside = tmp_path / "outside"
    outside.mkdir()
    marker = tmp_path / "code-ran"
    torch.save({"module": _Payload(marker), "x": torch.ones(1)}, outside / "mp_rank_00_model_states.pt")
    torch.save({"x": _Payload(marker)}, outside / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    run = tmp_path / "run"

    def link(d):
        (d / "state.pt").unlink()
        os.symlink(os.path.relpath(outside, d), d / "deepspeed")

    return run, _checkpoint(run, model, extra=link), marker


def test_a_linked_deepspeed_folder_is_verified_where_it_really_is(tmp_path, tiny):
    """A checkpoint's `deepspeed/` linked out of it (a walk does not enter links, and
    DeepSpeed unpickles its files with weights_only=False): every file a load opens is
    verified through the link, and nothing unpickles it, so a planted payload cannot run
    through --resume, phoclip.load, search or export."""
    import phoclip
    from phoclip.models.checkpoints import verify_checkpoint
    from phoclip_train.checkpointer import Checkpointer
    from phoclip_train.export import export

    model, _ = tiny
    run, ckpt, marker = _linked_deepspeed_folder(tmp_path, model)
    err = _within(lambda: verify_checkpoint(ckpt))
    assert isinstance(err, CheckpointError), err
    assert one_line(err).startswith(f"{ckpt / 'deepspeed'}/"), one_line(err)
    assert "refused, not loadable with weights_only=True" in one_line(err)
    for load in (lambda: phoclip.load(ckpt), lambda: phoclip.load(run),
                 lambda: Checkpointer(run, 3, 0, 1).resolve("latest"),
                 lambda: Checkpointer(run, 3, 0, 1).resolve(str(ckpt)),
                 lambda: export(run, tmp_path / "exported")):
        err = _within(load)
        assert isinstance(err, EXPECTED_ERRORS), err
        assert "not loadable with weights_only=True" in one_line(err), one_line(err)
    assert not marker.exists(), "a planted pickle ran"


def test_a_checkpoint_whose_weights_do_not_fit_is_refused_in_one_line(tmp_path, tiny):
    import phoclip

    model, _ = tiny
    cfg = json.loads(json.dumps(model.config))
    cfg["embed_dim"] = 32  # the heads' shapes differ from the saved weights'
    ckpt = _checkpoint(tmp_path / "run", model, {"model_config": cfg})
    with pytest.raises(CheckpointError) as e:
        phoclip.load(ckpt)
    assert one_line(e.value).startswith(f"{ckpt}: weights do not fit its model config: ")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- M3: size caps
@pytest.mark.parametrize("edit, field, value, cap", [
    (lambda c: c["vision"].update(image_size=20000), "vision.image_size", 20000, 2048),
    (lambda c: c["text"].update(max_length=10 ** 6), "text.max_length", 10 ** 6, 512),
    (lambda c: c["text"]["hf_config"].update(max_position_embeddings=100000),
     "text.hf_config.max_position_embeddings", 100000, 4096),
    (lambda c: c["text"]["hf_config"].update(hidden_size=1 << 20), "text.hf_config.hidden_size", 1 << 20, 8192),
    (lambda c: c["text"]["hf_config"].update(vocab_size=1 << 24), "text.hf_config.vocab_size", 1 << 24, 1 << 20),
    (lambda c: c.update(embed_dim=1 << 24), "embed_dim", 1 << 24, 8192),
])
def test_model_config_sizes_over_their_caps_are_refused_in_one_line(tmp_path, tiny, edit, field, value, cap):
    """An image size of 20000 made serve crash with a PIL DecompressionBombError and
    every embed huge; the other sizes make a model no machine holds."""
    import phoclip
    from phoclip.models.pretrained import CONFIG_NAME

    folder = _copy_folder(tiny[1], tmp_path / "m", edit)
    with pytest.raises(ValueError) as e:
        phoclip.load(folder)
    assert one_line(e.value) == f"{folder / CONFIG_NAME}: model config {field} must be at most {cap}, not {value}"


def test_the_named_model_configs_are_within_the_caps():
    from phoclip.models.pretrained import check_model_config
    from phoclip.models.factory import get_model_config, list_models

    assert {"phobert-base-rn50", "phobert-large-rn50", "tiny-debug"} <= set(list_models())
    for name in list_models():
        check_model_config(get_model_config(name), name)


def test_a_serve_of_a_model_with_a_huge_image_size_is_refused_at_start(tmp_path, tiny_tokenizer_dir, capsys):
    """The reviewer's case: phoclip-serve on such a model exits 2 with the one line,
    instead of a DecompressionBombError traceback from the service's probe."""
    import sys

    import phoclip
    from conftest import ROOT
    from phoclip.search.index import write_index
    from phoclip.models.pretrained import CONFIG_NAME
    from phoclip.data.text import load_tokenizer

    tok = load_tokenizer(str(tiny_tokenizer_dir))
    torch.manual_seed(0)
    model = phoclip.create_model("tiny-debug", text={"hf_config": {"vocab_size": len(tok)}}).eval()
    model.config["text"].update(segmenter="none")
    folder = model.save_pretrained(tmp_path / "model", tokenizer=tok)
    big = _copy_folder(folder, tmp_path / "big", lambda c: c["vision"].update(image_size=20000))
    emb = torch.nn.functional.normalize(torch.randn(2, model.config["embed_dim"]), dim=-1)
    write_index(tmp_path / "index", model, str(folder), emb,
                [{"key": f"k{i}", "path": str(tmp_path / f"p{i}.jpg"), "caption": "", "shard": ""} for i in range(2)])
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        from phoclip_cli import serve
    finally:
        sys.path.remove(str(ROOT / "launch"))
    rc = _within(lambda: serve.main(["--index", str(tmp_path / "index"), "--model", str(big), "--device", "cpu",
                                     "--port", "0"]))
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    assert f"{big / CONFIG_NAME}: model config vision.image_size must be at most 2048, not 20000" in err, err


# ---------------------------------------------------------------- M4: no network at load
@pytest.fixture
def no_network(monkeypatch):
    """Every name lookup and connection is recorded and refused."""
    calls = []

    def refuse(*a, **kw):
        calls.append(a[:2])
        raise OSError("network forbidden in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return calls


@pytest.mark.parametrize("edit", [
    lambda c: c["vision"].update(pretrained=True),
    lambda c: c["vision"].update(weights_file="/nonexistent/weights.safetensors"),
    lambda c: c["text"].update(pretrained=True, hf_model="org/repo"),
], ids=["vision-pretrained", "vision-weights-file", "text-pretrained-with-hf-config"])
def test_a_model_folder_loads_offline_whatever_its_config_says_of_pretrained_weights(tmp_path, tiny, no_network,
                                                                                    edit):
    """The safetensors file holds every weight: pretrained towers and weights files in
    the config are not fetched or read (the reviewer saw HEAD requests to the hub)."""
    import phoclip

    model, folder = tiny
    loaded = phoclip.load(_copy_folder(folder, tmp_path / "m", edit))
    assert no_network == []
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.module.encode_image(images), model.encode_image(images), atol=1e-5)


@pytest.mark.parametrize("edit, message", [
    (lambda c: (c["text"].pop("hf_config"), c["text"].update(pretrained=True, hf_model="org/repo")),
     "model config text.hf_config is missing"),
    (lambda c: (c["text"].pop("hf_config"), c["text"].update(pretrained=False, hf_model="/elsewhere/hf")),
     "model config text.hf_config is missing"),
    (lambda c: c["vision"].update(timm_model="hf-hub:org/repo"),
     "model config vision.timm_model 'hf-hub:org/repo' is not a timm architecture name"),
    (lambda c: c["text"]["hf_config"].update(auto_map={"AutoModel": "org/repo--modeling.Model"}),
     "model config text.hf_config.auto_map is refused"),
])
def test_a_model_folder_that_cannot_be_built_offline_is_refused_in_one_line(tmp_path, tiny, no_network, edit,
                                                                           message):
    import phoclip
    from phoclip.models.pretrained import CONFIG_NAME

    folder = _copy_folder(tiny[1], tmp_path / "m", edit)
    with pytest.raises(ValueError) as e:
        phoclip.load(folder)
    assert one_line(e.value).startswith(f"{folder / CONFIG_NAME}: {message}"), one_line(e.value)
    assert no_network == []


def test_a_model_folder_whose_weights_do_not_fit_is_refused_in_one_line(tmp_path, tiny):
    """A config naming another architecture than its weights: one line, not
    load_state_dict's many-line RuntimeError."""
    import phoclip

    folder = _copy_folder(tiny[1], tmp_path / "m", lambda c: c.update(embed_dim=32))
    with pytest.raises(ValueError) as e:
        phoclip.load(folder)
    assert one_line(e.value).startswith(f"{folder / 'model.safetensors'}: weights do not fit phoclip_config.json: ")
    assert "\n" not in str(e.value)
