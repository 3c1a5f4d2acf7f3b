"""The VnCoreNLP download line that docs/sharding.md and the commands' refusals give works
as written, and a failed download leaves no partial model folder behind."""
import os
import shlex
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, refusal, root_logging_kept
from phoclip.data.text import VNCORENLP_DOWNLOAD_LINE

# py_vncorenlp's download_model as released: it needs save_dir to exist, makes models/
# first, then fetches each file (a failed fetch ends in FileNotFoundError from its move)
FAKE = textwrap.dedent("""
    import os

    def download_model(save_dir='./'):
        os.mkdir(save_dir + "/models")
        os.mkdir(save_dir + "/models/wordsegmenter")
        if os.environ.get("FAKE_DOWNLOAD_FAILS"):
            raise FileNotFoundError("[Errno 2] No such file or directory: 'VnCoreNLP-1.2.jar'")
        open(save_dir + "/VnCoreNLP-1.2.jar", "w").write("jar")
        open(save_dir + "/models/wordsegmenter/vi-vocab", "w").write("vocab")
""")


def _run_line(tmp_path, dest, fail: bool):
    fake = tmp_path / "fake"
    fake.mkdir(exist_ok=True)
    (fake / "py_vncorenlp.py").write_text(FAKE)
    argv = shlex.split(VNCORENLP_DOWNLOAD_LINE.replace("/abs/path/vncorenlp", str(dest)))
    assert argv[:2] == ["python", "-c"]
    env = dict(os.environ, PYTHONPATH=str(fake), TMPDIR=str(tmp_path))
    if fail:
        env["FAKE_DOWNLOAD_FAILS"] = "1"
    return subprocess.run([sys.executable, *argv[1:]], env=env, cwd=tmp_path, capture_output=True, text=True)


def test_the_download_line_works_into_a_folder_that_does_not_exist(tmp_path):
    dest = tmp_path / "models-home" / "vncorenlp"
    r = _run_line(tmp_path, dest, fail=False)
    assert r.returncode == 0, r.stderr
    assert (dest / "VnCoreNLP-1.2.jar").is_file() and (dest / "models" / "wordsegmenter" / "vi-vocab").is_file()


def test_a_failed_download_leaves_no_partial_model_folder(tmp_path):
    dest = tmp_path / "vncorenlp"
    r = _run_line(tmp_path, dest, fail=True)
    assert r.returncode != 0
    assert not dest.exists()
    r = _run_line(tmp_path, dest, fail=False)  # the next try starts clean
    assert r.returncode == 0, r.stderr
    assert (dest / "VnCoreNLP-1.2.jar").is_file()


def test_the_docs_and_the_refusal_give_the_same_line(coco_dataset, tiny_tokenizer_dir, tmp_path, monkeypatch):
    page = (ROOT / "docs" / "sharding.md").read_text(encoding="utf-8")
    assert VNCORENLP_DOWNLOAD_LINE in page
    assert "download_model(save_dir='/abs/path/vncorenlp')" not in page
    from phoclip_cli.shards import main

    monkeypatch.delenv("VNCORENLP_DIR", raising=False)
    ann, imgs, _ = coco_dataset
    with root_logging_kept():
        line = refusal(main, ["--source", f"coco-jsonl:{ann}:{imgs}", "--out", str(tmp_path / "out"),
                              "--tokenizer", str(tiny_tokenizer_dir), "--segmenter", "vncorenlp",
                              "--vncorenlp-dir", str(tmp_path / "nowhere"), "--workers", "1"])
    if "Java" in line and "VnCoreNLP model not found" not in line:
        pytest.skip("no Java here: the model-folder refusal comes after the Java one")
    assert VNCORENLP_DOWNLOAD_LINE in line, line


def test_the_line_calls_download_model_as_py_vncorenlp_defines_it():
    """Read from the installed package's source: other tests register a VnCoreNLP
    stand-in under the name py_vncorenlp in sys.modules."""
    import ast
    import importlib.machinery
    from pathlib import Path

    spec = importlib.machinery.PathFinder.find_spec("py_vncorenlp")
    if spec is None:
        pytest.skip("py_vncorenlp is not installed")
    files = [Path(spec.origin)] if spec.origin else []
    files += [f for d in (spec.submodule_search_locations or []) for f in Path(d).glob("*.py")]
    defs = [n for f in files for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.FunctionDef)
            and n.name == "download_model"]
    assert defs and "save_dir" in [a.arg for a in defs[0].args.args]
