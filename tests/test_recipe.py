"""The real recipe's text path with VnCoreNLP, command by command through the entry points.

VnCoreNLP's model cannot be downloaded here (py_vncorenlp fetches it from GitHub), so
the third-party `py_vncorenlp` module is replaced by a stand-in, registered under its
name on sys.path (and PYTHONPATH), that segments with underthesea. Everything of ours runs for real:
resolving the model folder (flag → VNCORENLP_DIR → error naming both), recording the
segmenter in the manifest, the checkpoints and every exported model folder, the
training query grids, and search preparing queries with the model's segmenter."""
import json
import os
import sys

import pytest

from conftest import ROOT, launch_main, run_make_shards, train_main, train_overrides

pytestmark = pytest.mark.slow

STANDIN = '''
"""Test stand-in for py_vncorenlp (the real one downloads its model from GitHub)."""
import os

calls = 0


class VnCoreNLP:
    def __init__(self, annotators=("wseg",), save_dir=None):
        assert os.path.isfile(os.path.join(save_dir, "VnCoreNLP-1.2.jar")), save_dir
        os.chdir(save_dir)  # as the real one does
        from underthesea import word_tokenize
        self._tok = word_tokenize

    def word_segment(self, text):
        return [self._tok(text, format="text")]
'''


@pytest.fixture()
def vncorenlp_env(tmp_path_factory, monkeypatch):
    """The stand-in importable as py_vncorenlp in this process (and in processes it
    starts), a model folder, a `java` on PATH; VNCORENLP_DIR unset. The entry points run
    in this process through their main(argv)."""
    d = tmp_path_factory.mktemp("vnc")
    (d / "site" / "py_vncorenlp").mkdir(parents=True)
    (d / "site" / "py_vncorenlp" / "__init__.py").write_text(STANDIN)
    model = d / "vncorenlp"
    (model / "models" / "wordsegmenter").mkdir(parents=True)
    (model / "VnCoreNLP-1.2.jar").write_bytes(b"")
    (d / "bin").mkdir()
    (d / "bin" / "java").write_text("#!/bin/sh\nexit 0\n")  # VnCoreNLP's Java check; never run
    (d / "bin" / "java").chmod(0o755)
    monkeypatch.syspath_prepend(str(d / "site"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(d / "site"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("PATH", f"{d / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("VNCORENLP_DIR", raising=False)
    monkeypatch.delitem(sys.modules, "py_vncorenlp", raising=False)
    monkeypatch.chdir(ROOT)  # the stand-in chdirs, as the real one does; ours must cope
    return model


def _main(capsys, script, *args, ok=True, stdout_only=False):
    """(exit code, stdout + stderr) of launch/<script>.py main(argv), or of make_shards;
    `stdout_only`: what a pipe reading the command's output gets (e.g. --json)."""
    if script == "make_shards":
        try:
            rc = run_make_shards(list(args))
        except SystemExit as e:  # argparse's usage errors (a refusal returns 2)
            rc, msg = (e.code, "") if isinstance(e.code, int) else (1, str(e.code))
            out = capsys.readouterr()
            return rc, out.out + out.err + msg
    elif script == "train_ddp":
        rc, log = train_main(args)
        out = capsys.readouterr()
        text = out.out + out.err + log
        if ok:
            assert rc == 0, text[-5000:]
        return rc, text
    else:
        rc = launch_main(script, args)
    out = capsys.readouterr()
    if ok:
        assert rc == 0, (out.out + out.err)[-5000:]
    return rc, out.out if stdout_only else out.out + out.err


def test_vncorenlp_shards_train_export_index_search(vncorenlp_env, tmp_path, capsys, monkeypatch):
    from phoclip.data.synthetic import make_dataset
    from phoclip.data.text import UndertheseaSegmenter, build_phobert_tokenizer

    model_dir = vncorenlp_env
    caps = make_dataset(tmp_path / "data", n_images=120, size=64, seed=5)
    lines = caps.read_text(encoding="utf-8").splitlines()
    tok = build_phobert_tokenizer(UndertheseaSegmenter().segment([l.split("\t", 1)[1] for l in lines]),
                                  tmp_path / "tok")
    shard_args = ["--source", f"flickr8k-vi:{caps}:{tmp_path / 'data' / 'images'}", "--out", tmp_path / "shards",
                  "--tokenizer", tok, "--segmenter", "vncorenlp", "--max-length", "24", "--image-size", "64",
                  "--val-fraction", "0.2", "--shard-size", "40", "--workers", "1"]
    # neither the flag nor VNCORENLP_DIR: one line naming both
    rc, text = _main(capsys, "make_shards", *shard_args, ok=False)
    assert rc != 0 and "--vncorenlp-dir" in text and "VNCORENLP_DIR" in text
    monkeypatch.setenv("VNCORENLP_DIR", str(model_dir))
    _main(capsys, "make_shards", *shard_args)  # the environment variable alone is enough
    man = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert man["segmenter"]["name"] == "vncorenlp" and man["segmenter"]["version"].startswith("VnCoreNLP-1.2")
    n_train = len(man["shards"]["train"])
    run = tmp_path / "run"
    train = ["--config", "launch/configs/tiny-debug.yaml", f"run_dir={run}", f"model.tokenizer={tok}",
             f"data.train_shards={tmp_path}/shards/train-{{000000..{n_train - 1:06d}}}.tar",
             f"data.val_shards={tmp_path}/shards/val-000000.tar", "data.image_size=32",
             "train.max_steps=6", "train.save_every=3", "train.eval_every=3",
             'train.eval_queries=["hai hình tròn màu đỏ"]']
    # the training query grids need the segmenter too: refused at start, not silently off
    monkeypatch.delenv("VNCORENLP_DIR")
    rc, text = _main(capsys, "train_ddp", *train, ok=False)
    assert rc == 2 and "VNCORENLP_DIR" in text and "train.eval_queries=[]" in text, text[-3000:]
    monkeypatch.setenv("VNCORENLP_DIR", str(model_dir))
    _main(capsys, "train_ddp", *train)
    events = b"".join(f.read_bytes() for f in (run / "tensorboard").rglob("events*"))
    assert b"val_retrieval/0" in events  # the grid was logged
    # every export path records the segmenter: the end-of-run export, export_model.py, and
    # a run folder without an exported model (a run stopped by SIGTERM) loaded from its checkpoint
    monkeypatch.delenv("VNCORENLP_DIR")
    _main(capsys, "export_model", run / "checkpoints" / "step_00000006", tmp_path / "exported")
    for folder in (run / "model", tmp_path / "exported"):
        tc = json.loads((folder / "phoclip_config.json").read_text())["text"]
        assert tc["segmenter"] == "vncorenlp" and tc["segmenter_version"] == man["segmenter"]["version"]
        assert tc["max_length"] == 24
        assert oct((folder / "model.safetensors").stat().st_mode & 0o777) == oct(0o644 & ~_umask())
    import shutil

    shutil.rmtree(run / "model")  # as a SIGTERM-stopped run leaves it
    idx = tmp_path / "index"
    _main(capsys, "build_index", "--model", run, "--shards", f"{tmp_path}/shards/val-000000.tar", "--out", idx)
    q = "hai hình tròn màu đỏ ở góc trên bên trái"
    rc, text = _main(capsys, "search", "--index", idx, q, "--k", "3", "--json", ok=False)
    assert rc != 0 and "--vncorenlp-dir" in text and "VNCORENLP_DIR" in text
    monkeypatch.setenv("VNCORENLP_DIR", str(model_dir))
    _, text = _main(capsys, "search", "--index", idx, q, "--k", "3", "--json", stdout_only=True)
    assert len(json.loads(text)["text_to_image"][q]) == 3
    monkeypatch.delenv("VNCORENLP_DIR")
    _, text = _main(capsys, "search", "--index", idx, q, "--k", "3", "--json", "--vncorenlp-dir", model_dir,
                    stdout_only=True)
    assert len(json.loads(text)["text_to_image"][q]) == 3


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_exporting_a_checkpoint_needs_no_pretrained_weights_file(shapes_shards, tmp_path, capsys):
    """A run started from local ImageNet weights (vision.weights_file): its checkpoints
    hold every weight and the resolved architecture, so exporting one later (on another
    machine, the weights file gone) must not need that file."""
    import timm
    import torch
    from safetensors.torch import save_file

    from phoclip.models.factory import load_model

    shards, tok, n = shapes_shards
    w = tmp_path / "test_resnet.safetensors"
    save_file(timm.create_model("test_resnet").state_dict(), str(w))
    run = tmp_path / "run"
    rc, log = train_main(["--config", "launch/configs/tiny-debug.yaml", *train_overrides(
        shards, tok, n, run, **{"train.max_steps": 2, "train.save_every": 2,
                                "model.overrides": json.dumps({"vision": {"weights_file": str(w)}})})])
    assert rc == 0, log[-4000:]
    w.unlink()
    assert launch_main("export_model", [run / "checkpoints" / "step_00000002", tmp_path / "exported"]) == 0
    out = capsys.readouterr().out
    assert "model written to" in out
    a, b = load_model(tmp_path / "exported").eval(), load_model(run / "model").eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a.encode_image(x), b.encode_image(x))
    assert (tmp_path / "exported" / "tokenizer" / "vocab.txt").is_file()


def test_every_third_party_import_is_pinned():
    """A package our code imports must be pinned: in requirements.txt (a training node's),
    requirements-serve.txt (the service and ONNX extras) or requirements-trackers.txt
    (wandb and MLflow); test tooling lives apart in
    requirements-dev.txt and is imported by no production code (braceexpand was missing)."""
    import ast
    import sys as _sys

    def pinned(name):
        return {l.split("==")[0].split("[")[0].strip().lower().replace("_", "-") for l in
                (ROOT / name).read_text().splitlines() if "==" in l and not l.startswith("#")}

    pins = pinned("requirements.txt") | pinned("requirements-serve.txt") | pinned("requirements-trackers.txt")
    dev_only = pinned("requirements-dev.txt")
    assert not dev_only & pins, f"test tooling in a runtime file: {dev_only & pins}"
    assert {"pytest", "selenium", "moto", "img2dataset"} <= dev_only
    pins |= {"torch", "torchvision"}  # constraints.txt
    dist_name = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn", "faiss": "faiss-cpu",
                 "py_vncorenlp": "py-vncorenlp", "mlflow": "mlflow-skinny"}
    ours = {"phoclip", "phoclip_train", "phoclip_sharding", "phoclip_cli", "common", "conftest", "dist_utils",
            "train_ddp", "export_model", "build_index"}
    missing = {}
    for folder in ("phoclip", "train", "sharding", "launch"):
        for f in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                         else [])
                for name in names:
                    top = name.split(".")[0]
                    if top in _sys.stdlib_module_names or top in ours:
                        continue
                    if dist_name.get(top, top).lower().replace("_", "-") not in pins:
                        missing.setdefault(top, str(f.relative_to(ROOT)))
    assert not missing, f"imported but not pinned in requirements.txt: {missing}"
