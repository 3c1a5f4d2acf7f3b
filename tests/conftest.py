"""Shared fixtures: tiny tokenizers, images, datasets and shards made on the fly."""
from __future__ import annotations

import contextlib
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
OUR_PACKAGES = ("phoclip", "phoclip_train", "phoclip_sharding", "phoclip_cli")


def pytest_sessionstart(session) -> None:
    """The packages under test are this checkout's: with another checkout (or an
    installed copy) first on the path the tests would test that code and fail without
    saying why."""
    import importlib.util

    for name in OUR_PACKAGES:
        spec = importlib.util.find_spec(name)
        where = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        if where is not None and ROOT not in where.parents:
            raise pytest.UsageError(f"{name} is imported from {where.parent}, not from this checkout ({ROOT}): "
                                    "install this checkout (pip install -e .) or put it first on PYTHONPATH")

CAPTION_WORDS = ["Một", "một", "hai", "ba", "hình_tròn", "hình_vuông", "tam_giác", "màu", "đỏ",
                 "xanh_lá", "xanh_dương", "vàng", "ở", "góc", "trên", "dưới", "bên", "trái",
                 "phải", "giữa", "người", "đàn_ông", "đang", "làm_việc", "Hà_Nội", "con", "chó",
                 "chạy", "trên", "bãi", "cỏ", "xe", "hơi", "đậu", "trước", "ngôi", "nhà"]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A PhoBERT-format tokenizer (vocab.txt + bpe.codes) over a small Vietnamese vocabulary."""
    from phoclip.data.text import build_phobert_tokenizer

    d = tmp_path_factory.mktemp("tok")
    return build_phobert_tokenizer([" ".join(CAPTION_WORDS)], d)


def make_image(path: Path, seed: int, size=(48, 40), mode="RGB", fmt=None) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt)
    return path


def read_all(out: Path) -> dict:
    """key -> {jpg, json, ids.npy} of every shard in a folder, read back with plain tarfile."""
    import tarfile

    res = {}
    for t in sorted(Path(out).glob("*.tar")):
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                res.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return res


def random_caption(rng: random.Random) -> str:
    return " ".join(w.replace("_", " ") for w in rng.sample(CAPTION_WORDS, 5))



def padded_ids(lengths, width: int = 40, vocab: int = 100, seed: int = 0, pad: int = 1):
    """Token ids as the shards hold them: caption i is lengths[i] tokens (<s> = 0 first,
    </s> = 2 last, seeded random ids from [4, vocab) between), padded with `pad` to
    `width`; a LongTensor of shape (len(lengths), width)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(4, vocab, (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = 0, 2
    return ids

@pytest.fixture()
def coco_dataset(tmp_path) -> tuple[Path, Path, dict]:
    """A coco-jsonl source of 24 images with 2 captions each."""
    img_dir = tmp_path / "images"
    rng = random.Random(0)
    caps = {}
    with open(tmp_path / "train.jsonl", "w", encoding="utf-8") as f:
        for i in range(24):
            name = f"img{i:03d}.jpg"
            make_image(img_dir / name, i)
            caps[name] = [random_caption(rng), random_caption(rng)]
            for c in caps[name]:
                f.write(json.dumps({"image": name, "caption": c}, ensure_ascii=False) + "\n")
    return tmp_path / "train.jsonl", img_dir, caps


def run_make_shards(args: list[str]) -> int:
    """make_shards' main(argv) in this process; its logger set-up is undone after (a
    handler left on the root logger would write to a closed capture stream later)."""
    from phoclip_cli.shards import main

    with root_logging_kept():
        return main([str(a) for a in args])


def refusal(main, *args) -> str:
    """The line a command prints when `main(*args)` refuses, asserted to be the usual
    refusal: exit status 2 and a last stderr line, with no traceback before it."""
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(*args)
    text = err.getvalue().strip()
    assert rc == 2 and text and "Traceback" not in text, (rc, text[-3000:])
    return text.splitlines()[-1]


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """Every test leaves the root logger as it found it: an entry point's init_logger
    called in process (a parse-only test, a refusal) must not leave a handler on a
    capture stream that is closed when the test ends."""
    with root_logging_kept():
        yield


@contextlib.contextmanager
def root_logging_kept():
    """The entry points' init_logger replaces the root logger's handlers (pytest's among
    them): put them back when the command returns."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        for h in root.handlers[:]:
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)


@pytest.fixture()
def make_shards():
    return run_make_shards


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory):
    """Tiny shards of the built-in shapes dataset + its PhoBERT-format tokenizer.
    Returns (shard folder, tokenizer folder, n train shards)."""
    from phoclip.data.synthetic import make_dataset
    from phoclip.data.text import UndertheseaSegmenter, build_phobert_tokenizer

    d = tmp_path_factory.mktemp("shapes")
    caps = make_dataset(d / "data", n_images=200, size=64, seed=3)
    lines = caps.read_text(encoding="utf-8").splitlines()
    tok = build_phobert_tokenizer(UndertheseaSegmenter().segment([l.split("\t", 1)[1] for l in lines]),
                                  d / "tok")
    run_make_shards(["--source", f"flickr8k-vi:{caps}:{d / 'data' / 'images'}", "--out", d / "shards",
                     "--tokenizer", tok, "--segmenter", "underthesea", "--max-length", "24",
                     "--image-size", "64", "--val-fraction", "0.15", "--shard-size", "30",
                     "--workers", "1"])
    man = json.loads((d / "shards" / "manifest.json").read_text())
    return d / "shards", tok, len(man["shards"]["train"])


def train_overrides(shards: Path, tok: Path, n_train: int, run_dir: Path, **kw) -> list[str]:
    over = {"run_dir": run_dir, "model.tokenizer": tok,
            "data.train_shards": f"{shards}/train-{{000000..{n_train - 1:06d}}}.tar",
            "data.val_shards": f"{shards}/val-000000.tar", "data.batch_size": 8, "data.workers": 1,
            "data.shuffle_buffer": 16, "data.image_size": 32, "train.max_steps": 12,
            "train.precision": "fp32", "train.log_every": 1, "train.save_every": 3,
            "train.keep_last": 2, "optim.warmup_steps": 2, "optim.lr_head": 3e-3,
            "optim.lr_image": 1e-3, "optim.lr_text": 1e-3}
    over.update(kw)
    return [f"{k}={v}" for k, v in over.items()]


def read_metrics(run_dir: Path, kind: str = "train") -> dict[int, dict]:
    """Last logged line per step (a resumed run re-logs the steps after its checkpoint)."""
    out = {}
    f = Path(run_dir) / "metrics.jsonl"
    if not f.is_file():
        return out
    for line in f.read_text().splitlines():
        m = json.loads(line)
        if m["kind"] == kind:
            out[m["step"]] = m
    return out


def torchrun_cmd(nproc: int, script: str, args: list[str], extra=()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            *extra, str(ROOT / script), *map(str, args)]


def run_torchrun(nproc, script, args, extra=(), timeout=300, check=True):
    import subprocess

    r = subprocess.run(torchrun_cmd(nproc, script, args, extra), capture_output=True, text=True,
                       timeout=timeout, env=job_env(), cwd=ROOT)
    if check and r.returncode != 0:
        raise AssertionError(f"torchrun failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


# DeepSpeed compiles a small op at its first initialize: cache it across runs
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def kill_job(proc) -> None:
    """SIGKILL a launched job and every process under it. torchrun starts each rank in
    a session of its own, so killing the launcher's process group would leave the ranks
    training: collect the whole tree first, then kill each."""
    import signal

    for p in process_tree(proc.pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()



def job_env() -> dict:
    """A launched job's environment: one OpenMP thread a process (on a 2-core machine the
    ranks' spinning threads make each step seconds long) and output unbuffered, so a
    failed job's last lines are there to show."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def start_job(cmd: list[str]):
    """A job (torchrun or DeepSpeed's launcher) started from the repository root in a
    session of its own, stdout and stderr in one text pipe; end it with kill_job."""
    import subprocess

    return subprocess.Popen(cmd, env=job_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_for_step(run: Path, step: int, proc, timeout: float = 120) -> None:
    """Return once the job `proc` has logged `step` to run/metrics.jsonl; fail with its
    output if it ends first, or after `timeout` seconds."""
    import time

    t0 = time.time()
    while max(read_metrics(run) or [0]) < step:
        assert proc.poll() is None, f"the job ended before step {step}:\n{proc.stdout.read()[-6000:]}"
        assert time.time() - t0 < timeout, f"the job did not reach step {step} in {timeout} s"
        time.sleep(0.05)


def kill9_after(cmd: list[str], run: Path, step: int, timeout: float = 180) -> dict[int, dict]:
    """Launch `cmd`, SIGKILL every process of the job once `step` is logged (no chance to
    save), and check nothing trains on after the kill. Returns the metrics logged by then."""
    import time

    p = start_job(cmd)
    try:
        wait_for_step(run, step, p, timeout)
    finally:
        kill_job(p)
    logged = read_metrics(run)
    time.sleep(2)
    assert read_metrics(run) == logged, "ranks kept training after the job was killed"
    return logged


def assert_steps_match(run: Path, reference: Path, last: int, keys=("loss", "grad_norm")) -> dict[int, dict]:
    """`run` logged every step 1..last, each with exactly the `keys` values of the
    `reference` run's same step. Returns run's metrics."""
    got, ref = read_metrics(run), read_metrics(reference)
    assert sorted(got) == list(range(1, last + 1))
    for s in range(1, last + 1):
        for k in keys:
            assert got[s][k] == ref[s][k], (s, k, got[s][k], ref[s][k])
    return got


def kill9_and_resume(args: list[str], run: Path, reference: Path, step: int, timeout: float = 180) -> dict[int, dict]:
    """The 2-rank job of reference_args `args` (writing `run`) killed -9 once `step` is
    logged and resumed with --resume latest: every step, those before the kill and those
    replayed after it, has the uninterrupted `reference` run's loss and gradient norm.
    Returns the resumed run's metrics."""
    last = REFERENCE["train.max_steps"]
    killed = kill9_after(torchrun_cmd(2, "launch/train_ddp.py", args), run, step, timeout)
    assert max(killed) < last
    r = run_torchrun(2, "launch/train_ddp.py", args + ["--resume", "latest"])
    assert "resumed from" in r.stderr
    return assert_steps_match(run, reference, last)


@contextlib.contextmanager
def serving(cmd: list[str], ready_url: str, log: Path | None = None, timeout: float = 120):
    """The server process `cmd` (started from the repository root, one OpenMP thread),
    once `ready_url` answers; SIGTERM when the block ends, and it must exit within 30 s.
    Its output goes to the file `log` (whose tail a start that fails shows), else nowhere."""
    import subprocess
    import time
    import urllib.request

    out = open(log, "w") if log else subprocess.DEVNULL
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(ready_url, timeout=2).read()
                break
            except OSError:
                assert p.poll() is None, Path(log).read_text()[-3000:] if log else f"{cmd} ended"
                assert time.time() - t0 < timeout, f"{cmd} did not answer {ready_url} in {timeout} s"
                time.sleep(0.1)
        yield p
    finally:
        p.terminate()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise
        finally:
            if log:
                out.close()


@contextlib.contextmanager
def serve_command(args: list, log: Path, timeout: float = 120):
    """`python launch/serve.py ARGS --port PORT` on a free port, once /health answers:
    yields its base URL (see serving)."""
    from dist_utils import free_port  # lazy: dist_utils imports torch; conftest's module level stays without it

    base = f"http://127.0.0.1:{(port := free_port())}"
    with serving([sys.executable, "launch/serve.py", *map(str, args), "--port", str(port)], base + "/health",
                 log, timeout):
        yield base


@contextlib.contextmanager
def static_server(folder: Path, timeout: float = 60):
    """`python -m http.server` serving `folder` on 127.0.0.1 and a free port, once it
    answers: yields its base URL (see serving)."""
    from dist_utils import free_port  # lazy: dist_utils imports torch; conftest's module level stays without it

    base = f"http://127.0.0.1:{(port := free_port())}"
    with serving([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder)],
                 base + "/", timeout=timeout):
        yield base

# ----------------------------------------------------------------------------- entry points in process

_LAUNCH_MODULES: dict = {}
_CLI_MODULES = {"train_ddp": "phoclip_cli.train", "evaluate": "phoclip_cli.evaluate",
                "build_index": "phoclip_cli.build_index", "search": "phoclip_cli.search"}


def launch_main(script: str, argv) -> int:
    """launch/<script>.py's main(argv) in this process, as open_clip's training tests call
    theirs: the same parsing, checks, messages and exit code as the command, without the
    10-20 s of a new interpreter importing the trainer stack. Output goes to sys.stdout and
    sys.stderr (read it with capsys). The entry points' logger set-up replaces the root
    logger's handlers (pytest's among them): they are put back after, and a process group
    is never left behind."""
    import importlib
    import importlib.util

    mod = _LAUNCH_MODULES.get(script)
    if mod is None and script in _CLI_MODULES:  # thin scripts: their main lives in phoclip_cli
        mod = importlib.import_module(_CLI_MODULES[script])
    if mod is None:
        spec = importlib.util.spec_from_file_location(f"phoclip_launch_{script}", ROOT / "launch" / f"{script}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _LAUNCH_MODULES[script] = mod
    try:
        with root_logging_kept():
            return mod.main([str(a) for a in argv])
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def train_main(argv) -> tuple[int, str]:
    """launch/train_ddp.py main(argv) in this process, as a single process (no launcher
    variables): (exit code, what it logged)."""
    import io

    from phoclip import lock

    import torch

    buf, old_err = io.StringIO(), sys.stderr
    sys.stderr = buf  # init_logger's handler writes to the sys.stderr of its call
    held = dict(lock._HELD)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as run_torchrun's OMP_NUM_THREADS=1: on a busy 2-core machine
    try:                      # spinning OpenMP threads made each step seconds long
        rc = launch_main("train_ddp", argv)
    finally:
        torch.set_num_threads(threads)
        sys.stderr = old_err
    assert set(lock._HELD) == set(held), "a finished or refused run left its run lock held"
    return rc, buf.getvalue()


TINY = "launch/configs/tiny-debug.yaml"


def train_args(shapes_shards, run_dir: Path, **kw) -> list[str]:
    shards, tok, n = shapes_shards
    return ["--config", TINY, *train_overrides(shards, tok, n, run_dir, **kw)]


# ----------------------------------------------------------------------------- shared runs

@pytest.fixture(scope="session")
def tiny_run(shapes_shards, tmp_path_factory) -> Path:
    """A short single-process run of train_ddp.main (4 steps, checkpoints at 2 and 4, the
    exported model): read by many tests; copy it (shutil.copytree) before damaging it."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    rc, log = train_main(train_args(shapes_shards, run, **{"train.max_steps": 4, "train.save_every": 2,
                                                           "train.keep_last": 3}))
    assert rc == 0, log[-4000:]
    return run


# One 2-rank schedule that several launched tests share: the uninterrupted reference a
# killed and resumed run must match step for step (kill -9, a crashed rank, HTTP shards),
# and the folder test_train reads (checkpoints kept, TensorBoard, validation, resume).
REFERENCE = {"train.max_steps": 24, "train.save_every": 3, "train.keep_last": 2,
             "train.eval_queries": '["hình tròn màu đỏ"]'}


def reference_args(shapes_shards, run_dir: Path, resampled: bool, **kw) -> list[str]:
    return train_args(shapes_shards, run_dir, **{**REFERENCE, "data.resampled": resampled, **kw})


def _reference_run(shapes_shards, tmp_path_factory, resampled: bool) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    run_torchrun(2, "launch/train_ddp.py", reference_args(shapes_shards, run, resampled), timeout=400)
    return run


@pytest.fixture(scope="session")
def reference_run(shapes_shards, tmp_path_factory) -> Path:
    """2 ranks under torchrun, 24 steps, epoch order (not resampled). Read only."""
    return _reference_run(shapes_shards, tmp_path_factory, False)


@pytest.fixture(scope="session")
def reference_run_resampled(shapes_shards, tmp_path_factory) -> Path:
    """The same schedule with shards drawn (resampled). Read only."""
    return _reference_run(shapes_shards, tmp_path_factory, True)
