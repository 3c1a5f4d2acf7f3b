"""Fault tolerance with real processes and real signals: kill -9 and exact resume,
kills during checkpoint writes, SIGTERM preemption, crash + torchrun --max-restarts,
corrupt shards and non-finite steps."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import (ROOT, assert_steps_match, job_env, kill9_and_resume, kill_job, read_metrics, reference_args,
                      run_torchrun, start_job, torchrun_cmd, train_main, train_overrides, wait_for_step)
from phoclip.data.transforms import normalize_images

pytestmark = pytest.mark.slow
ENV = job_env()


def _args(shapes_shards, run, **kw):
    shards, tok, n = shapes_shards
    return ["--config", "launch/configs/tiny-debug.yaml", *train_overrides(shards, tok, n, run, **kw)]


def test_kill9_and_resume_gives_identical_losses(shapes_shards, reference_run_resampled, tmp_path):
    """Shards drawn (resampled): the whole job killed -9 mid-run resumes with every step's
    loss equal to the uninterrupted reference's. (Epoch order, the other stream mode:
    test_remote's kill -9 test, against reference_run.)"""
    run = tmp_path / "killed"
    kill9_and_resume(reference_args(shapes_shards, run, True), run, reference_run_resampled, 7, timeout=120)


# One interpreter imports torch once and forks a saver per kill: each child saves
# checkpoints in a loop until it is killed -9 (a forked child killed mid-write is what a
# killed trainer is to the files; a new interpreter per kill cost 5 s of imports each).
_SAVER = r"""
import os, sys, torch
sys.path.insert(0, sys.argv[2])
from phoclip_train.checkpointer import Checkpointer
class E:
    def save(self, folder):
        torch.save({"model": {"w": torch.randn(256, 1024)}}, folder / "state.pt")
pid = None
for line in sys.stdin:
    if line.strip() == "reap":
        os.waitpid(pid, 0)
        print("reaped", flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        ck = Checkpointer(sys.argv[1], 2, 0, 1)
        step = Checkpointer.meta(ck.latest())["step"] if ck.latest() else 0
        print("ready", os.getpid(), flush=True)
        while True:
            step += 1
            ck.save(step, E(), {"data": {"positions": {0: step}}}, {"samples_seen": step})
"""


def test_kill_during_checkpoint_writes_leaves_a_loadable_latest(tmp_path):
    from phoclip_train.checkpointer import Checkpointer

    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    run = tmp_path / "run"
    last, pid = 0, None
    zygote = subprocess.Popen([sys.executable, str(script), str(run), str(ROOT)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        for i in range(12):  # kills land at many different points of the save sequence
            zygote.stdin.write("go\n")
            zygote.stdin.flush()
            ready, pid = zygote.stdout.readline().split()
            assert ready == "ready"  # now saving in a loop
            time.sleep(0.05 + 0.037 * i)
            os.kill(int(pid), signal.SIGKILL)
            zygote.stdin.write("reap\n")
            zygote.stdin.flush()
            assert zygote.stdout.readline().strip() == "reaped"
            ck = Checkpointer(run, 2, 0, 1)
            latest = ck.latest()
            assert latest is not None
            st = torch.load(latest / "state.pt", weights_only=True)
            assert st["model"]["w"].shape == (256, 1024)
            rs = ck.load_rank_state(latest)
            step = Checkpointer.meta(latest)["step"]
            assert rs["data"]["positions"][0] == step
            assert step >= last  # never goes back
            last = step
    finally:
        for p in (pid, zygote.pid):  # a saver left by a failed check, then the zygote
            try:
                os.kill(int(p), signal.SIGKILL)
            except (ProcessLookupError, TypeError):
                pass
        zygote.wait()
    assert last >= 3


def test_sigterm_saves_and_resumes(shapes_shards, tmp_path):
    run = tmp_path / "run"
    args = _args(shapes_shards, run, **{"train.max_steps": 400, "train.save_every": 1000})
    p = start_job(torchrun_cmd(2, "launch/train_ddp.py", args))
    wait_for_step(run, 4, p)
    t0 = time.time()
    p.send_signal(signal.SIGTERM)  # torchrun forwards it to every rank
    out, _ = p.communicate(timeout=60)
    assert time.time() - t0 < 60
    assert "stopped by signal" in out, out[-3000:]
    from phoclip_train.checkpointer import Checkpointer

    latest = Checkpointer(run, 2, 0, 2).latest()
    assert latest is not None
    stopped = Checkpointer.meta(latest)["step"]
    assert 4 <= stopped < 400
    # the checkpoint the signal saved resumes (in process: the launcher's part ended above)
    args2 = [a if not a.startswith("train.max_steps=") else f"train.max_steps={stopped + 3}" for a in args]
    rc, log = train_main(args2 + ["--resume", "latest"])
    assert rc == 0 and f"step_{stopped:08d}" in log, log[-3000:]
    assert max(read_metrics(run)) == stopped + 3


def test_crashed_rank_restarts_from_latest_under_max_restarts(shapes_shards, reference_run_resampled, tmp_path):
    """One rank killed -9: torchrun --max-restarts brings the job back, it resumes from
    its latest checkpoint and ends with the reference's losses."""
    import psutil

    run = tmp_path / "run"
    args = reference_args(shapes_shards, run, True) + ["--resume", "latest"]
    p = start_job(torchrun_cmd(2, "launch/train_ddp.py", args, extra=["--max-restarts", "1"]))
    wait_for_step(run, 6, p)
    workers = [c for c in psutil.Process(p.pid).children(recursive=True)
               if "train_ddp.py" in " ".join(c.cmdline()) and c.ppid() == p.pid]
    assert len(workers) == 2
    workers[-1].send_signal(signal.SIGKILL)  # one rank dies mid-run
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out[-4000:]
    assert "resumed from" in out
    assert_steps_match(run, reference_run_resampled, 24, keys=("loss",))


def test_nonfinite_steps_skipped_then_stop_with_checkpoint(shapes_shards, tmp_path):
    """In-process (world size 1): the stream turns bad at step 4; steps are skipped and
    counted, and after K in a row the run stops with the pre-fault weights saved."""
    from phoclip_train.config import resolve_config
    from phoclip_train.distributed import DistInfo
    from phoclip_train.run import build_run
    from phoclip_train.trainer import NonFiniteError, Trainer

    shards, tok, n = shapes_shards
    cfg = resolve_config("launch/configs/tiny-debug.yaml", train_overrides(
        shards, tok, n, tmp_path / "run", **{"train.max_steps": 20, "train.save_every": 3,
                                             "train.max_nonfinite": 3}))
    tr = Trainer(build_run(cfg, DistInfo()))
    real_iter = type(tr.stream).__iter__

    def poisoned(self):
        for i, b in enumerate(real_iter(self)):
            if i >= 3:  # from the 4th step on: a NaN pixel
                b = dict(b, images=normalize_images(b["images"]))  # floats can hold a NaN
                b["images"][0, 0, 0, 0] = float("nan")
            yield b

    tr.stream.__class__ = type("Poisoned", (type(tr.stream),), {"__iter__": poisoned})
    with pytest.raises(NonFiniteError, match="consecutive non-finite"):
        tr.train()
    tr.close()
    m = read_metrics(tmp_path / "run")
    assert max(m) == 6 and m[6]["nonfinite_steps"] == 3
    from phoclip_train.checkpointer import Checkpointer

    ck = Checkpointer(tmp_path / "run", 3, 0, 1)
    st3 = torch.load(ck.dir / "step_00000003" / "state.pt", weights_only=True)["model"]
    st6 = torch.load(ck.latest() / "state.pt", weights_only=True)["model"]
    assert ck.latest().name == "step_00000006"
    for k in st3:  # skipped steps changed nothing: the saved weights are the pre-fault ones
        assert torch.equal(st3[k], st6[k]), k
        assert torch.isfinite(st6[k].float()).all()


def test_corrupt_shards_counted_and_survived(shapes_shards, tmp_path):
    from test_data import _bad_shard_dir

    shards, tok, n = shapes_shards
    d, m = _bad_shard_dir(shards, n, tmp_path)
    run = tmp_path / "run"
    args = ["--config", "launch/configs/tiny-debug.yaml",
            *train_overrides(d, tok, m, run, **{
                "train.max_steps": 10, "data.val_shards": f"{shards}/val-000000.tar",
                # one good shard and the two bad ones
                "data.train_shards": f"{d}/train-{{{n - 1:06d}..{m - 1:06d}}}.tar"})]
    rc, log = train_main(args)
    assert rc == 0, log[-4000:]
    met = read_metrics(run)
    assert max(met) == 10
    assert met[10]["skipped_samples"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(run / "tensorboard"))
    ev.Reload()
    assert ev.Scalars("train/skipped_samples")[-1].value > 0


_DS_NAN = r"""
import os, sys, torch
from pathlib import Path
root, port, shards, tok, n, run = sys.argv[1:7]
sys.path.insert(0, os.path.join(root, "tests"))
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
from conftest import train_overrides
from phoclip.data.transforms import normalize_images
from phoclip_train.config import resolve_config
from phoclip_train.distributed import DistInfo
from phoclip.models.loading import model_from_checkpoint
from phoclip_train.run import build_run
from phoclip_train.trainer import NonFiniteError, Trainer
over = train_overrides(Path(shards), tok, int(n), run, **{
    "train.max_steps": 20, "train.save_every": 3, "train.max_nonfinite": 3, "train.precision": "bf16",
    "train.engine": "deepspeed", "train.deepspeed_config": os.path.join(root, "launch/deepspeed/zero2_bf16.json")})
tr = Trainer(build_run(resolve_config(os.path.join(root, "launch/configs/tiny-debug.yaml"), over), DistInfo()))
real_iter = type(tr.stream).__iter__
def poisoned(self):
    for i, b in enumerate(real_iter(self)):
        if i >= 3:
            b = dict(b, images=normalize_images(b["images"]))
            b["images"][0, 0, 0, 0] = float("nan")
        yield b
tr.stream.__class__ = type("Poisoned", (type(tr.stream),), {"__iter__": poisoned})
try:
    tr.train()
    print("RESULT no-stop")
except NonFiniteError:
    a, _ = model_from_checkpoint(Path(run) / "checkpoints/step_00000003")
    b, _ = model_from_checkpoint(Path(run) / "checkpoints/step_00000006")
    sa, sb = a.state_dict(), b.state_dict()
    print("RESULT differing", sum(not torch.equal(sa[k], sb[k]) for k in sa), len(sa))
"""


def test_deepspeed_nonfinite_steps_skipped_then_stop(shapes_shards, tmp_path):
    """The same guard under the DeepSpeed engine (ZeRO-2, bf16): skipped steps change no
    weight and no BatchNorm statistic; the run stops after K in a row."""
    from dist_utils import free_port

    shards, tok, n = shapes_shards
    script = tmp_path / "ds_nan.py"
    script.write_text(_DS_NAN)
    r = subprocess.run([sys.executable, str(script), str(ROOT), str(free_port()), str(shards), str(tok), str(n),
                        str(tmp_path / "run")], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=400)
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT")]
    assert line, r.stdout[-2000:] + r.stderr[-4000:]
    _, what, *nums = line[0].split()
    assert what == "differing" and nums[0] == "0" and int(nums[1]) > 50, line
    m = read_metrics(tmp_path / "run")
    assert max(m) == 6 and m[6]["nonfinite_steps"] == 3


def _run_until_checkpoint(nproc, args, run, step, timeout=180):
    """Start a job, kill it (every process) once checkpoint `step` is complete."""
    p = start_job(torchrun_cmd(nproc, "launch/train_ddp.py", args))
    t0, ck = time.time(), run / "checkpoints" / f"step_{step:08d}" / "meta.json"
    out = ""
    try:
        while not ck.is_file():
            assert p.poll() is None, p.stdout.read()[-4000:]
            assert time.time() - t0 < timeout
            time.sleep(0.05)
    finally:
        kill_job(p)
        out = p.stdout.read()
    return out


def test_resume_on_another_number_of_ranks_continues_the_epoch(shapes_shards, tmp_path):
    """2 ranks -> 1 rank -> 2 ranks, non-resampled, one schedule of 12 steps: each resume
    continues the data order (the stream's shards are shared out again),
    data.global_batch_size keeps the global batch by deriving the accumulation, and the
    learning-rate schedule continues by step."""
    run = tmp_path / "run"
    kw = {"data.resampled": False, "data.global_batch_size": 16, "train.save_every": 4,
          "train.keep_last": 5, "train.max_steps": 12}
    args = _args(shapes_shards, run, **kw)
    _run_until_checkpoint(2, args, run, 4)
    out = _run_until_checkpoint(1, args + ["--resume", "latest"], run, 8)
    assert "written by 2 ranks x 1 workers, this run has 1 x 1" in out, out[-3000:]
    assert "data order continues with epoch 0, less the" in out and "global batch 16 -> 16" in out
    r = run_torchrun(2, "launch/train_ddp.py", args + ["--resume", "latest"])
    assert "written by 1 ranks x 1 workers, this run has 2 x 1" in r.stderr, r.stderr[-3000:]
    m = read_metrics(run)
    assert sorted(m) == list(range(1, 13))
    # 16 samples a step whatever the ranks: the epoch counter advances evenly
    for s in range(2, 13):
        assert m[s]["epoch"] - m[s - 1]["epoch"] == pytest.approx(16 / 171, rel=1e-6), s
    # the learning rates of the one 12-step schedule, whatever the rank count
    from phoclip_train.build import lr_lambda

    f = lr_lambda(2, 12, "cosine", 0.0)
    for s in m:
        for group, lr in m[s]["lrs"].items():
            base = {"image": 1e-3, "text": 1e-3, "head": 3e-3}[group.split("_")[0]]
            assert lr == pytest.approx(base * f(s), rel=1e-6, abs=1e-12), (s, group)
    st = torch.load(run / "checkpoints" / "step_00000008" / "rank00000.pt", weights_only=True)
    assert st["layout"]["salt"] == 4 and st["layout"]["done"]  # the 2 -> 1 layout, saved
