"""launch/slurm/train.sbatch's preemption path, run as SLURM would run it on one node:
`srun` and `scontrol` are stand-ins on PATH (no SLURM here) — srun runs its command
locally (as the one task of the step), scontrol answers `show hostnames` and records
`requeue`. The script, torchrun, the signal forwarding and the trainer are the real ones."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, kill_job, read_metrics, run_make_shards, train_overrides
from dist_utils import free_port

SRUN = """#!/bin/bash
# stand-in srun: drop srun's own options, run the task in place (signals reach it directly)
while [[ "$1" == --* ]]; do shift; done
exec "$@"
"""
SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") echo 127.0.0.1 ;;
  requeue*) echo "requeue $2" >> "$SCONTROL_LOG" ;;
  *) echo "stand-in scontrol: unexpected $*" >&2; exit 1 ;;
esac
"""


def _env(tmp_path, run, **extra):
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    return dict(os.environ, PATH=f"{bin_}{os.pathsep}{os.environ['PATH']}", SCONTROL_LOG=str(tmp_path / "scontrol.log"),
                SLURM_JOB_ID="4242", SLURM_NNODES="1", SLURM_JOB_NODELIST="node-01", MASTER_PORT=str(free_port()),
                CONFIG="launch/configs/tiny-debug.yaml", RUN_DIR=str(run), NPROC_PER_NODE="2",
                TORCHRUN=str(Path(sys.executable).parent / "torchrun"), SHUTDOWN_TIMEOUT="60",
                OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


@pytest.mark.slow
def test_sbatch_forwards_the_signal_saves_requeues_and_resumes(shapes_shards, tmp_path):
    shards, tok, n = shapes_shards
    run = tmp_path / "run"
    over = [o for o in train_overrides(shards, tok, n, run, **{"train.max_steps": 200, "train.save_every": 1000})
            if not o.startswith("run_dir=")]
    p = subprocess.Popen(["bash", "launch/slurm/train.sbatch", *over], env=_env(tmp_path, run), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.time()
        while max(read_metrics(run) or [0]) < 4:
            assert p.poll() is None, p.stdout.read()[-4000:]
            assert time.time() - t0 < 180, "training did not start"
            time.sleep(0.1)
        p.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` sends to the batch shell
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            kill_job(p)
    assert p.returncode == 0, out[-4000:]
    assert "batch shell got USR1" in out and "stopped by signal" in out, out[-4000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    stopped = max(read_metrics(run))
    assert stopped < 200
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == [f"step_{stopped:08d}"], ckpts  # the signal's save (save_every is 1000)
    assert not (run / "model").exists()

    # the requeued job runs the same script: it resumes from that checkpoint and, ending
    # normally, does not requeue again
    (tmp_path / "scontrol.log").unlink()
    over2 = [o if not o.startswith("train.max_steps=") else f"train.max_steps={stopped + 3}" for o in over]
    r = subprocess.run(["bash", "launch/slurm/train.sbatch", *over2],
                       env=_env(tmp_path, run, SLURM_RESTART_COUNT="1"), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped:08d}'}" in r.stdout + r.stderr
    assert not (tmp_path / "scontrol.log").exists()
    assert sorted(read_metrics(run)) == list(range(1, stopped + 4))
    assert (run / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_sharding_array_script_parts_and_merge(tmp_path, tiny_tokenizer_dir):
    """launch/slurm/make_shards.sbatch as two array tasks would run it (SLURM's array
    variables set by hand), then the documented merge: one complete dataset."""
    import json

    from test_sharding import _dataset

    ann, imgs = _dataset(tmp_path, 24)
    out = tmp_path / "shards"
    venv_bin = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=f"{venv_bin}{os.pathsep}{os.environ['PATH']}", SLURM_ARRAY_TASK_COUNT="2",
               SLURM_CPUS_PER_TASK="1", SOURCES=f"coco-jsonl:{ann}:{imgs}", OUT=str(out),
               TOKENIZER=str(tiny_tokenizer_dir), SEGMENTER="none")
    for task in ("0", "1"):
        r = subprocess.run(["bash", "launch/slurm/make_shards.sbatch"], env=dict(env, SLURM_ARRAY_TASK_ID=task),
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    assert run_make_shards(["--merge", out]) == 0  # the documented merge, in this process
    man = json.loads((out / "manifest.json").read_text())
    assert man["counts"]["train"] + man["counts"]["val"] == 24 and man["merged_from"] == {"parts": 2}


def test_sbatch_requeues_a_signal_that_comes_before_srun(tmp_path):
    """SLURM's warning signal may come while the batch shell is still setting up (here:
    while it asks scontrol for the node list): the job is requeued and exits 0, srun is
    never started (a shell that dies of the signal is not requeued)."""
    run = tmp_path / "run"
    env = _env(tmp_path, run)
    asked, srun_ran = tmp_path / "asked", tmp_path / "srun_ran"
    (tmp_path / "bin" / "scontrol").write_text(f"""#!/bin/bash
case "$1 $2" in
  "show hostnames") touch "{asked}"; sleep 2; echo 127.0.0.1 ;;
  requeue*) echo "requeue $2" >> "$SCONTROL_LOG" ;;
  *) exit 1 ;;
esac
""")
    (tmp_path / "bin" / "srun").write_text(f'#!/bin/bash\ntouch "{srun_ran}"\n')
    p = subprocess.Popen(["bash", "launch/slurm/train.sbatch"], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.time()
        while not asked.exists():
            assert p.poll() is None and time.time() - t0 < 30, p.stdout.read()
            time.sleep(0.02)
        p.send_signal(signal.SIGUSR1)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            kill_job(p)
    assert p.returncode == 0, out
    assert "batch shell got USR1" in out and "stopped before training started" in out, out
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert not srun_ran.exists()


def test_sharding_script_takes_source_paths_with_spaces(tmp_path, tiny_tokenizer_dir):
    """SOURCES holds one source per line, each taken whole: a dataset folder whose name
    has a space (and a glob character) reaches make_shards intact, not split into words."""
    import json

    from test_sharding import _dataset

    data = tmp_path / "my data [v1]"
    data.mkdir()
    ann, imgs = _dataset(data, 6)
    other = tmp_path / "other set"
    other.mkdir()
    ann2, imgs2 = _dataset(other, 4)
    out = tmp_path / "out dir"
    venv_bin = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=f"{venv_bin}{os.pathsep}{os.environ['PATH']}", SLURM_ARRAY_TASK_COUNT="1",
               SLURM_ARRAY_TASK_ID="0", SLURM_CPUS_PER_TASK="1", OUT=str(out), TOKENIZER=str(tiny_tokenizer_dir),
               SEGMENTER="none", SOURCES=f"coco-jsonl:{ann}:{imgs}\n  coco-jsonl:{ann2}:{imgs2},name=other\n")
    r = subprocess.run(["bash", "launch/slurm/make_shards.sbatch"], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    man = json.loads((out / "manifest.json").read_text())
    assert man["counts"]["train"] + man["counts"]["val"] == 6  # the other set's 4 images are copies of 4 of these
    assert {k: sum(v.values()) for k, v in man["sources"].items()} == {"coco-jsonl": 6, "other": 4}
