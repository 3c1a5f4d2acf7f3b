"""Offline is noticed in seconds, once, and the refusal names the recipe for a local
tokenizer (a user without HF_HUB_OFFLINE: transformers alone retries for tens of seconds)."""
import http.server
import logging
import socket
import threading
import time

import pytest

from conftest import refusal, root_logging_kept
from phoclip.data import text
from phoclip.errors import SetupError


@pytest.fixture()
def no_hub(monkeypatch):
    """A hub endpoint nobody listens on (connection refused), no offline variables."""
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    text.hub_reachable.cache_clear()
    yield
    text.hub_reachable.cache_clear()


def test_a_hub_that_never_answers_is_given_up_within_the_timeout(monkeypatch):
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        text.hub_reachable.cache_clear()
        t0 = time.monotonic()
        assert text.hub_reachable(0.5) is False
        assert time.monotonic() - t0 < 3
    text.hub_reachable.cache_clear()


def test_a_hub_that_answers_is_reachable_and_offline_variables_are_obeyed(monkeypatch):
    class Answer(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)  # any answer: the hub is there
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(k, raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{srv.server_address[1]}")
        text.hub_reachable.cache_clear()
        assert text.hub_reachable() is True
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        text.hub_reachable.cache_clear()
        assert text.hub_reachable() is False  # asked nothing
    finally:
        srv.shutdown()
        text.hub_reachable.cache_clear()


def test_offline_is_refused_in_seconds_with_the_recipe_and_one_warning(no_hub, caplog):
    import transformers  # noqa: F401  (its import is not what is timed)

    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="phoclip.data.text"):
        for _ in range(2):
            with pytest.raises(SetupError) as e:
                text.load_tokenizer("vinai/no-such-tokenizer-for-phoclip-tests")
    assert time.monotonic() - t0 < 10
    msg = str(e.value)
    assert "cannot be reached" in msg and "not in the local cache" in msg
    assert "build_phobert_tokenizer" in msg and "docs/sharding.md#offline-a-tokenizer-from-your-own-captions" in msg
    warnings = [r for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]


def test_make_shards_offline_refusal_names_the_recipe(no_hub, coco_dataset, tmp_path):
    from phoclip_cli.shards import main

    ann, imgs, _ = coco_dataset
    t0 = time.monotonic()
    with root_logging_kept():
        line = refusal(main, ["--source", f"coco-jsonl:{ann}:{imgs}", "--out", str(tmp_path / "out"),
                              "--tokenizer", "vinai/no-such-tokenizer-for-phoclip-tests", "--segmenter", "none",
                              "--workers", "1"])
    assert time.monotonic() - t0 < 30
    assert "build_phobert_tokenizer" in line and "docs/sharding.md#offline" in line, line


def test_the_sharding_page_lists_its_offline_section():
    from conftest import ROOT

    page = (ROOT / "docs" / "sharding.md").read_text(encoding="utf-8")
    contents = next(ln for ln in page.splitlines() if ln.startswith("Contents:"))
    assert "(#offline-a-tokenizer-from-your-own-captions)" in contents
    assert "## Offline: a tokenizer from your own captions" in page
