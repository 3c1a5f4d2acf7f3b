"""A brace range that matches no shard is refused naming the flag of the command that was
run; a remote shard that does not exist is skipped at once, not retried as if slow."""
import http.server
import threading
import time
from collections import Counter

import pytest

from conftest import launch_main, refusal, root_logging_kept, train_args, train_main
from phoclip.data.catalog import expand_urls
from phoclip.data.tar import read_shards

PLACEHOLDER = "train-{000000..000099}.tar"  # the docs' range on a small dataset: most shards do not exist


def test_expand_urls_names_the_flag_it_is_given(shapes_shards):
    shards, _, _ = shapes_shards
    with pytest.raises(FileNotFoundError) as e:
        expand_urls(f"{shards}/{PLACEHOLDER}", flag="--shards")
    assert "check --shards" in str(e.value) and "data.train_shards" not in str(e.value)
    assert "shard folder" in str(e.value)
    assert len(expand_urls(str(shards))[0]) >= 1  # the folder form the message points to


def test_training_names_its_config_key(shapes_shards, tmp_path):
    shards, _, _ = shapes_shards
    bad = {"data.val_shards": f"{shards}/val-{{000000..000004}}.tar"}
    rc, log = train_main(train_args(shapes_shards, tmp_path / "run", **bad))
    assert rc == 2 and "check data.val_shards" in log.strip().splitlines()[-1], log[-2000:]


@pytest.mark.parametrize("script", ["evaluate", "build_index"])
def test_inference_commands_name_their_flag(script, shapes_shards, tiny_run, tmp_path):
    shards, _, _ = shapes_shards
    argv = ["--model", str(tiny_run), "--shards", f"{shards}/{PLACEHOLDER}", "--out", str(tmp_path / "out")]
    line = refusal(launch_main, script, argv)
    assert "check --shards" in line and "data.train_shards" not in line, line


def test_make_shards_names_its_source(make_shards, shapes_shards, tiny_tokenizer_dir, tmp_path):
    from phoclip_cli.shards import main

    shards, _, _ = shapes_shards
    with root_logging_kept():
        line = refusal(main, ["--source", f"wds:{shards}/{PLACEHOLDER}", "--out", str(tmp_path / "out"),
                              "--tokenizer", str(tiny_tokenizer_dir), "--segmenter", "none", "--workers", "1"])
    assert "check --source wds:" in line and "data.train_shards" not in line, line


def test_a_pipe_command_that_finds_no_object_is_not_retried(shapes_shards):
    shards, _, _ = shapes_shards
    skips: Counter = Counter()
    t0 = time.monotonic()
    got = list(read_shards([{"url": f"pipe:cat {shards}/no-such-{i:06d}.tar"} for i in range(3)]
                           + [{"url": f"pipe:cat {shards}/train-000000.tar"}], skips,
                           str(shards / "manifest.json"), retries=3, backoff_s=1.0))
    assert time.monotonic() - t0 < 3  # retried, each would have waited 1 + 2 + 4 s
    assert skips["unreadable_shard"] == 3 and skips["shard_retries"] == 0 and got


def test_a_pipe_command_that_fails_at_once_for_another_reason_is_retried():
    """Only a failure that says the object is missing skips the retries: a refused
    connection (curl's exit 7) may pass, so it is retried."""
    skips: Counter = Counter()
    cmd = "echo 'curl: (7) Failed to connect to 127.0.0.1 port 9: Connection refused' >&2; exit 7"
    list(read_shards([{"url": f"pipe:{cmd}"}], skips, retries=2, backoff_s=0.01))
    assert skips["shard_retries"] == 2 and skips["unreadable_shard"] == 1


def test_a_pipe_command_that_failed_after_sending_bytes_is_retried(shapes_shards, tmp_path):
    shards, _, _ = shapes_shards
    half = tmp_path / "half.tar"
    half.write_bytes((shards / "train-000000.tar").read_bytes()[:5000])
    skips: Counter = Counter()
    list(read_shards([{"url": f"pipe:cat {half}; exit 3"}], skips, retries=1, backoff_s=0.01))
    assert skips["shard_retries"] == 1 and skips["unreadable_shard"] == 1


def test_an_http_404_is_not_retried(shapes_shards):
    shards, _, _ = shapes_shards

    class Missing(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Missing)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        skips: Counter = Counter()
        t0 = time.monotonic()
        list(read_shards([{"url": f"http://127.0.0.1:{srv.server_address[1]}/train-000000.tar"}], skips,
                         str(shards / "manifest.json"), retries=3, backoff_s=1.0))
        assert time.monotonic() - t0 < 3 and skips["shard_retries"] == 0 and skips["unreadable_shard"] == 1
    finally:
        srv.shutdown()
