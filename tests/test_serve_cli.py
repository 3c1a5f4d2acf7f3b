"""The service's command line and settings without a model: --help before the heavy
imports, settings checked where they are made and refused naming the flag, the tag
file refused naming itself; the library package free of the command line and of
training code."""
import ast
import subprocess
import sys

import pytest

from conftest import ROOT


def test_help_imports_neither_torch_nor_the_web_stack():
    code = ("import sys; from phoclip_cli.serve import build_parser; text = build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'fastapi', 'uvicorn') if m in sys.modules)); "
            "print('--max-connections' in text and '(default: 1024)' in text)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["[]", "True"]


def test_settings_are_checked_and_a_bad_flag_is_named(capsys):
    from pydantic import ValidationError

    from phoclip.serve import Settings
    from phoclip_cli.serve import main

    with pytest.raises(ValidationError):
        Settings(cpu_jobs=0)
    with pytest.raises(ValidationError):
        Settings(backend="tensorflow")
    with pytest.raises(ValidationError):  # a typo is not silently ignored
        Settings(max_uplod=5)
    with pytest.raises(ValidationError):  # frozen: one value for the whole service
        Settings().port = 1
    for argv, flag in ((["--max-upload-mb", "0"], "--max-upload-mb"), (["--cpu-jobs", "0"], "--cpu-jobs"),
                       (["--header-timeout", "-1"], "--header-timeout"), (["--port", "70000"], "--port"),
                       (["--images-root", "/nowhere/at/all"], "--images-root")):
        with pytest.raises(SystemExit) as e:
            main(["--index", "nowhere", *argv])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and f"error: {flag}: " in err, err


def test_a_tag_file_is_refused_in_one_line_naming_it(tmp_path, capsys):
    from phoclip_cli.serve import main, read_tags

    f = tmp_path / "tags.txt"
    f.write_text("chó\n\n mèo \nchó\n", encoding="utf-8")
    assert read_tags(str(f)) == ("chó", "mèo")  # blank lines and repeats dropped
    for content in (b"\n\n", "x".encode() * 600 + b"\n", b"\xff\xfe not utf-8", "\n".join(
            f"thẻ {i}" for i in range(201)).encode()):
        f.write_bytes(content)
        with pytest.raises(SystemExit) as e:
            main(["--index", "nowhere", "--tags", str(f)])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and str(f) in err, err


def test_the_library_service_has_no_command_line_and_no_training_code():
    bad = []
    for f in sorted((ROOT / "phoclip" / "serve").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            bad += [f"{f.name} imports {n}" for n in names
                    if n.split(".")[0] in ("argparse", "phoclip_train", "phoclip_sharding", "phoclip_cli")]
    assert not bad, bad
    static = ROOT / "phoclip" / "serve" / "static"
    assert {p.name for p in static.iterdir()} >= {"index.html", "app.js", "style.css"}
