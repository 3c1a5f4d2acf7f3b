"""What someone who can write our output folders (a shared scratch folder) could plant
there, and files handed to us that are not what they claim (a FIFO, /dev/zero, a lock
that is a folder, a model config with negative sizes): never written through to a file
outside, never trusted, never a hang or a traceback; refused in one line naming the
file, or rebuilt where it is only a cache."""
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import ROOT, make_image, run_make_shards

ARGS = ["--segmenter", "none", "--workers", "1", "--max-length", "16", "--image-size", "32"]


def _dataset(tmp_path: Path, n: int) -> tuple[Path, Path]:
    from test_sharding import _dataset as dataset

    return dataset(tmp_path, n)


def _shard(tok, out, source, *extra):
    return run_make_shards(["--source", source, "--out", out, "--tokenizer", tok, *ARGS, *map(str, extra)])


def _one_line(exc_info) -> str:
    msg = str(exc_info.value.code if isinstance(exc_info.value, SystemExit) else exc_info.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def _victims(folder: Path, n: int) -> list[Path]:
    folder.mkdir(exist_ok=True)
    out = []
    for i in range(n):
        (folder / f"victim{i}").write_text("precious")
        out.append(folder / f"victim{i}")
    return out


def _untouched(victims: list[Path]) -> None:
    for v in victims:
        assert not v.is_symlink() and v.read_text() == "precious", v


@contextmanager
def _unblocked(fifo: Path, after_s: float = 5.0):
    """If the code under test opens `fifo` and waits on it (the bug), a writer opens and
    closes it after `after_s`: the read then ends and the test fails instead of hanging."""
    stop = threading.Event()

    def writer():
        deadline = time.time() + after_s + 30
        stop.wait(after_s)
        while not stop.is_set() and time.time() < deadline:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                return
            except OSError:  # no reader (yet)
                time.sleep(0.1)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=5)


# ----------------------------------------------------------------------------- links planted at our names

def test_atomic_writes_never_write_through_links_at_temporary_or_final_names(tmp_path):
    from phoclip.fileio import atomic_write_json
    from phoclip_sharding.output import _fs, upload_atomic

    out, pid = tmp_path / "out", os.getpid()
    out.mkdir()
    victims = _victims(tmp_path / "outside", 4)
    # the writer's old predictable temporary name, and the final name itself
    os.symlink(victims[0], out / f".m.json.tmp{pid}")
    os.symlink(victims[1], out / "m.json")
    atomic_write_json(out / "m.json", {"a": 1})
    _untouched(victims)
    assert not (out / "m.json").is_symlink() and json.loads((out / "m.json").read_text()) == {"a": 1}
    # a file:// upload: its old temporary name, and the final name
    (tmp_path / "local.tar").write_bytes(b"shard")
    os.symlink(victims[2], out / f"s.tar.tmp{pid}")
    os.symlink(victims[3], out / "s.tar")
    fs, root = _fs(f"file://{out}")
    upload_atomic(fs, str(tmp_path / "local.tar"), f"{root}/s.tar")
    _untouched(victims)
    assert not (out / "s.tar").is_symlink() and (out / "s.tar").read_bytes() == b"shard"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no temporary file left


def test_a_sharding_job_never_writes_through_links_planted_in_its_output(tmp_path, tiny_tokenizer_dir):
    ann, imgs = _dataset(tmp_path, 6)
    out, pid = tmp_path / "out", os.getpid()
    out.mkdir()
    names = [f"train-000000.tar.tmp{pid}", f".manifest.json.tmp{pid}", f".sizes.json.tmp{pid}", f"..plan.tmp{pid}",
             "manifest.json", "train-000000.tar"]  # the old temporary names, then final names
    victims = _victims(tmp_path / "outside", len(names))
    for name, v in zip(names, victims):
        os.symlink(v, out / name)
    assert _shard(tiny_tokenizer_dir, out, f"coco-jsonl:{ann}:{imgs}", "--val-fraction", "0") == 0
    _untouched(victims)
    for name in ("manifest.json", "train-000000.tar"):
        assert not (out / name).is_symlink()
    assert json.loads((out / "manifest.json").read_text())["counts"]["train"] == 6
    # a folder of the job planted as a link elsewhere: refused, nothing written there
    out2 = tmp_path / "out2"
    out2.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, out2 / ".done")
    with pytest.raises(SystemExit) as e:
        _shard(tiny_tokenizer_dir, out2, f"coco-jsonl:{ann}:{imgs}")
    assert ".done: a link" in _one_line(e)
    assert list(elsewhere.iterdir()) == []


# ----------------------------------------------------------------------------- the job store

def _db(path: Path, *sql: str) -> None:
    c = sqlite3.connect(path)
    for s in sql:
        c.execute(s)
    c.commit()
    c.close()


def test_a_job_store_that_is_a_link_or_not_ours_is_refused(tmp_path, tiny_tokenizer_dir):
    ann, imgs = _dataset(tmp_path, 4)
    other = tmp_path / "other.db"
    _db(other, "CREATE TABLE records(x)", "INSERT INTO records VALUES (42)",
        "CREATE TABLE samples(y)", "INSERT INTO samples VALUES (7)")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(other, out / ".job.sqlite")
    with pytest.raises(SystemExit) as e:
        _shard(tiny_tokenizer_dir, out, f"coco-jsonl:{ann}:{imgs}")
    assert ".job.sqlite: the job store is a link; refused" in _one_line(e)
    c = sqlite3.connect(other)
    assert c.execute("SELECT * FROM records").fetchall() == [(42,)]  # was emptied with no message
    assert c.execute("SELECT * FROM samples").fetchall() == [(7,)]
    c.close()
    # a store planted by another user
    (out / ".job.sqlite").unlink()
    _db(out / ".job.sqlite", "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT)")
    if os.geteuid() != 0:
        pytest.skip("planting a file of another user needs root")
    os.chown(out / ".job.sqlite", 4242, -1)
    with pytest.raises(SystemExit) as e:
        _shard(tiny_tokenizer_dir, out, f"coco-jsonl:{ann}:{imgs}")
    assert "not by us" in _one_line(e)


@pytest.mark.parametrize("planted", [
    # every image's hash made one: 40 images would become 1 sample
    "CREATE TRIGGER collapse AFTER INSERT ON hashes BEGIN UPDATE hashes SET sha = "
    "'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa' WHERE path = NEW.path; END",
    "CREATE VIEW v AS SELECT * FROM hashes",
    "CREATE TABLE extra(x)",
])
def test_a_job_store_with_objects_we_did_not_create_is_rebuilt(tmp_path, tiny_tokenizer_dir, planted):
    ann, imgs = _dataset(tmp_path, 12)
    out = tmp_path / "out"
    out.mkdir()
    _db(out / ".job.sqlite", "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT)",
        "CREATE TABLE hashes(path TEXT PRIMARY KEY, size INTEGER, mtime INTEGER, sha TEXT, reason TEXT)", planted)
    assert _shard(tiny_tokenizer_dir, out, f"coco-jsonl:{ann}:{imgs}") == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["counts"]["train"] + man["counts"]["val"] == 12
    c = sqlite3.connect(out / ".job.sqlite")
    names = {n for (n,) in c.execute("SELECT name FROM sqlite_master")}
    c.close()
    assert not names & {"collapse", "v", "extra"}, names


# ----------------------------------------------------------------------------- locks

def test_a_lock_that_is_a_folder_or_a_fifo_or_holds_an_impossible_pid_is_one_line(tmp_path, tiny_tokenizer_dir):
    import socket

    from phoclip.errors import EXPECTED_ERRORS, one_line
    from phoclip_train.lock import RunLock, RunLockedError

    old = time.time() - 7200  # older than any staleness limit
    d = tmp_path / "run"
    (d / ".lock").mkdir(parents=True)
    os.utime(d / ".lock", (old, old))
    with pytest.raises(RunLockedError) as e:
        RunLock(d).acquire()
    assert f"{d / '.lock'}: the lock file is a folder" in one_line(e.value)
    assert (d / ".lock").is_dir()  # never removed
    ann, imgs = _dataset(tmp_path, 2)
    with pytest.raises(SystemExit) as e:  # make_shards takes the same lock
        _shard(tiny_tokenizer_dir, d, f"coco-jsonl:{ann}:{imgs}")
    assert "the lock file is a folder" in _one_line(e)

    fifo_dir = tmp_path / "fifo"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / ".lock")
    with _unblocked(fifo_dir / ".lock"), pytest.raises(RunLockedError, match="is not a regular file"):
        RunLock(fifo_dir).acquire()

    # a 20-digit pid of this host: no such process can exist (os.kill overflowed)
    p = tmp_path / "pid"
    p.mkdir()
    (p / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 10**19 + 7}))
    with pytest.raises(EXPECTED_ERRORS) as e:  # fresh: judged by its age, refused
        RunLock(p).acquire()
    assert "is in use by pid 10000000000000000007" in one_line(e.value)
    os.utime(p / ".lock", (old, old))
    lock = RunLock(p)
    lock.acquire()  # stale: taken over
    assert json.loads((p / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
