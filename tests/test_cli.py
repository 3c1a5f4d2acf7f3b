"""The commands a user types (a new user's first hour; thin entry points): every
installed phoclip-* command exists and answers --help fast; every flag of every entry
point says what it does; the training command lists its config groups and prints the
resolved config; a refusal under torchrun is what torchrun reports as the root cause."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

HELP_SECONDS = 5.0  # the promise is under 2 s; the bound is generous for a loaded 2-core machine


def installed_commands() -> dict[str, str]:
    """{command: "module:function"} from pyproject.toml's [project.scripts]."""
    text = (ROOT / "pyproject.toml").read_text()
    if tomllib is not None:
        return tomllib.loads(text)["project"]["scripts"]
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return {k.strip(): v.strip().strip('"') for k, v in (l.split("=", 1) for l in section.splitlines()
                                                         if "=" in l and not l.lstrip().startswith("#"))}


# the scripts in launch/ and sharding/ and the installed commands: what the docs may name
SCRIPTS = ["launch/train_ddp.py", "launch/train_deepspeed.py", "launch/evaluate.py", "launch/build_index.py",
           "launch/search.py", "launch/serve.py", "launch/export_model.py", "launch/demo.py", "sharding/make_shards.py"]


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def script_main(script: str):
    """The `main` of a script (a path under the repository) or of an installed command's
    `module:function`."""
    if ":" in script:
        mod, fn = script.split(":")
        return getattr(importlib.import_module(mod), fn)
    name = "phoclip_docs_" + script.replace("/", "_").removesuffix(".py")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / script)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name].main


def entry_parser(script: str) -> argparse.ArgumentParser:
    """The argument parser a command's main(argv) builds, taken at its first parse (the
    parse raises before anything else runs), whether or not it exposes build_parser."""
    main = script_main(script)
    orig = argparse.ArgumentParser.parse_known_args

    def capture(self, *a, **kw):
        raise _Captured(self)

    argparse.ArgumentParser.parse_known_args = capture
    try:
        main([])
    except _Captured as c:
        return c.parser
    finally:
        argparse.ArgumentParser.parse_known_args = orig
    raise AssertionError(f"{script}: main([]) returned without parsing its arguments")


def _bin(name: str) -> Path:
    return Path(sys.executable).parent / name


@pytest.mark.parametrize("command", sorted(installed_commands()))
def test_every_installed_command_exists_and_answers_help_fast(command):
    exe = _bin(command)
    assert exe.is_file(), f"{exe} missing: re-install (pip install -e . or make)"
    t0 = time.perf_counter()
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60, cwd="/")
    took = time.perf_counter() - t0
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-2000:]
    assert took < HELP_SECONDS, f"{command} --help took {took:.1f} s (heavy imports before parsing?)"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help_fast(script):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    took = time.perf_counter() - t0
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-2000:]
    assert took < HELP_SECONDS, f"{script} --help took {took:.1f} s"


@pytest.mark.parametrize("script", SCRIPTS + sorted(set(installed_commands().values())))
def test_every_flag_of_every_entry_point_says_what_it_does(script):
    parser = entry_parser(script)
    silent = [a.dest for a in parser._actions if a.help != argparse.SUPPRESS
              and not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not silent, f"{script}: flags without help: {silent}"


def test_the_training_help_lists_the_config_groups_and_defaults():
    from phoclip_cli.train import build_parser
    from phoclip_train.config import config_groups

    text = build_parser().format_help()
    for name, doc in config_groups():
        assert f"  {name:8} {doc}" in text, name
    assert "--print-config" in text and "KEY=VALUE" in text
    # a flag with a default shows it (the formatter adds it unless the help says it already)
    from phoclip_cli.evaluate import build_parser as eval_parser

    assert "(default: 128)" in eval_parser().format_help()


def test_print_config_shows_value_source_default_and_doc_without_loading_torch():
    code = ("import sys; from phoclip_cli.train import main; rc = main(sys.argv[1:]); "
            "print('TORCH', 'torch' in sys.modules); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "--config", "launch/configs/tiny-debug.yaml", "train.max_steps=3",
                        "--resume", "latest", "--print-config"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "train.max_steps = 3    (override; default 1000)" in out
    assert "data.batch_size = 8    (YAML file launch/configs/tiny-debug.yaml; default 64)" in out
    assert "resume = latest    (override; default null)" in out
    assert "train.seed = 0    (default)\n    Seeds the initial weights" in out
    assert "[optim] AdamW and the learning-rate schedule." in out
    assert "TORCH False" in out  # nothing was built


def test_the_flags_are_shorthands_for_config_fields():
    """--resume and --deepspeed_config set cfg.resume and train.* through the overrides:
    one path, no flag shadowing a field; the DeepSpeed script selects its engine."""
    from phoclip_cli.train import config_overrides, parse_args
    from phoclip_train.config import resolve_config

    args = parse_args(["run_dir=x", "--resume", "latest", "--deepspeed_config", "ds.json", "train.max_steps=2"])
    cfg = resolve_config(None, config_overrides(args))
    assert (cfg.resume, cfg.train.engine, cfg.train.deepspeed_config, cfg.run_dir) == ("latest", "deepspeed", "ds.json", "x")
    assert resolve_config(None, config_overrides(parse_args([]))).train.engine == "ddp"
    assert resolve_config(None, config_overrides(parse_args([], engine="deepspeed"))).train.engine == "deepspeed"
    # the deepspeed launcher's --local_rank=N is accepted (`deepspeed --no_python phoclip-train ...`)
    assert parse_args(["--local_rank=3", "train.max_steps=2"]).overrides == ["train.max_steps=2"]


def test_a_refusal_is_written_where_torchrun_reads_its_root_cause(tmp_path, monkeypatch):
    from phoclip_cli.common import record_refusal

    f = tmp_path / "err" / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(f))
    record_refusal("bad configuration: x", 2)
    record_refusal("a later failure", 3)  # the first one is the root cause
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(f))
    assert failure.message["extraInfo"]["py_callstack"] == "bad configuration: x (exit code 2)"
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")
    record_refusal("nothing to write to")  # outside torchrun: no file, no error


@pytest.mark.slow
def test_torchrun_names_our_refusal_as_the_root_cause():
    """One real launch (1 process, a config refusal) of the installed command under
    torchrun --no-python: its failure summary shows our line and our exit code."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                        "--no-python", str(_bin("phoclip-train")), "--config", "launch/configs/tiny-debug.yaml",
                        "train.bogus=1"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    root = out.split("Root Cause (first observed failure):", 1)[-1]
    assert "exitcode  : 2" in root, out[-3000:]
    assert "traceback : bad configuration: unknown config key 'train.bogus' (exit code 2)" in root, out[-3000:]
    assert "To enable traceback" not in out


@pytest.mark.slow
def test_the_training_command_derives_the_accumulation_from_the_global_batch(shapes_shards, tmp_path):
    """The command, not validate(), decides train.accum_steps from
    data.global_batch_size and the ranks, and the run records it."""
    import yaml

    from conftest import train_main, train_overrides

    shards, tok, n = shapes_shards
    run = tmp_path / "run"
    rc, log = train_main(["--config", "launch/configs/tiny-debug.yaml", *train_overrides(
        shards, tok, n, run, **{"train.max_steps": 2, "data.global_batch_size": 16, "train.save_every": 2,
                                "data.val_shards": "null"})])
    assert rc == 0, log[-3000:]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["accum_steps"] == 2 and saved["data"]["global_batch_size"] == 16


@pytest.mark.slow
def test_the_deepspeed_launcher_starts_the_installed_command():
    """`deepspeed --no_python phoclip-train ...`: the launcher passes --local_rank=N, which
    the command accepts; a refusal is our line and our exit code."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install .[deepspeed])")
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    r = subprocess.run([str(_bin("deepspeed")), "--num_gpus", "1", "--no_python", "phoclip-train", "--config",
                        "launch/configs/tiny-debug.yaml", "train.bogus=1"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env=env)
    out = r.stdout + r.stderr
    assert "'--local_rank=0'" in out, out[-3000:]  # the launcher did pass it
    assert "bad configuration: unknown config key 'train.bogus'" in out and "exits with return code = 2" in out, out[-3000:]
