"""What a hostile review of the loader, the index, the export and the small readers
found: each case reproduced in process, refused in one line or made cheap."""
import os
import itertools
import json
import time
from collections import Counter

import pytest
import torch

from http_utils import shard_server
from phoclip.data.catalog import expand_urls
from phoclip.data.stream import ShardStream, StreamConfig, StreamTracker


@pytest.fixture
def trickle_server(shapes_shards):
    with shard_server(shapes_shards[0], trickle_bytes=60) as srv:
        yield srv


@pytest.fixture
def short_floor(monkeypatch):
    """The low-speed floor on a 1 s window (60 s in production), one retry after 10 ms."""
    import phoclip.data.remote as remote
    import phoclip.data.tar as tar

    monkeypatch.setattr(remote, "LOW_SPEED_TIME_S", 1.0)
    monkeypatch.setattr(tar, "RETRIES", 1)
    monkeypatch.setattr(tar, "BACKOFF_S", 0.01)


def _epoch_stream(urls):
    return ShardStream(StreamConfig(urls=urls, weights=[1.0] * len(urls), batch_size=4, image_size=32,
                                    resampled=False, shuffle_buffer=8))


def test_a_trickling_shard_is_given_up_once_not_every_epoch(shapes_shards, trickle_server, short_floor):
    """A shard given up (the floor, then its retry) is passed over in the next epoch,
    counted and named; a stream resumed from a checkpoint replays the give-up without
    asking the server again and continues with the same batches."""
    shards, _, n = shapes_shards
    base, handler = trickle_server
    slow = "train-000001.tar"
    handler.trickle.add(slow)
    urls = expand_urls(f"{base}/train-{{000000..{n - 1:06d}}}.tar")[0]
    sizes = json.loads((shards / "sizes.json").read_text())
    per_epoch = sum(v for k, v in sizes.items() if k.startswith("train-") and k != slow) // 4  # batches
    t0 = time.time()
    batches = list(itertools.islice(iter(_epoch_stream(urls)), 2 * per_epoch - 2))  # into the second epoch's end
    took = time.time() - t0
    assert handler.served[slow] == 2, "the shard given up in the first epoch was read again in the second"
    assert took < 2 * 2.5 + 20, took
    last = batches[-1]
    assert last["skipped"]["unreadable_shard"] == 1 and last["skipped"]["passed_over_shard"] >= 1
    assert [e[1] for e in last["given_up"]] == [f"{base}/{slow}"]
    tracker = StreamTracker()
    for b in batches[:per_epoch + 2]:
        tracker.update(b)
    assert tracker.given_up_shards() == [f"{base}/{slow}"]
    resumed = _epoch_stream(urls)
    resumed.load_state_dict(tracker.state_dict())
    rest = list(itertools.islice(iter(resumed), len(batches) - per_epoch - 2))
    assert handler.served[slow] == 2, "the resumed stream asked the server for the shard it had given up"
    for a, b in zip(rest, batches[per_epoch + 2:]):
        assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"])
    assert rest[-1]["skipped"] == last["skipped"]


def test_a_new_layout_starts_with_the_old_streams_given_up_shards_passed_over():
    """Resumed on another rank count, the streams start with the shards the old ones gave
    up passed over (in the layout, so a later resume of the new layout sees the same)."""
    from phoclip.data.health import ShardMemory
    from phoclip.data.stream import StreamLayout, relayout

    urls = [f"http://h/train-{i:06d}.tar" for i in range(4)]
    old = {0: {"opened": {0: 2}, "given_up": {0: [[0, urls[1], 0], [9, urls[1], 0]]}}, 1: {"opened": {0: 2}}}
    for resampled in (True, False):
        layout = relayout(urls, 0, resampled, StreamLayout(), 2, 1, old, salt=7)
        assert layout.given_up == {urls[1]: 2}
        assert StreamLayout.from_state(layout.state_dict()).given_up == {urls[1]: 2}
    skips: Counter = Counter()
    memory = ShardMemory(len(urls), skips, seeded={urls[1]: 2})

    class _Opened:
        opened = 0

    def numbered(n):
        for i in range(n):
            _Opened.opened = i + 1
            yield {"url": urls[i % 4]}
    chosen = [sh["url"] for sh in memory.choose(numbered(24), _Opened)]
    assert urls[1] not in chosen[:12] and chosen.count(urls[1]) == 2  # passed over for 4 x 4 choices
    assert skips == {"passed_over_shard": 4}


# ---------------------------------------------------------------- an --out that is not our index


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer_dir, tmp_path_factory):
    from conftest import make_image
    from test_serve_hostile import _tiny_model_folder

    d = tmp_path_factory.mktemp("round4_model")
    _tiny_model_folder(tiny_tokenizer_dir, d / "model")
    for i in range(3):
        make_image(d / "photos" / f"p{i}.jpg", i)
    return d


def _user_folder(path, index_json="{}"):
    path.mkdir()
    if index_json is not None:
        (path / "index.json").write_text(index_json)
    for i in range(22):
        (path / f"thesis{i}.txt").write_text("precious")
    return sorted(os.listdir(path))


def test_index_out_that_is_not_our_index_is_refused_never_deleted(tiny_model, tmp_path, capsys):
    """A folder that merely holds a file named index.json (or our index plus the user's
    files) is refused in one line, with every file where it was, by the command and by
    write_index (which replaces a folder whole)."""
    from phoclip.search.index import write_index
    from phoclip_cli import build_index

    d = tiny_model
    base = ["--model", str(d / "model"), "--images", str(d / "photos")]
    mine = tmp_path / "mine"
    before = _user_folder(mine)
    assert build_index.main(base + ["--out", str(mine)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if str(mine) in ln]
    assert len(err) == 1 and "not an index" in err[0], err
    assert sorted(os.listdir(mine)) == before and (mine / "index.json").read_text() == "{}"
    with pytest.raises(ValueError, match="not an index"):
        write_index(mine, torch.nn.Linear(1, 1), "m", torch.zeros(0, 64), [])
    assert sorted(os.listdir(mine)) == before
    # our own index, then the user's files beside it: refused too, nothing removed
    ours = tmp_path / "ours"
    assert build_index.main(base + ["--out", str(ours)]) == 0
    capsys.readouterr()
    (ours / "notes.txt").write_text("mine")
    assert build_index.main(base + ["--out", str(ours)]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (ours / "notes.txt").read_text() == "mine"
    (ours / "notes.txt").unlink()
    assert build_index.main(base + ["--out", str(ours)]) == 0  # our index alone is rebuilt in place


# ---------------------------------------------------------------- phoclip-export and links


def _plant(out, victims):
    """Links in an export folder, at the names an export writes, to files elsewhere."""
    (out / "tokenizer").mkdir(parents=True)
    for name in ("model.safetensors", "model.safetensors.tmp", "phoclip_config.json", "README.md",
                 "tokenizer/vocab.txt", "tokenizer/bpe.codes", "tokenizer/tokenizer_config.json"):
        v = victims / name.replace("/", "_")
        v.write_text("victim")
        os.symlink(v, out / name)


def test_export_never_writes_through_links_planted_in_its_folder(tiny_model, tmp_path):
    """Every file an export writes goes through an exclusive temporary name and a rename:
    links planted in an existing folder are replaced, their targets untouched (model
    folder copied, and a model saved)."""
    from phoclip.models.factory import load_model
    from phoclip_train.export import export

    victims = tmp_path / "victims"
    victims.mkdir()
    for i, write in enumerate((lambda out: export(tiny_model / "model", out),
                               lambda out: load_model(tiny_model / "model").save_pretrained(
                                   out, tokenizer=_tokenizer(tiny_model / "model")))):
        out = tmp_path / f"out{i}"
        _plant(out, victims)
        write(out)
        assert all(v.read_text() == "victim" for v in victims.iterdir()), "a file outside the export was written"
        for f in ("model.safetensors", "phoclip_config.json", "README.md", "tokenizer/vocab.txt"):
            assert not (out / f).is_symlink() and (out / f).stat().st_size > 0, f
        assert not (out / "model.safetensors.tmp").exists() or (out / "model.safetensors.tmp").is_symlink()
        load_model(out)


def _tokenizer(folder):
    from phoclip.data.text import load_tokenizer

    return load_tokenizer(str(folder / "tokenizer"))


def test_export_refuses_an_input_model_folder_holding_links(tiny_model, tmp_path, capsys):
    """A model folder whose file is a link (to another user's private key) is refused in
    one line; its target's bytes reach no exported file."""
    import shutil

    from phoclip_cli import export as export_cli

    src = tmp_path / "model"
    shutil.copytree(tiny_model / "model", src)
    key = tmp_path / "id_ed25519"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----secret")
    os.symlink(key, src / "notes.txt")
    out = tmp_path / "out"
    assert export_cli.main([str(src), str(out)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "notes.txt" in ln]
    assert len(err) == 1 and "link" in err[0], err
    assert not any("secret" in f.read_text(errors="replace") for f in out.rglob("*") if f.is_file())


# ---------------------------------------------------------------- shard patterns and tar headers


def _alarm(seconds):
    import signal

    def fire(*_):
        raise TimeoutError(f"still expanding after {seconds} s")

    signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)


def test_a_brace_pattern_of_a_billion_shards_is_counted_not_expanded():
    """braceexpand's product materialises its ranges: 10^9 names are refused from the
    ranges' sizes, in one line naming the flag, before any name is made."""
    import signal

    from phoclip.data.catalog import MAX_SHARDS, brace_count

    assert brace_count("a/train-{000000..000009}.tar") == 10
    assert brace_count("python{2.{5..7},3.{2,3}}") == 5 and brace_count("{a..g..2}{x,y}") == 8
    assert brace_count(r"x\{1..3}") == 1 and brace_count("{4..1}") == 4 and brace_count("{1,{2..4}}") == 4
    _alarm(10)
    try:
        with pytest.raises(ValueError, match="data.train_shards") as e:
            expand_urls("http://h/train-{000000000..999999999}.tar", flag="data.train_shards")
        assert "1,000,000,000" in str(e.value) and len(str(e.value).splitlines()) == 1
        with pytest.raises(ValueError, match="--shards"):
            expand_urls("::".join([f"http://h/{i}-{{0..{MAX_SHARDS // 2}}}.tar" for i in range(2)]), flag="--shards")
    finally:
        signal.alarm(0)
    for pattern in ("a/{0..9}.tar", "python{2.{5..7},3.{2,3}}", "{a..g..2}{x,y}", "{1,{2..4}}", "{-3..3..2}"):
        import braceexpand

        assert brace_count(pattern) == len(list(braceexpand.braceexpand(pattern))), pattern


def _gzip_long_name_shard(path, claimed):
    """A gzip tar whose first header is a GNU long name claiming `claimed` bytes (zeros,
    so it compresses to almost nothing), then a regular member."""
    import tarfile
    import zlib

    ti = tarfile.TarInfo("././@LongLink")
    ti.type, ti.size = tarfile.GNUTYPE_LONGNAME, claimed
    z = zlib.compressobj(1, zlib.DEFLATED, 31)
    with open(path, "wb") as f:
        f.write(z.compress(ti.tobuf(tarfile.GNU_FORMAT)))
        block = bytes(1 << 20)
        for _ in range(claimed >> 20):
            f.write(z.compress(block))
        f.write(z.compress(bytes(claimed % (1 << 20) + (-claimed) % 512)))
        f.write(z.compress(bytes(1024)))
        f.write(z.flush())


def test_a_long_name_header_claiming_gigabytes_is_not_read_into_memory(tmp_path):
    """Training and evaluation read shards through tar_files: a GNU long-name header is
    refused from its size field (the shard counted corrupt), never read whole."""
    import tracemalloc

    from phoclip.data.tar import read_shards

    shard = tmp_path / "train-000000.tar"
    _gzip_long_name_shard(shard, 300 << 20)
    assert shard.stat().st_size < 2 << 20
    skips: Counter = Counter()
    tracemalloc.start()
    try:
        got = list(read_shards([{"url": str(shard)}], skips))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == [] and skips["corrupt_shard"] == 1
    assert peak < 32 << 20, f"{peak >> 20} MiB held reading a {shard.stat().st_size >> 10} KiB shard"


# ---------------------------------------------------------------- one line, not a traceback


def test_a_model_folder_naming_an_unknown_timm_architecture_is_refused_in_one_line(tiny_model, tmp_path):
    import json
    import shutil

    import phoclip

    folder = tmp_path / "model"
    shutil.copytree(tiny_model / "model", folder)
    cfg = json.loads((folder / "phoclip_config.json").read_text())
    cfg["vision"]["timm_model"] = "resnet_does_not_exist"
    (folder / "phoclip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        phoclip.load(str(folder))
    msg = str(e.value)
    assert "resnet_does_not_exist" in msg and str(folder) in msg and len(msg.splitlines()) == 1


@pytest.mark.parametrize("plant", ["vocab_fifo", "bpe_dev_zero", "config_fifo"])
def test_a_tokenizer_folder_with_a_fifo_or_a_link_to_dev_zero_is_refused_at_once(tiny_tokenizer_dir, tmp_path, plant):
    """Only regular files of a bounded size are handed to the tokenizer: a FIFO (which
    blocks for ever) or a link to /dev/zero (which never ends) is one line naming it."""
    import shutil
    import signal

    from phoclip.data.text import load_tokenizer

    tok = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer_dir, tok)
    name = {"vocab_fifo": "vocab.txt", "bpe_dev_zero": "bpe.codes", "config_fifo": "tokenizer_config.json"}[plant]
    (tok / name).unlink()
    if plant.endswith("fifo"):
        os.mkfifo(tok / name)
    else:
        os.symlink("/dev/zero", tok / name)
    _alarm(20)
    try:
        with pytest.raises((OSError, ValueError, RuntimeError)) as e:
            load_tokenizer(str(tok))
    finally:
        signal.alarm(0)
    assert not isinstance(e.value, TimeoutError), "the tokenizer blocked on the file"
    assert name in str(e.value) and len(str(e.value).splitlines()) <= 2


@pytest.mark.parametrize("summary", [{"zero_stage": 2}, {"zero_stage": 2, "params": []},
                                     {"zero_stage": 2, "params": {"w": {"fp32": "x"}}, "groups": [],
                                      "scheduler": {"last_epoch": 0, "base_lrs": []}}])
def test_a_deepspeed_state_summary_of_another_shape_is_refused_when_read(tmp_path, summary):
    """Checked as it is read (one line naming it), not a KeyError after DeepSpeed's load."""
    import json

    from phoclip.errors import CheckpointError
    from phoclip_train.ds_state import read_state_summary

    f = tmp_path / "deepspeed_state.json"
    f.write_text(json.dumps(summary))
    with pytest.raises(CheckpointError, match="not a DeepSpeed state summary") as e:
        read_state_summary(f)
    assert str(f) in str(e.value) and len(str(e.value).splitlines()) == 1
    good = {"zero_stage": 2, "world_size": 2, "step": [3.0, 3.0], "params": {"w": {"fp32": [1.0, 2.0]}},
            "numel": {"w": 4}, "buffers": {}, "groups": [{"lr": 0.1}], "scheduler": {"last_epoch": 3, "base_lrs": [0.1]},
            "global_steps": 3}
    f.write_text(json.dumps(good))
    assert read_state_summary(f) == good


def test_plot_reads_a_long_metrics_file_in_bounded_memory(tmp_path):
    """phoclip-plot keeps only what it draws, thinned per curve: a file of 60,000 lines of
    1.5 KB each is read holding a few MB, and the curve keeps its first and newest steps."""
    import json
    import tracemalloc

    from phoclip_train.plots import MAX_KEPT, read_metrics, render_curves

    pad = "x" * 1500
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for s in range(1, 60_001):
            f.write(json.dumps({"kind": "train", "step": s, "loss": 1 / s, "lrs": {"head": 1e-3}, "note": pad}) + "\n")
            if s % 5000 == 0:
                f.write(json.dumps({"kind": "val", "step": s, "t2i_R@1": s / 1000, "note": pad}) + "\n")
    tracemalloc.start()
    try:
        m = read_metrics(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak >> 20} MiB held for the curves"
    xs, ys = m.series("train", "loss")
    assert len(xs) <= MAX_KEPT + 1 and xs[-1] == 60_000 and xs[0] == 1 and ys[-1] == 1 / 60_000
    assert m.series("val", "t2i_R@1")[0] == list(range(5000, 60_001, 5000))
    assert render_curves(tmp_path).read_bytes()[:4] == b"\x89PNG"


def test_a_deepspeed_checkpoint_with_a_damaged_state_summary_is_refused_before_any_model_is_built(
        shapes_shards, tmp_path, monkeypatch):
    """--resume of a DeepSpeed checkpoint whose deepspeed_state.json has another shape: the
    resolution refuses it in one line (every rank gets the answer), before the model, the
    engine or DeepSpeed's load are built."""
    import json

    import phoclip_train.run as run_module
    from conftest import TINY, train_main, train_overrides
    from phoclip.errors import CheckpointError
    from phoclip_train.checkpointer import Checkpointer

    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    (ckpt / "deepspeed").mkdir(parents=True)
    torch.save({}, ckpt / "rank00000.pt")
    torch.save({"module": {"w": torch.ones(2)}}, ckpt / "deepspeed" / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {}}, ckpt / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (ckpt / "meta.json").write_text(json.dumps({"step": 2, "world_size": 1}))
    (ckpt / "deepspeed_state.json").write_text(json.dumps({"zero_stage": 2}))
    for resume in ("latest", str(ckpt)):
        with pytest.raises(CheckpointError, match="deepspeed_state.json: not a DeepSpeed state summary"):
            Checkpointer(tmp_path / "run", 3, 0, 1).resolve(resume)

    def built(*a, **k):
        raise AssertionError("the model was built before the checkpoint was checked")

    monkeypatch.setattr(run_module, "build_model", built)
    shards, tok, n = shapes_shards
    rc, log = train_main(["--config", TINY, "--resume", str(ckpt),
                          *train_overrides(shards, tok, n, tmp_path / "run", **{"train.max_steps": 4})])
    assert rc == 2, log[-2000:]
    assert "deepspeed_state.json: not a DeepSpeed state summary" in log and "AssertionError" not in log, log[-2000:]
