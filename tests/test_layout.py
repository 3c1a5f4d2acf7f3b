"""The layout's promises: the library imports no training code and reads no process
state; inference loading works without the training package; the installed package
names are unambiguous."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "SLURM_PROCID", "SLURM_JOB_ID"}


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module


TRAINING = ("phoclip_train", "phoclip_sharding", "train", "sharding")
# the inference commands: what evaluation, index building, search and serving run
INFERENCE_COMMANDS = ("evaluate", "build_index", "search", "serve")


def _module_file(mod: str):
    """The file of one of our importable modules (phoclip.*, phoclip_cli.*), else None."""
    top, *rest = mod.split(".")
    base = {"phoclip": ROOT / "phoclip", "phoclip_cli": ROOT / "launch" / "phoclip_cli"}.get(top)
    if base is None:
        return None
    p = base.joinpath(*rest)
    for f in (p / "__init__.py", p.with_suffix(".py")):
        if f.is_file():
            return f
    return None


def _reaches_training(entry: Path) -> dict[str, list[str]]:
    """Every training module `entry` imports, directly or through our own modules (at
    any depth, function-level imports included): {module: the import chain}."""
    seen, found, todo = {entry}, {}, [(entry, [entry.relative_to(ROOT).as_posix()])]
    while todo:
        f, chain = todo.pop()
        for mod in _imports(ast.parse(f.read_text())):
            if mod.split(".")[0] in TRAINING:
                found.setdefault(mod, chain + [mod])
                continue
            nxt = _module_file(mod)
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                todo.append((nxt, chain + [mod]))
    return found


def test_library_imports_no_training_code_and_reads_no_launcher_state():
    bad = []
    for f in sorted((ROOT / "phoclip").rglob("*.py")):
        tree = ast.parse(f.read_text())
        for mod in _imports(tree):
            if mod.split(".")[0] in (*TRAINING, "launch"):
                bad.append(f"{f.relative_to(ROOT)} imports {mod}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in LAUNCHER_VARS:
                bad.append(f"{f.relative_to(ROOT)}:{node.lineno} reads {node.value}")
    assert not bad, bad


def test_inference_commands_import_no_training_code():
    """evaluate, build_index, search and serve (the launch/ scripts and their phoclip_cli
    mains), with every library module they reach, import nothing from phoclip_train or
    phoclip_sharding: loading a model for inference is the library's (`phoclip.load`)."""
    bad = []
    for name in INFERENCE_COMMANDS:
        for entry in (ROOT / "launch" / f"{name}.py", ROOT / "launch" / "phoclip_cli" / f"{name}.py"):
            if entry.is_file():
                bad += [" -> ".join(chain) for chain in _reaches_training(entry).values()]
    assert not bad, bad


_LOAD = r"""
import json, sys, torch
from pathlib import Path
import phoclip
from phoclip.models.clip import create_model
from phoclip.data.text import build_phobert_tokenizer, load_tokenizer
out = Path(sys.argv[1])
tok = load_tokenizer(str(build_phobert_tokenizer(["một con chó chạy trên bãi cỏ"], out / "tok")))
m = create_model("tiny-debug", text={"hf_config": {"vocab_size": len(tok)}, "segmenter": "none"})
m.save_pretrained(out / "model", tokenizer=tok)
ckpt = out / "run" / "checkpoints" / "step_00000001"   # a run folder without an export
ckpt.mkdir(parents=True)
torch.save({"model": m.state_dict()}, ckpt / "state.pt")
torch.save({}, ckpt / "rank00000.pt")
(ckpt / "meta.json").write_text(json.dumps({"step": 1, "world_size": 1, "model_config": m.config}))
tok.save_pretrained(str(ckpt / "tokenizer"))
from PIL import Image
for path in (out / "model", out / "run"):
    model = phoclip.load(path, device="cpu")
    e = model.similarity(model.embed_images([Image.new("RGB", (40, 30), "red")]), model.embed_texts(["con chó"]))
    assert e.shape == (1, 1), e.shape
loaded = sorted(k for k in sys.modules if k.split(".")[0] in ("phoclip_train", "phoclip_sharding", "train"))
print("TRAINING MODULES", loaded)
"""


def test_inference_loading_needs_no_training_package(tmp_path):
    """phoclip.load of a model folder and of a run folder's checkpoint, then embedding
    both ways, in a fresh process: no training module is ever imported."""
    r = subprocess.run([sys.executable, "-c", _LOAD, str(tmp_path)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "TRAINING MODULES []" in r.stdout


def test_installed_package_names_are_unambiguous(monkeypatch):
    """train/ and sharding/ install as phoclip_train and phoclip_sharding: a bare
    `import train` (another project's, or nothing) is not ours. Asked in this process as a
    program outside the repository would: the repository and tests folders off sys.path."""
    import importlib.util

    import phoclip_sharding.cli  # noqa: F401
    import phoclip_train.trainer  # noqa: F401

    here = {ROOT, ROOT / "tests"}
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() not in here])
    for name in ("train", "sharding"):
        monkeypatch.delitem(sys.modules, name, raising=False)
        assert importlib.util.find_spec(name) is None, name


def test_every_config_field_is_documented_and_choices_are_literal():
    """The config module promises a docstring per field; a field with fixed choices
    declares them as a Literal (checked where values are set)."""
    import typing

    from phoclip_train import config as C

    tree = ast.parse(Path(C.__file__).read_text())
    undocumented = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.endswith("Config") and node.name != "ConfigError":
            body = node.body
            for i, st in enumerate(body):
                if isinstance(st, ast.AnnAssign):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    if not (isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                            and isinstance(nxt.value.value, str)):
                        undocumented.append(f"{node.name}.{st.target.id}")
    assert not undocumented, undocumented
    hints = typing.get_type_hints(C.TrainConfig)
    assert typing.get_args(hints["precision"]) == ("bf16", "fp16", "fp32", "auto")
    import pytest

    with pytest.raises(C.ConfigError, match="choose ddp or deepspeed"):
        C.resolve_config(None, ["train.engine=horovod"])


def test_every_python_package_folder_is_shipped():
    """pyproject lists its packages by name: a new subpackage (phoclip/serve/routes/) left
    out of the list would work in the editable checkout and be missing from a wheel."""
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, dirs = set(tool["packages"]), tool["package-dir"]
    found = set()
    for top, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([top, *rel.parts]))
    assert found == listed, f"in the tree, not in pyproject packages: {sorted(found - listed)}; " \
                            f"listed, not in the tree: {sorted(listed - found)}"
