"""The layout's promises: every floor imports only downwards (the library nothing above
it; sharding and training neither each other nor the commands), with no import cycle
among our modules and a stated reason on every function-level import of one of them; the
library reads no process state; inference loading works without the training package;
the installed package names are unambiguous."""
import ast
import re
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


def test_library_reads_no_launcher_state():
    bad = []
    for f in sorted((ROOT / "phoclip").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Constant) and node.value in LAUNCHER_VARS:
                bad.append(f"{f.relative_to(ROOT)}:{node.lineno} reads {node.value}")
    assert not bad, bad


# ------------------------------------------------------------------ the import graph

# our importable packages and their folders
PACKAGES = {"phoclip": ROOT / "phoclip", "phoclip_train": ROOT / "train" / "phoclip_train",
            "phoclip_sharding": ROOT / "sharding" / "phoclip_sharding", "phoclip_cli": ROOT / "launch" / "phoclip_cli"}
# what each floor may not import, at any depth (the bare folder names too: `import train.x`)
FORBIDDEN = {
    "phoclip": ("phoclip_train", "phoclip_sharding", "phoclip_cli", "train", "sharding", "launch"),
    "phoclip_train": ("phoclip_sharding", "phoclip_cli", "sharding", "launch"),
    "phoclip_sharding": ("phoclip_train", "phoclip_cli", "train", "launch"),
}
LAZY = re.compile(r"#\s*lazy:\s*\S")


def _our_modules() -> dict[str, Path]:
    """{dotted name: file} of every module of our packages (a package is its __init__)."""
    mods = {}
    for top, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            parts = [top, *f.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = f
    return mods


MODULES = _our_modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """(node, inside a function, under `if TYPE_CHECKING:`) for every import statement."""
    todo = [(tree, False, False)]
    while todo:
        node, in_fn, typing_only = todo.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_fn, typing_only
            fn = in_fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            tc = typing_only or (isinstance(child, ast.If) and _is_type_checking(child.test))
            todo.append((child, fn, tc))


def _targets(node, module: str, is_package: bool) -> list[str]:
    """The modules an import statement of `module` imports: `from pkg import mod` is
    pkg.mod when that is a module, else pkg; relative imports resolved. Names outside our
    packages are kept as written (the floors check names like `train`)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        pkg = module.split(".") if is_package else module.split(".")[:-1]
        pkg = pkg[:len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _resolve(name: str) -> str:
    """One of our modules named or holding `name` (its longest prefix that is a module)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts) or name


def _graph(with_typing_only: bool) -> dict[str, set[str]]:
    """{module: the modules it imports}: module- and function-level imports."""
    graph = {}
    for mod, f in MODULES.items():
        tree = ast.parse(f.read_text())
        out = set()
        for node, _, typing_only in _import_nodes(tree):
            if typing_only and not with_typing_only:
                continue
            out |= {_resolve(t) for t in _targets(node, mod, f.name == "__init__.py")}
        graph[mod] = out
    return graph


def _chain(graph, start: str, stop) -> list[str] | None:
    """The shortest import chain from `start` to a module for which `stop(name)` holds."""
    prev, todo = {start: None}, [start]
    while todo:
        nxt = []
        for m in todo:
            for t in sorted(graph.get(m, ())):
                if t in prev:
                    continue
                prev[t] = m
                if stop(t):
                    chain = [t]
                    while prev[chain[-1]] is not None:
                        chain.append(prev[chain[-1]])
                    return chain[::-1]
                if t in graph:
                    nxt.append(t)
        todo = nxt
    return None


def test_every_floor_imports_only_downwards():
    """phoclip (the library) imports nothing of phoclip_train, phoclip_sharding or
    phoclip_cli; phoclip_sharding and phoclip_train import neither each other nor
    phoclip_cli: at any depth, function-level and type-only imports included."""
    graph = _graph(with_typing_only=True)
    bad = []
    for mod in sorted(graph):
        floor = mod.split(".")[0]
        above = FORBIDDEN.get(floor, ())
        chain = _chain(graph, mod, lambda t: t.split(".")[0] in above)
        if chain:
            bad.append(" -> ".join(chain))
    assert not bad, "imports upwards:\n" + "\n".join(bad)


def _cycles(graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


def test_no_import_cycle_among_our_modules():
    """No module of ours imports, at any depth, one that imports it back: module- and
    function-level imports (a cycle hidden inside a function is still one), `from pkg
    import mod` counted as importing pkg.mod, package __init__ files as modules of their
    own (importing pkg.mod is not counted as importing pkg: Python runs pkg/__init__ first,
    but a package that imports its own submodules would otherwise be a cycle with each).
    Type-only imports (`if TYPE_CHECKING:`) never run and are left out."""
    graph = _graph(with_typing_only=False)
    shown = []
    for comp in _cycles(graph):
        members = set(comp)
        sub = {m: graph[m] & members for m in comp}
        back = _chain(sub, comp[0], lambda t: t == comp[0])
        shown.append(f"{', '.join(comp)} (e.g. {' -> '.join(back or comp)})")
    assert not shown, "import cycles:\n" + "\n".join(shown)


def test_every_function_level_import_of_ours_says_why():
    """An import of our own modules inside a function hides a dependency (and any cycle
    it closes): each carries `# lazy: REASON` on one of its lines (e.g. `# lazy: imports
    torch; --help answers without it`). The thin scripts in launch/ and sharding/ too."""
    files = [*MODULES.items(), *((f.relative_to(ROOT).as_posix(), f) for f in
                                 [*(ROOT / "launch").glob("*.py"), ROOT / "sharding" / "make_shards.py"])]
    bad = []
    for mod, f in sorted(files):
        text = f.read_text()
        lines = text.splitlines()
        for node, in_fn, _ in _import_nodes(ast.parse(text)):
            if not in_fn:
                continue
            ours = [t for t in _targets(node, mod, f.name == "__init__.py") if t.split(".")[0] in PACKAGES]
            if ours and not LAZY.search(" ".join(lines[node.lineno - 1:node.end_lineno])):
                bad.append(f"{f.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not bad, f"{len(bad)} function-level imports without '# lazy: reason':\n" + "\n".join(bad)


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
from phoclip.models.factory import create_model
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

    import phoclip_sharding.job  # noqa: F401
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
