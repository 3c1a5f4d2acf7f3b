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

from conftest import ROOT, make_image, refusal, run_make_shards

ARGS = ["--segmenter", "none", "--workers", "1", "--max-length", "16", "--image-size", "32"]


def _dataset(tmp_path: Path, n: int) -> tuple[Path, Path]:
    from test_sharding import _dataset as dataset

    return dataset(tmp_path, n)


def _shard(tok, out, source, *extra):
    return run_make_shards(["--source", source, "--out", out, "--tokenizer", tok, *ARGS, *map(str, extra)])


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
    assert ".done: a link" in refusal(_shard, tiny_tokenizer_dir, out2, f"coco-jsonl:{ann}:{imgs}")
    assert list(elsewhere.iterdir()) == []


# ----------------------------------------------------------------------------- --merge and part manifests

@pytest.fixture(scope="module")
def parted(tmp_path_factory, tiny_tokenizer_dir):
    """A 40-image job made in 2 parts (not merged), and part 1 of the same sources made
    as a 3-part job."""
    d = tmp_path_factory.mktemp("parted")
    ann, imgs = _dataset(d, 40)
    src = f"coco-jsonl:{ann}:{imgs}"
    for i in (0, 1):
        _shard(tiny_tokenizer_dir, d / "two", src, "--num-parts", 2, "--part", i, "--shard-size", 6)
    _shard(tiny_tokenizer_dir, d / "three", src, "--num-parts", 3, "--part", 1, "--shard-size", 6)
    return d


def _edit(path: Path, fn) -> None:
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def _plant_outside_shard(out: Path) -> None:
    """A shard name leading out of the part folder, with a count that adds up."""
    (out.parent / "secret.tar").write_text("outside")
    first = _first_train(out)
    _edit(out / "part-0000" / "manifest.json",
          lambda m: m["shards"]["train"].__setitem__(m["shards"]["train"].index(first), "../../secret.tar"))
    _edit(out / "part-0000" / "sizes.json", lambda s: s.update({"../../secret.tar": s[first]}))


def _first_train(out: Path) -> str:
    return sorted(p.name for p in (out / "part-0000").glob("train-*.tar"))[0]


def _other_num_parts(out: Path) -> None:
    shutil.rmtree(out / "part-0001")
    shutil.copytree(out.parent / "three" / "part-0001", out / "part-0001")


def _listed_twice(out: Path) -> None:
    _edit(out / "part-0000" / "manifest.json", lambda m: m["shards"]["train"].append(m["shards"]["train"][0]))


def _sizes_disagree(out: Path) -> None:
    _edit(out / "part-0000" / "sizes.json", lambda s: s.update({_first_train(out): s[_first_train(out)] + 5}))


def _deeply_nested(out: Path) -> None:
    (out / "part-0001" / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)


def _part_folder_link(out: Path) -> None:
    shutil.move(out / "part-0001", out.parent / "p1-elsewhere")
    os.symlink(out.parent / "p1-elsewhere", out / "part-0001")


def _shard_is_a_link(out: Path) -> None:
    shard = out / "part-0000" / _first_train(out)
    (out.parent / "secret.tar").write_bytes(shard.read_bytes())
    shard.unlink()
    os.symlink(out.parent / "secret.tar", shard)


@pytest.mark.parametrize("damage, message", [
    (_plant_outside_shard, r"part-0000/manifest.json: train shard name '\.\./\.\./secret\.tar' is not a plain"),
    (_other_num_parts, r"part-0001/manifest.json: part of a 3-part job, but .*part-0000/manifest.json is of a 2-part"),
    (_listed_twice, r"part-0000/manifest.json: train shard train-\d{6}\.tar is listed more than once"),
    (_sizes_disagree, r"part-0000/manifest.json: counts.train is \d+ but its shards hold \d+ samples"),
    (_deeply_nested, r"part-0001/manifest.json: JSON nested too deeply"),
    (_part_folder_link, r"part-0001: a link, not a part folder"),
    (_shard_is_a_link, r"part-0000/train-\d{6}\.tar: not a regular file"),
])
def test_merge_refuses_part_manifests_it_cannot_trust(parted, tmp_path, damage, message):
    out = tmp_path / "job" / "out"
    shutil.copytree(parted / "two", out, symlinks=True)
    shutil.copytree(parted / "three", out.parent / "three", symlinks=True)
    damage(out)
    line = refusal(run_make_shards, ["--merge", out])
    assert __import__("re").search(message, line), line
    assert not (out / "manifest.json").exists()
    secret = tmp_path / "job" / "secret.tar"
    if secret.exists():  # nothing from outside was linked into OUT
        assert not [p for p in out.glob("*.tar") if os.path.samefile(p, secret)]


def test_merge_replaces_a_link_planted_at_a_merged_name(parted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(parted / "two", out, symlinks=True)
    target = tmp_path / "outside" / "made.tar"
    target.parent.mkdir()
    os.symlink(target, out / "train-000000.tar")  # dangling: a copy through it would create `target`
    assert run_make_shards(["--merge", out]) == 0
    assert not target.exists() and not (out / "train-000000.tar").is_symlink()
    man = json.loads((out / "manifest.json").read_text())
    assert man["counts"]["train"] + man["counts"]["val"] == 40


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
    assert ".job.sqlite: the job store is a link; refused" in refusal(_shard, tiny_tokenizer_dir, out,
                                                                       f"coco-jsonl:{ann}:{imgs}")
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
    assert "not by us" in refusal(_shard, tiny_tokenizer_dir, out, f"coco-jsonl:{ann}:{imgs}")


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


# ----------------------------------------------------------------------------- captions and annotation files

def test_captions_are_cut_before_normalisation_and_segmentation(tmp_path, tiny_tokenizer_dir):
    from phoclip.data.text import TextProcessor, load_tokenizer

    cap = 10_000  # "a few thousand characters": far beyond what max_length tokens could use

    seen = []

    class Recording:
        name, version = "rec", "0"

        def segment(self, texts):
            seen.extend(len(t) for t in texts)
            return list(texts)

    proc = TextProcessor(load_tokenizer(str(tiny_tokenizer_dir)), Recording(), 16)
    _, ids = proc(["con chó " * 100_000, "một con mèo"])
    assert ids.shape == (2, 16) and 1000 < max(seen) <= cap

    # at sharding (and benchmark reading: the same readers): cut as read, counted
    imgs = tmp_path / "imgs"
    make_image(imgs / "a.jpg", 1)
    make_image(imgs / "b.jpg", 2)
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"image": "a.jpg", "caption": "con chó " * 25_000}, ensure_ascii=False) + "\n"
        + json.dumps({"image": "b.jpg", "caption": "một con mèo"}, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out"
    _shard(tiny_tokenizer_dir, out, f"coco-jsonl:{tmp_path / 'a.jsonl'}:{imgs}", "--val-fraction", "0")
    man = json.loads((out / "manifest.json").read_text())
    assert man["skipped"]["long_caption_cut"] == 1 and man["counts"]["train"] == 2
    from conftest import read_all

    raw = sorted((json.loads(s["json"])["captions_raw"][0] for s in read_all(out).values()), key=len)
    assert raw[0] == "một con mèo" and 1000 < len(raw[1]) <= cap and raw[1].startswith("con chó con chó")


def test_annotation_files_that_are_not_regular_or_too_large_are_refused_in_one_line(tmp_path, tiny_tokenizer_dir):
    from phoclip.data.datasets import read_source
    from phoclip.data.sources import SourceSpec

    imgs = tmp_path / "imgs"
    make_image(imgs / "a.jpg", 1)
    fifo = tmp_path / "ann.jsonl"
    os.mkfifo(fifo)
    with _unblocked(fifo):
        line = refusal(_shard, tiny_tokenizer_dir, tmp_path / "o1", f"coco-jsonl:{fifo}:{imgs}")
    assert f"annotation file {fifo} is not a regular file" in line
    # the reader itself (what evaluate.py --benchmark calls), given the FIFO directly
    with _unblocked(fifo):
        with pytest.raises(OSError, match="not a regular file"):
            list(read_source(SourceSpec("coco-jsonl", fifo, imgs)))
    # a file over the cap is refused unread
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"image": "a.jpg", "caption": "một con mèo"}, ensure_ascii=False) * 10)
    line = refusal(_shard, tiny_tokenizer_dir, tmp_path / "o2", f"coco-jsonl:{big}:{imgs}", "--max-annotation-bytes", 100)
    assert f"{big}: {big.stat().st_size} bytes, over the 100-byte cap" in line


def test_an_annotation_file_that_is_dev_zero_is_refused_not_read(tmp_path, tiny_tokenizer_dir):
    """In a process of its own with its memory capped: reading /dev/zero never ends."""
    imgs = tmp_path / "imgs"
    make_image(imgs / "a.jpg", 1)
    os.symlink("/dev/zero", tmp_path / "ann.jsonl")
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
            "from phoclip_cli.shards import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "--source", f"coco-jsonl:{tmp_path / 'ann.jsonl'}:{imgs}",
                        "--out", str(tmp_path / "o"), "--tokenizer", str(tiny_tokenizer_dir), *ARGS],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ, USE_TORCH="0"))
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "ann.jsonl is not a regular file" in r.stderr.strip().splitlines()[-1], r.stderr[-3000:]


def test_images_held_in_hostile_tars_are_cached_inside_the_cache_folder(tmp_path):
    """A wds tar member named `../../x.jpg` (its key holds the path) is cached under a
    hashed name inside the job's cache, not written outside it."""
    from phoclip.data.sources import SourceSpec
    from phoclip.data.webdata import _cache_image

    spec = SourceSpec("wds", Path("x.tar"), None, cache_dir=tmp_path / "out" / ".sources" / "00-wds")
    for rel in ("x.tar/../../../../evil.jpg", f"{tmp_path}/abs/evil.jpg", "x.tar/" + "a" * 300 + ".jpg"):
        path = _cache_image(spec, rel, b"image bytes")
        assert path.resolve().is_relative_to(spec.cache_dir.resolve()) and path.read_bytes() == b"image bytes"
    assert not list(tmp_path.glob("**/evil.jpg"))
    os.symlink(tmp_path, spec.cache_dir / "linked")  # a folder on the way planted as a link
    with pytest.raises(OSError, match="linked: a link"):
        _cache_image(spec, "linked/a.jpg", b"image bytes")
    assert not (tmp_path / "a.jpg").exists()


# ----------------------------------------------------------------------------- locks

def test_a_lock_that_is_a_folder_or_a_fifo_or_holds_an_impossible_pid_is_one_line(tmp_path, tiny_tokenizer_dir):
    import socket

    from phoclip.errors import EXPECTED_ERRORS, one_line
    from phoclip.lock import RunLock, RunLockedError

    old = time.time() - 7200  # older than any staleness limit
    d = tmp_path / "run"
    (d / ".lock").mkdir(parents=True)
    os.utime(d / ".lock", (old, old))
    with pytest.raises(RunLockedError) as e:
        RunLock(d).acquire()
    assert f"{d / '.lock'}: the lock file is a folder" in one_line(e.value)
    assert (d / ".lock").is_dir()  # never removed
    ann, imgs = _dataset(tmp_path, 2)
    # make_shards takes the same lock
    assert "the lock file is a folder" in refusal(_shard, tiny_tokenizer_dir, d, f"coco-jsonl:{ann}:{imgs}")

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


# ----------------------------------------------------------------------------- model configs

def _checkpoint(folder: Path, meta: dict) -> Path:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.save({}, folder / "rank00000.pt")
    torch.save({"model": {}}, folder / "state.pt")
    (folder / "meta.json").write_text(json.dumps(dict({"step": 1, "world_size": 1}, **meta)))
    return folder


def _model_folder(folder: Path, edit) -> Path:
    from phoclip.models.factory import CONFIG_DIR
    from phoclip.models.pretrained import CONFIG_NAME

    cfg = json.loads((CONFIG_DIR / "tiny-debug.json").read_text())
    edit(cfg)
    folder.mkdir(parents=True)
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("make, message", [
    (lambda d: _checkpoint(d, {}), "meta.json: no 'model_config'"),
    (lambda d: _checkpoint(d, {"model_config": {"embed_dim": -1}}),
     "meta.json model_config: model config embed_dim must be a positive integer, not -1"),
    (lambda d: _model_folder(d, lambda c: c.pop("embed_dim")),
     "phoclip_config.json: model config embed_dim must be a positive integer, not None"),
    (lambda d: _model_folder(d, lambda c: c["text"]["hf_config"].update(hidden_size=-64)),
     "phoclip_config.json: model config text.hf_config.hidden_size must be a positive integer, not -64"),
    (lambda d: _model_folder(d, lambda c: c["vision"].update(image_size=0)),
     "phoclip_config.json: model config vision.image_size must be a positive integer, not 0"),
])
def test_model_configs_that_cannot_be_built_are_refused_in_one_line(tmp_path, make, message):
    import phoclip
    from phoclip.errors import EXPECTED_ERRORS, one_line
    from phoclip.models.loading import model_from_checkpoint

    folder = make(tmp_path / "m")
    with pytest.raises(EXPECTED_ERRORS) as e:  # what the entry points print in one line
        # a checkpoint (meta.json) as export reads it; a model folder through the one inference loader
        (model_from_checkpoint(folder) if (folder / "meta.json").exists()
         else phoclip.load(folder))
    assert f"{folder}/" in one_line(e.value) and message in one_line(e.value), one_line(e.value)


def test_checkpoint_files_never_write_through_planted_links(tmp_path):
    """A run folder others can write: links at the save's temporary folder or at a rank
    file's name are replaced, never written through."""
    import torch

    from phoclip_train.checkpointer import Checkpointer

    class _Engine:  # the checkpointer only asks the engine to write its files into a folder
        def save(self, folder):
            torch.save({"w": torch.ones(2)}, folder / "model.pt")

    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step_00000002.tmp").symlink_to(outside, target_is_directory=True)
    ck = Checkpointer(run, 3, 0, 1)
    final = ck.save(2, _Engine(), {"data": {}}, {"note": "x"})
    assert victim.read_text() == "precious" and sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    assert (final / "rank00000.pt").is_file() and not (final / "rank00000.pt").is_symlink()
    # a link at the final rank file's name in a re-save of the same step is replaced
    (final / "rank00000.pt").unlink()
    (final / "rank00000.pt").symlink_to(victim)
    ck.save(2, _Engine(), {"data": {}}, {"note": "y"})
    assert victim.read_text() == "precious"


def test_a_local_shard_that_is_a_fifo_is_skipped_not_waited_on(tmp_path):
    """make_shards --source wds: and training read local tars; a FIFO at a shard's name
    blocked the reader for ever."""
    from collections import Counter

    from phoclip.data.tar import read_shards

    fifo = tmp_path / "train-000000.tar"
    os.mkfifo(fifo)
    skips: Counter = Counter()
    t0 = time.time()
    assert list(read_shards([{"url": str(fifo)}], skips)) == []
    assert time.time() - t0 < 5 and skips["corrupt_shard"] == 1


def test_index_and_onnx_exports_never_write_through_links_at_their_old_temporary_names(
        tmp_path, tiny_tokenizer_dir):
    """The index's temporary folder and the ONNX exporter's temporary file have random
    names, created exclusively: a link planted at a predictable name is never followed."""
    import torch

    import phoclip
    from phoclip.search.index import EmbeddingIndex, write_index
    from phoclip.models.onnx import export_onnx
    from phoclip.data.text import load_tokenizer

    tok = load_tokenizer(str(tiny_tokenizer_dir))
    model = phoclip.create_model("tiny-debug", embed_dim=16, text={"hf_config": {"vocab_size": len(tok)}}).eval()
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_text("precious")
    out = tmp_path / "index"
    (tmp_path / f".index.tmp{os.getpid()}").symlink_to(outside, target_is_directory=True)
    emb = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    write_index(out, model, "m", emb, [{"key": str(i), "path": "", "caption": ""} for i in range(3)])
    assert EmbeddingIndex(out).embeddings("images").shape == (3, 16)
    model_dir = tmp_path / "model"
    (model_dir / "onnx").mkdir(parents=True)
    for kind in ("image", "text"):
        (model_dir / "onnx" / f".{kind}.onnx.tmp").symlink_to(victim)
    export_onnx(model, model_dir)
    assert victim.read_text() == "precious" and sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (model_dir / "onnx" / "text.onnx").stat().st_size > 1000


def test_an_index_array_with_a_malformed_header_is_refused_in_one_line(tmp_path, tiny_tokenizer_dir):
    """An unclosed bracket in an index array's .npy header (decode_ids' case) is a
    refusal naming the file, not numpy's tokenize.TokenError traceback."""
    import torch

    import phoclip
    from phoclip.search.index import EmbeddingIndex, write_index
    from phoclip.data.text import load_tokenizer

    tok = load_tokenizer(str(tiny_tokenizer_dir))
    model = phoclip.create_model("tiny-debug", embed_dim=16, text={"hf_config": {"vocab_size": len(tok)}}).eval()
    out = tmp_path / "index"
    write_index(out, model, "m", torch.nn.functional.normalize(torch.randn(3, 16), dim=-1),
                [{"key": str(i), "path": "", "caption": ""} for i in range(3)])
    f = out / "img_emb" / "img_emb_0000.npy"
    f.write_bytes(f.read_bytes().replace(b"(3, 16)", b"(3, 16 ", 1))
    with pytest.raises(ValueError, match=r"img_emb_0000.npy: unreadable .npy header \(SyntaxError\)$"):
        EmbeddingIndex(out).embeddings("images")
