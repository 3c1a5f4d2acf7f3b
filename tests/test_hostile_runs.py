"""Hostile and broken shards, checkpoints, indexes, manifests and run folders, and jobs
whose processes die: refused in one line naming the file, or skipped and counted; never
code execution, a hang, a run lost to one sample, or a second job in one folder."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (ROOT, job_env, kill_job, launch_main, process_tree, read_metrics, start_job, torchrun_cmd,
                      train_args, train_main, train_overrides, wait_for_step)

pytestmark = pytest.mark.slow  # real runs of the entry points
ENV = job_env()

# The entry points' refusals are checked through their main(argv) in this process: the
# same checks, message and exit code as the command, without a new interpreter each.
# Launches stay where only a launch proves it: signals, killed processes, two jobs.


def _refused(capsys, script, *args, needles=()):
    """launch/<script>.py refuses: exit code 2, its message on stderr, no traceback."""
    rc = launch_main(script, args)
    out = capsys.readouterr()
    assert rc == 2, out.out[-2000:] + out.err[-2000:]
    assert "Traceback" not in out.err, out.err[-3000:]
    for n in needles:
        assert n in out.err, (n, out.err[-3000:])
    return out.err


def _ok(capsys, script, *args):
    rc = launch_main(script, args)
    out = capsys.readouterr()
    assert rc == 0, out.out[-2000:] + out.err[-3000:]
    return out.out


class _Evil:
    """Unpickling this runs a shell command: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------------------- code execution

def test_a_crafted_deepspeed_checkpoint_runs_no_code_anywhere(tiny_run, shapes_shards, tmp_path, capsys):
    from phoclip.errors import CheckpointError
    from phoclip_train.checkpointer import Checkpointer, verify_checkpoint

    marker = tmp_path / "PWNED"
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    good = run / "checkpoints" / "step_00000004"
    bad = run / "checkpoints" / "step_00000006"
    shutil.copytree(good, bad)
    (bad / "state.pt").unlink()
    (bad / "deepspeed").mkdir()
    torch.save({"module": _Evil(marker)}, bad / "deepspeed" / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {}}, bad / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    meta = json.loads((bad / "meta.json").read_text())
    (bad / "meta.json").write_text(json.dumps(dict(meta, step=6)))

    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt: refused.*system"):
        verify_checkpoint(bad)
    # --resume latest passes over it, naming why, to the newest that verifies
    assert Checkpointer(run, 3, 0, 1).resolve("latest") == good
    with pytest.raises(CheckpointError, match="--resume .*mp_rank_00_model_states.pt"):
        Checkpointer(run, 3, 0, 1).resolve(str(bad))
    shards = shapes_shards[0]
    _refused(capsys, "export_model", bad, tmp_path / "out", needles=("mp_rank_00_model_states.pt", "system"))
    _refused(capsys, "evaluate", "--model", bad, "--shards", f"{shards}/val-000000.tar", needles=("refused",))
    _refused(capsys, "build_index", "--model", bad, "--shards", f"{shards}/val-000000.tar",
             "--out", tmp_path / "idx", needles=("refused",))
    # an index whose index.json points at the crafted checkpoint
    from phoclip.models.factory import load_model
    from phoclip.search.index import write_index

    idx = tmp_path / "index"
    model = load_model(run / "model")
    write_index(idx, model, str(run / "model"), torch.nn.functional.normalize(torch.randn(2, 64), dim=1),
                [{"key": str(i), "path": f"p{i}.jpg"} for i in range(2)])
    meta = json.loads((idx / "index.json").read_text())
    (idx / "index.json").write_text(json.dumps(dict(meta, model=str(bad))))
    _refused(capsys, "search", "--index", idx, "con chó", needles=("refused",))
    # and training: resuming from it
    rc, log = train_main(train_args(shapes_shards, run, **{"train.max_steps": 8}) + ["--resume", str(bad)])
    assert rc == 2 and "mp_rank_00_model_states.pt: refused" in log, log[-3000:]
    assert not marker.exists()


# ----------------------------------------------------------------------------- bad samples

def _npy(a) -> bytes:
    import io

    b = io.BytesIO()
    np.save(b, a, allow_pickle=False)
    return b.getvalue()


def _huge_header_npy() -> bytes:
    import io

    b = io.BytesIO()
    np.lib.format.write_array_header_1_0(b, {"descr": "<i4", "fortran_order": False, "shape": (10**12, 24)})
    return b.getvalue() + b"\0" * 96


def _bad_samples_dir(shards: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of the shapes shards plus one shard holding one sample of each kind of bad
    token ids and a deeply nested .json, among good samples."""
    d = tmp_path / "shards"
    d.mkdir()
    for f in shards.iterdir():
        if f.is_file():
            shutil.copy(f, d)
    with tarfile.open(shards / "train-000000.tar") as tf:
        m = {x.name: tf.extractfile(x).read() for x in tf.getmembers()}
    keys = sorted({k.split(".")[0] for k in m})
    jpg, ids = m[keys[0] + ".jpg"], np.load(__import__("io").BytesIO(m[keys[0] + ".ids.npy"]))
    bad = {"vocab": _npy(np.full_like(ids, 10**6)), "negative": _npy(np.full_like(ids, -3)),
           "width": _npy(np.ones((1, ids.shape[1] + 5), np.int32)), "huge": _huge_header_npy()}
    name = "train-000099.tar"
    import webdataset as wds

    with open(d / name, "wb") as f, wds.TarWriter(f, encoder=False) as tw:
        for k in keys[1:9]:  # good ones
            tw.write({"__key__": k + "g", "jpg": m[k + ".jpg"], "ids.npy": m[k + ".ids.npy"], "json": m[k + ".json"]})
        for k, v in bad.items():
            tw.write({"__key__": k, "jpg": jpg, "ids.npy": v, "json": b"{}"})
        tw.write({"__key__": "nested", "jpg": jpg, "ids.npy": _npy(ids), "json": b"[" * 100000 + b"]" * 100000})
    sizes = json.loads((d / "sizes.json").read_text())
    sizes[name] = 13
    (d / "sizes.json").write_text(json.dumps(sizes))
    return d, [str(d / name)]


def test_bad_token_ids_and_metadata_are_skipped_and_counted_by_reason(shapes_shards, tmp_path):
    from phoclip.data.stream import ShardStream, StreamConfig
    from phoclip.evaluation.retrieval import eval_samples

    shards, tok, _ = shapes_shards
    d, urls = _bad_samples_dir(shards, tmp_path)
    width = json.loads((d / "manifest.json").read_text())["tokenizer"]["max_length"]
    from phoclip.data.text import load_tokenizer

    vocab = len(load_tokenizer(str(tok)))
    s = ShardStream(StreamConfig(urls=urls, weights=[1.0], batch_size=3, image_size=32,
                                 seed=0, rank=0, world_size=1, resampled=False, shuffle_buffer=0, ids_width=width,
                                 vocab_size=vocab))
    it = iter(s)
    batches = [next(it) for _ in range(3)]  # 9 usable per pass: 8 good + the nested-json one
    keys = [k for b in batches for k in b["keys"]]
    assert "nested" in keys  # training never parses the .json, so its nesting cannot hurt
    assert not {"vocab", "negative", "width", "huge"} & set(keys)
    sk = batches[-1]["skipped"]
    assert sk == {"bad_ids_range": 2, "bad_ids_shape": 2}, sk
    assert all(b["input_ids"].max() < vocab and b["input_ids"].min() >= 0 for b in batches)
    counted = Counter()
    got = [x["key"] for x in eval_samples(urls, 32, skipped=counted, ids_width=width, vocab_size=vocab)]
    assert len(got) == 8 and dict(counted) == {"bad_ids_range": 2, "bad_ids_shape": 2, "bad_json": 1}


def test_evaluation_and_training_report_what_they_skipped(tiny_run, shapes_shards, tmp_path, capsys):
    shards, tok, n = shapes_shards
    d, urls = _bad_samples_dir(shards, tmp_path)
    out = _ok(capsys, "evaluate", "--model", tiny_run, "--shards", urls[0], "--out", tmp_path / "e.json")
    assert "skipped samples: bad_ids_range 2, bad_ids_shape 2, bad_json 1" in out
    assert json.loads((tmp_path / "e.json").read_text())["skipped"]["bad_json"] == 1
    run = tmp_path / "run"
    rc, log = train_main(["--config", "launch/configs/tiny-debug.yaml", *train_overrides(
        d, tok, n, run, **{"data.train_shards": urls[0], "data.val_shards": urls[0], "train.max_steps": 4,
                           "data.batch_size": 6, "train.save_every": 100})])
    assert rc == 0, log[-4000:]
    m = read_metrics(run)
    assert m[4]["skipped"]["bad_ids_range"] >= 2 and m[4]["skipped"]["bad_ids_shape"] >= 2
    assert read_metrics(run, "val")[4]["skipped"] == {"bad_ids_range": 2, "bad_ids_shape": 2, "bad_json": 1}


def test_no_readable_training_sample_stops_in_bounded_time_with_a_clear_error(shapes_shards, tmp_path):
    shards, tok, _ = shapes_shards
    d = tmp_path / "junk"
    d.mkdir()
    shutil.copy(shards / "manifest.json", d)
    sizes = {}
    for i in range(3):
        (d / f"train-{i:06d}.tar").write_bytes(os.urandom(5000))
        sizes[f"train-{i:06d}.tar"] = 30
    (d / "sizes.json").write_text(json.dumps(sizes))
    t0 = time.time()
    rc, log = train_main(["--config", "launch/configs/tiny-debug.yaml", *train_overrides(
        d, tok, 3, tmp_path / "run", **{"data.val_shards": "null"})])
    assert rc == 2 and time.time() - t0 < 90, log[-3000:]
    assert "refused: phoclip.data.health.NoReadableSamples: no sample could be read from the last" in log
    assert "phoclip/data/stream.py\", line" not in log  # one line, not its traceback


def test_sigterm_ends_a_run_stuck_waiting_for_data_promptly(shapes_shards, tmp_path):
    """A shard that never delivers a byte (a `pipe:` command that hangs; a hung mount):
    the run waits for data, and SIGTERM must still end it, with its loader worker and the
    hung command, also when the signal comes in the wait's first seconds (a stop flag
    alone is never read by a wait that does not end)."""
    shards, tok, _ = shapes_shards
    marker = f"phoclip-stuck-{os.getpid()}"
    args = ["--config", "launch/configs/tiny-debug.yaml",
            *train_overrides(shards, tok, 1, tmp_path / "run", **{
                "data.val_shards": "null", "data.manifest": shards / "manifest.json",
                "data.train_shards": f"'pipe:sleep 600; echo {marker}; cat {shards}/train-000000.tar'"})]
    p = start_job(torchrun_cmd(1, "launch/train_ddp.py", args))
    try:
        # built, and waiting for its first batch: the hung command runs (the build takes
        # 10-25 s on a loaded 2-core machine); the signal comes at once
        t0 = time.time()
        while len(process_tree(p.pid)) < 4 and p.poll() is None and time.time() - t0 < 120:
            time.sleep(0.3)
        time.sleep(0.5)
        tree = process_tree(p.pid)
        assert p.poll() is None and len(tree) >= 4  # agent, rank, loader worker, the command
        p.send_signal(signal.SIGTERM)
        t0 = time.time()
        out, _ = p.communicate(timeout=40)
        assert time.time() - t0 < 35
    finally:
        if p.poll() is None:
            kill_job(p)
    assert "without a batch" in out, out[-3000:]
    time.sleep(1)
    assert not [q for q in tree if os.path.exists(f"/proc/{q}") and _not_zombie(q)], "processes left behind"
    assert not _pgrep(marker), "the hung pipe: command outlived the run"


def _pgrep(pattern: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()


def _not_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ----------------------------------------------------------------------------- run folders

def test_a_fresh_run_into_a_used_run_dir_is_refused_unless_resumed_or_overwritten(tiny_run, shapes_shards, tmp_path):
    shards, tok, n = shapes_shards
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    args = ["--config", "launch/configs/tiny-debug.yaml", *train_overrides(shards, tok, n, run, **{"train.max_steps": 2})]
    rc, log = train_main(args)
    assert rc == 2 and "already holds checkpoints (newest step_00000004)" in log, log[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    rc, log = train_main(args + ["train.overwrite=true", "train.save_every=1"])
    assert rc == 0, log[-4000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    assert sorted(read_metrics(run)) == [1, 2]
    assert not (run / ".lock").exists()  # released on exit


def test_run_folder_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path, caplog):
    from phoclip.lock import RunLock, RunLockedError

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from phoclip.lock import RunLock; "
                               f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(120)"],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"in use by pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # its process is gone (killed: the lock file stays): stale, taken over
    b = RunLock(tmp_path)
    b.acquire()
    assert "stale lock" in caplog.text and json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    c = RunLock(tmp_path)  # the same process again (two Trainers in one program): re-entrant
    c.acquire()
    c.release()
    assert (tmp_path / ".lock").exists()
    b.release()
    assert not (tmp_path / ".lock").exists()
    # another host: live while refreshed, stale when not refreshed for long
    (tmp_path / ".lock").write_text(json.dumps({"host": "node-77", "pid": 1}))
    with pytest.raises(RunLockedError, match="node-77"):
        RunLock(tmp_path).acquire()
    old = time.time() - 7200
    os.utime(tmp_path / ".lock", (old, old))
    RunLock(tmp_path).acquire()


def test_a_second_job_is_refused_while_the_first_trains_and_ranks_die_with_their_agent(shapes_shards, tmp_path):
    shards, tok, n = shapes_shards
    run = tmp_path / "run"
    args = ["--config", "launch/configs/tiny-debug.yaml",
            *train_overrides(shards, tok, n, run, **{"train.max_steps": 400, "train.save_every": 1000})]
    p = start_job(torchrun_cmd(2, "launch/train_ddp.py", args))
    try:
        wait_for_step(run, 3, p)
        rc, log = train_main(args + ["--resume", "latest"])  # a second job, here in this process
        assert rc == 2 and "is in use by pid" in log, log[-3000:]
        # kill the torchrun agent only: its ranks get SIGTERM (parent-death signal), save
        # at the end of their step and exit, instead of training on as orphans
        ranks = [q for q in process_tree(p.pid) if q != p.pid]
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        killed_at = max(read_metrics(run))
        t0 = time.time()
        while [q for q in ranks if os.path.exists(f"/proc/{q}") and _not_zombie(q)]:
            assert time.time() - t0 < 60, "ranks outlived their agent"
            time.sleep(0.2)
    finally:
        kill_job(p)
    assert max(read_metrics(run)) <= killed_at + 2  # at most the step in flight
    ckpts = sorted(c.name for c in (run / "checkpoints").iterdir())
    assert ckpts and int(ckpts[-1][5:]) == max(read_metrics(run))  # saved where they stopped
    assert not (run / ".lock").exists()
    rc, log = train_main([a if not a.startswith("train.max_steps") else f"train.max_steps={killed_at + 4}"
                          for a in args] + ["--resume", "latest"])
    assert rc == 0 and "resumed from" in log, log[-3000:]


def test_a_checkpoint_of_an_existing_step_is_replaced_whole(tmp_path):
    from phoclip_train.checkpointer import Checkpointer

    class Eng:
        def __init__(self, v):
            self.v = v

        def save(self, folder):
            torch.save({"model": {"w": torch.tensor([self.v])}}, folder / "state.pt")

    ck = Checkpointer(tmp_path, 3, 0, 1)
    ck.save(5, Eng(1.0), {"data": {}}, {"samples_seen": 1})
    ck.save(5, Eng(2.0), {"data": {}}, {"samples_seen": 2})
    p = tmp_path / "checkpoints" / "step_00000005"
    assert torch.load(p / "state.pt", weights_only=True)["model"]["w"].item() == 2.0
    assert json.loads((p / "meta.json").read_text())["samples_seen"] == 2
    assert [c.name for c in (tmp_path / "checkpoints").iterdir()] == ["step_00000005"]


def test_resume_latest_falls_back_to_the_newest_checkpoint_that_verifies(tiny_run, tmp_path, caplog):
    from phoclip.errors import CheckpointError
    from phoclip_train.checkpointer import Checkpointer

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    newest = run / "checkpoints" / "step_00000004"
    state = newest / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # torn
    assert Checkpointer(run, 3, 0, 1).resolve("latest") == run / "checkpoints" / "step_00000002"
    assert "not resuming from step_00000004" in caplog.text and "state.pt" in caplog.text
    (run / "checkpoints" / "step_00000002" / "rank00000.pt").unlink()  # incomplete
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints"):
        Checkpointer(run, 3, 0, 1).resolve("latest")


# ----------------------------------------------------------------------------- manifests, indexes

def test_a_manifest_with_missing_keys_or_wrong_types_is_refused_naming_the_key(tiny_run, shapes_shards, tmp_path,
                                                                                capsys):
    shards = shapes_shards[0]
    d = tmp_path / "s"
    shutil.copytree(shards, d)
    man = json.loads((d / "manifest.json").read_text())
    del man["tokenizer"]["pad_id"]
    (d / "manifest.json").write_text(json.dumps(man))
    _refused(capsys, "evaluate", "--model", tiny_run, "--shards", d / "val-000000.tar",
             needles=("manifest.json: key tokenizer.pad_id is missing or not a int",))
    man["tokenizer"]["pad_id"] = 1
    man["tokenizer"]["max_length"] = "24"
    (d / "manifest.json").write_text(json.dumps(man))
    _refused(capsys, "build_index", "--model", tiny_run, "--shards", d / "val-000000.tar", "--out", tmp_path / "i",
             needles=("key tokenizer.max_length",))


def test_build_index_from_shards_checks_the_manifest_against_the_model(tiny_run, shapes_shards, tmp_path, capsys):
    d = tmp_path / "s"
    shutil.copytree(shapes_shards[0], d)
    man = json.loads((d / "manifest.json").read_text())
    man["tokenizer"]["fingerprint"] = "0" * 16
    (d / "manifest.json").write_text(json.dumps(man))
    _refused(capsys, "build_index", "--model", tiny_run, "--shards", d / "val-000000.tar", "--out", tmp_path / "i",
             needles=("do not fit the model's tokenizer",))


def test_an_index_whose_files_disagree_is_refused_and_written_whole(tiny_run, shapes_shards, tmp_path, capsys):
    from phoclip.search.index import EmbeddingIndex

    idx = tmp_path / "idx"
    _ok(capsys, "build_index", "--model", tiny_run, "--shards", shapes_shards[0] / "val-000000.tar", "--out", idx)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporary folder left
    n = EmbeddingIndex(idx).embeddings("images").shape[0]
    # one metadata row more than the part's embeddings
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = idx / "metadata" / "metadata_0000.parquet"
    good = meta.read_bytes()
    t = pq.read_table(meta)
    pq.write_table(pa.concat_tables([t, t.slice(0, 1)]), meta)
    with pytest.raises(ValueError, match=f"metadata_0000.parquet: {n + 1} rows, but index.json says part 0000 has {n}"):
        EmbeddingIndex(idx).embeddings("images")
    _refused(capsys, "search", "--index", idx, "hai hình tròn", needles=("metadata_0000.parquet", "rows, but"))
    meta.write_bytes(good)
    # a header that claims more rows than the file holds is refused, not allocated
    import io

    b = io.BytesIO()
    np.lib.format.write_array_header_1_0(b, {"descr": "<f2", "fortran_order": False, "shape": (10**9, 64)})
    (idx / "text_emb" / "text_emb_0000.npy").write_bytes(b.getvalue() + b"\0" * 128)
    with pytest.raises(ValueError, match="text_emb_0000.npy"):
        EmbeddingIndex(idx).embeddings("captions")
    # a folder that is not an index is never replaced
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "keep.jpg").write_bytes(b"mine")
    _refused(capsys, "build_index", "--model", tiny_run, "--shards", shapes_shards[0] / "val-000000.tar",
             "--out", photos, needles=("is not an index",))
    assert (photos / "keep.jpg").read_bytes() == b"mine"


def test_search_never_prints_terminal_control_characters(tiny_run, tmp_path, capsys):
    from phoclip.models.factory import load_model
    from phoclip.search.index import write_index

    model = load_model(tiny_run / "model")
    idx = tmp_path / "idx"
    emb = torch.nn.functional.normalize(torch.randn(3, model.config["embed_dim"]), dim=-1)
    write_index(idx, model, str(tiny_run / "model"), emb,
                [{"key": f"k{i}", "path": f"/x/\x1b]0;pwn\x07{i}.jpg", "caption": "\x1b[2Jxoá màn hình"}
                 for i in range(3)])
    out = _ok(capsys, "search", "--index", idx, "hai hình tròn", "--k", "3")
    assert "\x1b" not in out and "\x07" not in out and "xoá màn hình" in out
