"""Shards anywhere: http(s) and pipe: shards read like local ones, manifest and sizes
from the same place (or data.manifest), a connection dropped mid-shard retried without
losing a sample, a shard that never comes skipped and counted; a 2-rank run streaming
from a local HTTP server resumes after kill -9 with the same losses."""
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import ROOT, kill9_and_resume, kill_job, read_metrics, reference_args, static_server
from http_utils import shard_server
from phoclip.data.catalog import check_shards_fit, count_samples, expand_urls, shard_name
from phoclip.data.tar import read_shards


@pytest.fixture
def server(shapes_shards):
    with shard_server(shapes_shards[0]) as srv:
        yield srv


def _keys(samples):
    return [s["__key__"] for s in samples]


def test_http_shards_read_like_local_ones_with_their_manifest(shapes_shards, server):
    shards, tok, n = shapes_shards
    base, _ = server
    local = expand_urls(f"{shards}/train-{{000000..{n - 1:06d}}}.tar")[0]
    remote = expand_urls(f"{base}/train-{{000000..{n - 1:06d}}}.tar")[0]
    skips: Counter = Counter()
    a = list(read_shards(({"url": u} for u in local), Counter()))
    b = list(read_shards(({"url": u} for u in remote), skips))
    assert _keys(a) == _keys(b) and len(a) > 100 and not skips
    assert all(x["ids.npy"] == y["ids.npy"] and x["jpg"] == y["jpg"] for x, y in zip(a, b))
    man = json.loads((shards / "manifest.json").read_text())
    fp = man["tokenizer"]["fingerprint"]
    model = {"text": {"pad_id": 1, "hf_config": {"max_position_embeddings": 130}}}  # 128 positions
    assert check_shards_fit(remote, fp, model, "tok").tokenizer.fingerprint == fp
    assert count_samples(remote) == count_samples(local) == man["counts"]["train"]
    with pytest.raises(ValueError, match="fingerprint"):
        check_shards_fit(remote, "0" * 16, model, "tok")


def test_pipe_shards_need_and_use_data_manifest(shapes_shards):
    shards, _, n = shapes_shards
    urls = [f"pipe:cat {shards}/train-{i:06d}.tar" for i in range(n)]
    assert shard_name(urls[0]) == "train-000000.tar"
    with pytest.raises(ValueError, match="data.manifest"):
        count_samples(urls)
    manifest = str(shards / "manifest.json")
    assert count_samples(urls, manifest) == count_samples(expand_urls(f"{shards}/train-{{000000..{n - 1:06d}}}.tar")[0])
    skips: Counter = Counter()
    got = list(read_shards(({"url": u} for u in urls), skips, manifest))
    assert len(got) == count_samples(urls, manifest) and not skips
    # a command that finds no object (fails at once, without a byte) is skipped and counted
    # without a retry (a missing object is not a slow one); the next shard is read
    bad = [f"pipe:cat {shards}/no-such-000000.tar", urls[0]]
    skips = Counter()
    got = list(read_shards(({"url": u} for u in bad), skips, manifest, retries=1, backoff_s=0.01))
    assert skips["unreadable_shard"] == 1 and skips["shard_retries"] == 0
    assert len(got) == json.loads((shards / "sizes.json").read_text())["train-000000.tar"]


def test_connection_dropped_mid_shard_is_retried_without_loss(shapes_shards, server):
    shards, _, n = shapes_shards
    base, handler = server
    local = expand_urls(f"{shards}/train-{{000000..{n - 1:06d}}}.tar")[0]
    remote = expand_urls(f"{base}/train-{{000000..{n - 1:06d}}}.tar")[0]
    handler.drop.update({"train-000001.tar": 1, "train-000002.tar": 2})  # drops, then recovers
    skips: Counter = Counter()
    got = list(read_shards(({"url": u} for u in remote), skips, retries=3, backoff_s=0.01))
    assert _keys(got) == _keys(read_shards(({"url": u} for u in local), Counter()))  # nothing lost or repeated
    assert skips == Counter({"shard_retries": 3})
    assert handler.served["train-000002.tar"] == 3
    # a shard whose every read dies: what came before the cut is kept once, the rest is
    # skipped and counted (unreadable + truncated); the run goes on with the next shard
    handler.drop["train-000000.tar"] = -1
    skips = Counter()
    got = _keys(read_shards(({"url": u} for u in remote[:2]), skips, retries=2, backoff_s=0.01))
    assert skips == Counter({"shard_retries": 2, "unreadable_shard": 1, "truncated_shard": 1})
    first = _keys(read_shards(({"url": local[0]},), Counter()))
    second = _keys(read_shards(({"url": local[1]},), Counter()))
    k = len(got) - len(second)
    assert 0 < k < len(first) and got == first[:k] + second


def test_item_pictures_from_remote_shards_only_where_allowed(shapes_shards, server):
    """The trainer's retrieval grid reads its own remote shards; an index handed to the
    service cannot make it fetch URLs or run pipe: commands."""
    from phoclip.search.gallery import load_item_image
    from phoclip.data.images import BadImage

    shards, _, _ = shapes_shards
    base, _ = server
    key = next(read_shards(({"url": f"{shards}/val-000000.tar"},), Counter()))["__key__"]
    item = {"shard": f"{base}/val-000000.tar", "key": key}
    assert load_item_image(item, allow_remote=True).size[0] > 0
    with pytest.raises(BadImage, match="remote_shard"):
        load_item_image(item)
    with pytest.raises(BadImage, match="remote_shard"):
        load_item_image({"shard": "pipe:touch /tmp/phoclip-pwned", "key": key}, allow_remote=True)
    assert not os.path.exists("/tmp/phoclip-pwned")


@pytest.mark.slow
def test_two_ranks_train_from_http_and_resume_after_kill9(shapes_shards, reference_run, tmp_path):
    """`python -m http.server` on 127.0.0.1 serves the shards; 2 ranks train from it in
    epoch order (not resampled), are killed with kill -9 and resume with --resume latest:
    every step's loss equals the uninterrupted reference run's (conftest.reference_run:
    the same schedule from the local files; HTTP reads the same samples in the same order)."""
    shards, tok, n = shapes_shards
    with static_server(shards) as base:
        kw = {"data.train_shards": f"{base}/train-{{000000..{n - 1:06d}}}.tar",
              "data.val_shards": f"{base}/val-000000.tar"}
        run = tmp_path / "killed"
        got = kill9_and_resume(reference_args(shapes_shards, run, False, **kw), run, reference_run, 5)
        assert got[24]["skipped_samples"] == 0
        val = read_metrics(run, "val")
        assert val and val[24]["t2i_R@1"] == read_metrics(reference_run, "val")[24]["t2i_R@1"]


@pytest.fixture
def slow_floor(monkeypatch):
    """The low-speed rule on a 1 s window (60 s in production)."""
    import phoclip.data.remote as sh

    monkeypatch.setattr(sh, "LOW_SPEED_TIME_S", 1.0)
    return sh


def test_a_shard_that_trickles_is_given_up_and_counted(shapes_shards, server, slow_floor):
    """A server sending a byte every 0.2 s never trips a per-read timeout; the low-speed
    floor gives the shard up (retried, then skipped and counted) and the next is read."""
    shards, _, n = shapes_shards
    base, handler = server
    handler.trickle.add("train-000000.tar")
    t0 = time.time()
    skips: Counter = Counter()
    got = list(read_shards(({"url": f"{base}/train-{i:06d}.tar"} for i in (0, 1)), skips,
                           retries=1, backoff_s=0.01))
    assert time.time() - t0 < 10
    assert skips["unreadable_shard"] == 1 and skips["shard_retries"] == 1
    assert _keys(got) == _keys(read_shards(({"url": f"{shards}/train-000001.tar"},), Counter()))


def test_a_pipe_command_that_hangs_is_given_up_and_its_processes_ended(shapes_shards, slow_floor):
    shards, _, _ = shapes_shards
    manifest = str(shards / "manifest.json")
    marker = f"phoclip-hang-{os.getpid()}"
    hung = f"pipe:sleep 30; echo {marker} >/dev/null; cat {shards}/train-000000.tar"
    skips: Counter = Counter()
    t0 = time.time()
    got = list(read_shards(({"url": u} for u in (hung, f"pipe:cat {shards}/train-000001.tar")), skips,
                           manifest, retries=1, backoff_s=0.01))
    assert time.time() - t0 < 10 and got
    assert skips["unreadable_shard"] == 1 and skips["shard_retries"] == 1
    time.sleep(0.3)
    left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    assert not left, "the hung command's shell or its sleep outlived the read"


def test_pipe_commands_take_sigterm_and_die_with_their_reader(shapes_shards):
    """A loader worker ignores SIGTERM; its pipe: commands must not inherit that: a job's
    SIGTERM to the process group ends them, and a reader killed -9 takes its shell along."""
    import signal

    script = ("import signal, sys, time\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "from phoclip.data.remote import open_url\n"
              "f = open_url('pipe:sleep 60; cat /dev/null')\n"
              "print(f.raw.proc.pid, flush=True)\n"
              "time.sleep(60)\n")
    for how in ("group_sigterm", "reader_kill9"):
        p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             start_new_session=True, cwd=ROOT)
        try:
            sh = int(p.stdout.readline())
            status = Path(f"/proc/{sh}/status").read_text()
            ignored = int(next(ln for ln in status.splitlines() if ln.startswith("SigIgn:")).split()[1], 16)
            assert not ignored & (1 << (signal.SIGTERM - 1)), "the command inherited an ignored SIGTERM"
            if how == "group_sigterm":
                os.killpg(p.pid, signal.SIGTERM)  # as torchrun and SLURM do
            else:
                p.kill()
            t0 = time.time()
            while _alive(sh) and time.time() - t0 < 5:
                time.sleep(0.1)
            assert not _alive(sh), how
            if how == "group_sigterm":
                assert p.poll() is None  # the reader itself ignores it, as a worker does
        finally:
            kill_job(p)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_pipe_shards_without_a_catalogue_read_without_a_training_warning(shapes_shards, caplog):
    """make_shards --source wds:'pipe:...' reads tars that have no sizes.json: no size check,
    and no warning about data.manifest (a training option) for each shard."""
    import logging

    shards, _, _ = shapes_shards
    skips: Counter = Counter()
    with caplog.at_level(logging.WARNING):
        got = list(read_shards([{"url": f"pipe:cat {shards}/train-000000.tar"}], skips))
    assert got and not skips
    assert not [r for r in caplog.records if "data.manifest" in r.getMessage()]
