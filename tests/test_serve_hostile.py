"""The search service against hostile clients and damaged inputs: a real
uvicorn server on 127.0.0.1, in a thread of this process, over an index of an untrained
tiny model (no training run needed), attacked over real sockets: idle and slow
connections, CPU-heavy requests, chunked uploads, a NaN index row, a huge shard member,
broken ONNX towers, and an OpenAPI schema checked against what the server answers."""
from __future__ import annotations

import contextlib
import http.client
import importlib.util
import io
import json
import logging
import math
import select
import shutil
import socket
import sys
import tarfile
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request

import pytest

from http_utils import multipart
import torch
from PIL import Image

from conftest import ROOT, make_image, serve_command

N_ITEMS = 8
NAN_ID = 2    # its index row is NaN: never returned
BIG_ID = 7    # a shard member of 200 MB (sparse): its thumbnail is refused unread
LIMITS = dict(max_upload=1 << 20, max_thumb_source=64 << 10, cpu_jobs=2, header_timeout=1.0,
              body_timeout=2.0, max_connections=100)


def _launch_module(name):
    """launch/NAME.py as a module (registered: dataclasses and pydantic look it up)."""
    key = f"launch_{name}_under_test"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "launch" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def _tiny_model_folder(tok_dir, out, embed_dim=64, seed=0):
    import phoclip
    from phoclip.data.text import load_tokenizer

    torch.manual_seed(seed)
    tok = load_tokenizer(str(tok_dir))
    model = phoclip.create_model("tiny-debug", embed_dim=embed_dim, text={"hf_config": {"vocab_size": len(tok)}})
    model.config["text"].update(segmenter="none", max_length=32)
    model.save_pretrained(out, tokenizer=tok)
    return model.eval()


def _sparse_shard(path, key, size):
    """A tar whose one member claims `size` bytes, written as a sparse file (no disk used)."""
    ti = tarfile.TarInfo(key + ".jpg")
    ti.size = size
    with open(path, "wb") as f:
        f.write(ti.tobuf(format=tarfile.GNU_FORMAT))
        f.truncate(512 + (size + 511) // 512 * 512 + 1024)


@pytest.fixture(scope="module")
def env(tiny_tokenizer_dir, tmp_path_factory):
    """A tiny model, an index with one NaN row and one huge shard member, and the
    service on a free port with small limits (1 s head deadline, 100 connections)."""
    from phoclip.search.index import write_index

    d = tmp_path_factory.mktemp("serve_hostile")
    model = _tiny_model_folder(tiny_tokenizer_dir, d / "model")
    items = []
    for i in range(N_ITEMS - 1):
        p = make_image(d / "photos" / f"p{i}.jpg", i, size=(48, 40))
        items.append({"key": f"p{i}", "path": str(p), "caption": f"ảnh số {i}", "shard": ""})
    _sparse_shard(d / "big.tar", "big", 200 << 20)
    items.append({"key": "big", "path": "", "caption": "lớn", "shard": str(d / "big.tar")})
    emb = torch.nn.functional.normalize(torch.randn(N_ITEMS, 64), dim=-1)
    emb[NAN_ID] = float("nan")
    caps = torch.nn.functional.normalize(torch.randn(4, 64), dim=-1)
    idx = d / "index"
    write_index(idx, model, str(d / "model"), emb, items, caps,
                [{"caption": f"chú thích {i}", "image": i} for i in range(4)])
    from phoclip import serve

    service = serve.Service(str(idx), device="cpu", images_roots=[str(d)])  # the photos and shard lie beside it
    with _running(service, _settings()) as (app, port):
        yield types.SimpleNamespace(base=f"http://127.0.0.1:{port}", port=port, service=service, app=app,
                                    idx=idx, d=d, model=model, serve=serve, tok=tiny_tokenizer_dir)


def _settings(**over):
    """The service's settings with this file's small limits, on a free port."""
    from phoclip.serve import Settings

    return Settings(**dict(LIMITS, host="127.0.0.1", port=0, **over))


@contextlib.contextmanager
def _running(service, settings):
    """The app over `service` served by `phoclip.serve.make_server` in a thread, on a free port."""
    from phoclip.serve import create_app, make_server

    app = create_app(service, settings)
    server = make_server(app, settings)
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    t0 = time.time()
    while not server.started:
        assert t.is_alive() and time.time() - t0 < 60, "the server did not start"
        time.sleep(0.05)
    try:
        yield app, server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        t.join(15)
        assert not t.is_alive()


def _get(url, method="GET", timeout=10):
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def _post(url, fields: dict, files: dict, timeout=30):
    data, ctype = multipart(fields, files)
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def _closed_within(sock, seconds) -> tuple[bool, bytes]:
    """Whether the server closes `sock` within `seconds` (and what it sent first)."""
    sock.settimeout(min(0.2, seconds))
    got, t0 = b"", time.monotonic()
    while time.monotonic() - t0 < seconds:
        try:
            chunk = sock.recv(4096)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return True, got
        if not chunk:
            return True, got
        got += chunk
    return False, got


def _one_error(code, headers, body):
    """Every error is JSON {"detail": "one line"}."""
    assert headers["Content-Type"].startswith("application/json"), (code, headers["Content-Type"])
    detail = json.loads(body)["detail"]
    assert isinstance(detail, str) and "\n" not in detail and len(detail) <= 300, detail
    return detail


# ----------------------------------------------------------------------------- connections

def test_idle_and_slow_clients_do_not_lock_others_out(env):
    idle = []
    try:
        for _ in range(80):  # more than uvicorn's old limit (64): everyone got 503 while they stayed
            idle.append(socket.create_connection(("127.0.0.1", env.port), timeout=5))
        time.sleep(0.1)
        for path in ("/health", "/search?q=" + urllib.parse.quote("ảnh số") + "&k=3"):
            t0 = time.monotonic()
            code, _, body = _get(env.base + path, timeout=5)
            assert code == 200 and time.monotonic() - t0 < 1.0, (path, code, body[:200])
        # 50 ordinary users at once beside them: 130 connections, over the cap (100); the
        # idle ones that waited longest are closed to make room, never a user's
        answers = []

        def user(i):
            answers.append(_get(f"{env.base}/search?q={urllib.parse.quote(f'ảnh số {i}')}&k=5", timeout=30)[0])

        users = [threading.Thread(target=user, args=(i,)) for i in range(50)]
        for u in users:
            u.start()
        for u in users:
            u.join(60)
        assert answers == [200] * 50
        # a connection that never sends a request head is closed after the deadline (1 s)
        late = socket.create_connection(("127.0.0.1", env.port), timeout=5)
        idle.append(late)
        t0 = time.monotonic()
        closed, got = _closed_within(late, 5)
        assert closed and got == b"" and 0.5 < time.monotonic() - t0 < 3
    finally:
        for s in idle:
            s.close()
    # a head trickled one byte every 0.2 s is cut at the deadline, however busy it looks
    slow = socket.create_connection(("127.0.0.1", env.port), timeout=5)
    try:
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        t0, closed = time.monotonic(), False
        for c in b"X-Padding: " + b"a" * 40:
            try:
                slow.sendall(bytes([c]))
            except OSError:
                closed = True
                break
            if select.select([slow], [], [], 0.2)[0]:
                closed = True
                break
        assert closed and time.monotonic() - t0 < 3
        closed, got = _closed_within(slow, 2)
        assert closed and got.startswith(b"HTTP/1.1 408"), got[:100]
    finally:
        slow.close()
    # a body that stops arriving is cut after one rate window (--header-timeout, 1 s): it
    # sent less than --body-min-rate (1 kB/s) in it
    s = socket.create_connection(("127.0.0.1", env.port), timeout=5)
    try:
        s.sendall(b"POST /search/image HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  b"Content-Length: 100000\r\n\r\n--b\r\n")
        t0 = time.monotonic()
        closed, _ = _closed_within(s, 6)
        assert closed and 0.7 < time.monotonic() - t0 < 1.9
    finally:
        s.close()
    # one that keeps coming above the rate is cut at --body-timeout (2 s) all the same
    s = socket.create_connection(("127.0.0.1", env.port), timeout=5)
    try:
        s.sendall(b"POST /search/image HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  b"Content-Length: 100000\r\n\r\n--b\r\n")
        t0, closed = time.monotonic(), False
        while not closed and time.monotonic() - t0 < 6:
            try:
                s.sendall(b"x" * 1000)  # 4 kB/s
            except OSError:
                break
            closed = _closed_within(s, 0.25)[0]
        assert 1.8 < time.monotonic() - t0 < 3
    finally:
        s.close()
    assert _get(env.base + "/health")[0] == 200


# ----------------------------------------------------------------------------- CPU work

def test_heavy_requests_run_off_the_event_loop_and_excess_gets_a_quick_503(env, monkeypatch):
    # a real heavy request: 200 long tags (~1 s here), while /health keeps answering
    many = "\n".join(f"thẻ {i} " + "chữ " * 70 for i in range(200))  # under the 64 kB form field cap
    heavy_done = []
    h = threading.Thread(target=lambda: heavy_done.append(_post(env.base + "/tags", {"tags": many, "id": "0"}, {})))
    h.start()
    time.sleep(0.05)
    seen_in_flight = 0
    while h.is_alive():
        t0 = time.monotonic()
        assert _get(env.base + "/health", timeout=5)[0] == 200
        assert time.monotonic() - t0 < 0.25, "/health waited for the tags request"
        seen_in_flight += h.is_alive()
        time.sleep(0.02)
    h.join()
    assert heavy_done[0][0] == 200 and seen_in_flight >= 1, heavy_done[0][2]
    real = env.service.tags

    def slow_tags(*a, **kw):  # a model that takes 1.5 s per request (sleep releases the GIL as torch does)
        time.sleep(1.5)
        return real(*a, **kw)

    monkeypatch.setattr(env.service, "tags", slow_tags)
    monkeypatch.setattr(env.app.state.cpu_jobs, "queue", 1)
    jpg = (env.d / "photos" / "p0.jpg").read_bytes()
    answers = []

    def heavy():
        answers.append(_post(env.base + "/tags", {"tags": "chó\nmèo", "k": "1"}, {"file": ("a.jpg", jpg)}))

    admitted = LIMITS["cpu_jobs"] + 1  # 2 run, 1 waits
    workers = [threading.Thread(target=heavy) for _ in range(admitted)]
    for w in workers:
        w.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    code, _, _ = _get(env.base + "/health", timeout=5)
    assert code == 200 and time.monotonic() - t0 < 0.5  # not behind the 1.5 s jobs
    assert all(w.is_alive() for w in workers)  # ...which were still running
    # every worker busy and the queue full: one more is refused at once, not queued
    t0 = time.monotonic()
    code, headers, body = _post(env.base + "/tags", {"tags": "chó", "k": "1"}, {"file": ("a.jpg", jpg)})
    assert code == 503 and headers["Retry-After"] == "1" and time.monotonic() - t0 < 0.5, body
    t0 = time.monotonic()
    for w in workers:
        w.join(30)
    # the waiting one ran after a worker was free: ~1.5 s after the first two
    assert [a[0] for a in answers] == [200] * admitted and time.monotonic() - t0 > 1.0
    assert _post(env.base + "/tags", {"tags": "chó", "k": "1"}, {"file": ("a.jpg", jpg)})[0] == 200


def test_over_the_connection_cap_the_longest_idle_one_makes_room(env):
    with _running(env.service, _settings(header_timeout=30.0, max_connections=10)) as (_, port):
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(10)]
        try:
            time.sleep(0.2)
            assert not any(_closed_within(s, 0.05)[0] for s in idle)  # at the cap, none closed
            code, _, _ = _get(f"http://127.0.0.1:{port}/health", timeout=5)
            assert code == 200 and _closed_within(idle[0], 1)[0]  # the oldest made room
            assert not any(_closed_within(s, 0.05)[0] for s in idle[2:])
        finally:
            for s in idle:
                s.close()


def _connect(port, rcvbuf=None):
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    return s


def _get_or_none(url, timeout=5):
    """The status of GET `url`, or None when the server closed the connection instead."""
    try:
        return _get(url, timeout=timeout)[0]
    except (OSError, http.client.HTTPException):
        return None


def test_bodies_that_stop_past_the_cap_make_room_for_others(env):
    """Connections that send a head and a few body bytes, then nothing, are never idle:
    past the cap the one that made the least progress is closed, not the newcomer."""
    head = (b"POST /search/image HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 900000\r\n\r\n")
    with _running(env.service, _settings(header_timeout=30.0, body_timeout=30.0, max_connections=10)) as (_, port):
        stalled = []
        try:
            busy = _connect(port)  # an honest upload, still arriving: it has made progress
            busy.sendall(head + b"--b\r\n")
            time.sleep(0.2)
            busy.sendall(b"x" * 200_000)
            for _ in range(9):  # the cap, with `busy`
                s = _connect(port)
                s.sendall(head + b"--b\r\n")
                stalled.append(s)
            time.sleep(0.3)
            assert not any(_closed_within(s, 0.05)[0] for s in [busy, *stalled])
            for i in range(3):  # each newcomer is served; a stalled body made room (and another comes)
                t0 = time.monotonic()
                assert _get_or_none(f"http://127.0.0.1:{port}/health") == 200 and time.monotonic() - t0 < 2, i
                s = _connect(port)
                s.sendall(head + b"--b\r\n")
                stalled.append(s)
            assert [_closed_within(s, 0.2)[0] for s in stalled] == [True] * 3 + [False] * 9  # the oldest first
            assert not _closed_within(busy, 0.2)[0]  # the one making progress was kept
        finally:
            for s in [busy, *stalled]:
                s.close()


def test_a_client_that_does_not_read_its_answers_is_cut_and_never_locks_others_out(env):
    """Requests pipelined by a client that never reads the answers: the response that is
    not drained is cut after --write-timeout, and such connections make room past the cap."""
    pipeline = b"GET /app.js HTTP/1.1\r\nHost: x\r\n\r\n" * 400  # ~14 kB answers, 5.6 MB in all
    with _running(env.service, _settings(header_timeout=30.0, write_timeout=3.0, max_connections=6)) as (_, port):
        greedy = []
        try:
            t_start = time.monotonic()
            for _ in range(6):
                s = _connect(port, rcvbuf=4096)
                s.sendall(pipeline)
                greedy.append(s)
            time.sleep(1.5)  # their answers fill the buffers (~0.6 s here)
            t0 = time.monotonic()
            assert _get_or_none(f"http://127.0.0.1:{port}/health") == 200 and time.monotonic() - t0 < 1
            time.sleep(max(0.0, t_start + 4.5 - time.monotonic()))
            # cut: what the socket holds, then the reset (a connection still served would go on)
            assert all(_closed_within(s, 1.0)[0] for s in greedy)
            assert _get_or_none(f"http://127.0.0.1:{port}/health") == 200
        finally:
            for s in greedy:
                s.close()


def test_uploads_at_once_share_one_memory_budget(env):
    """Each upload under the cap, but together over --max-body-memory: the one that does
    not fit gets 503 + Retry-After from its head, unread; the budget comes back after."""
    limits = dict(header_timeout=30.0, body_timeout=30.0, max_body_memory=2 << 20)
    with _running(env.service, _settings(**limits)) as (app, port):

        def head(n):
            return (b"POST /search/image HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                    b"Content-Length: %d\r\n\r\n--b\r\n" % n)

        holders = [_connect(port) for _ in range(2)]
        try:
            for s in holders:  # 2 x 900 kB declared, arriving
                s.sendall(head(900_000))
            t0 = time.monotonic()
            while app.state.body_budget.held < 1_800_000:
                assert time.monotonic() - t0 < 5, app.state.body_budget.held
                time.sleep(0.02)
            third = _connect(port)
            third.sendall(head(400_000))
            t0 = time.monotonic()
            closed, got = _closed_within(third, 3)
            third.close()
            assert closed and time.monotonic() - t0 < 1, got[:200]
            assert got.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in got.lower(), got[:300]
            assert app.state.body_budget.held == 1_800_000
            # a small upload still fits beside them
            jpg = (env.d / "photos" / "p1.jpg").read_bytes()
            assert _post(f"http://127.0.0.1:{port}/search/image", {"k": "1"}, {"file": ("a.jpg", jpg)})[0] == 200
        finally:
            for s in holders:
                s.close()
        t0 = time.monotonic()
        while app.state.body_budget.held:  # released as their requests end
            assert time.monotonic() - t0 < 5, app.state.body_budget.held
            time.sleep(0.05)
        s = _connect(port)
        s.sendall(head(400_000))
        assert _closed_within(s, 0.5) == (False, b"")  # fits now: the server waits for its body
        s.close()


def test_a_job_waits_for_a_worker_only_so_long(env):
    from fastapi import HTTPException

    jobs = env.serve.CpuJobs(1, queue=5, wait=0.3)

    async def main():
        out = []

        async def one():
            try:
                out.append(await jobs.run(time.sleep, 1.0))
            except HTTPException as e:
                out.append((e.status_code, e.headers["Retry-After"], round(time.monotonic() - t0, 1)))

        t0 = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            await anyio.sleep(0.05)
            tg.start_soon(one)
        return out

    import anyio

    assert anyio.run(main) == [(503, "1", 0.4), None] and jobs.admitted == 0


def test_decoded_bytes_are_capped_not_just_pixels(env):
    # 6300x6300 16-bit grey: 39.7M pixels, under the pixel cap, in a 77 kB PNG; decoding it
    # here would take ~0.4 GB (2 bytes a pixel, then a float32 working array), over the
    # service's --max-decode-mb
    buf = io.BytesIO()
    Image.new("I;16", (6300, 6300)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 200_000
    t0 = time.monotonic()
    code, headers, body = _post(env.base + "/search/image", {}, {"file": ("grey16.png", buf.getvalue())})
    assert code == 422 and time.monotonic() - t0 < 2, body
    assert "I;16 needs" in body["detail"] and "MB to decode" in body["detail"]
    from phoclip.data.images import decode_cost

    assert decode_cost("I;16", 6300, 6300) > 400 << 20 > decode_cost("RGB", 6300, 6300)
    # an ordinary upload still works
    jpg = (env.d / "photos" / "p1.jpg").read_bytes()
    code, _, res = _post(env.base + "/search/image", {"k": "3"}, {"file": ("a.jpg", jpg)})
    assert code == 200 and len(res["images"]) == 3 and len(res["captions"]) == 3


# ----------------------------------------------------------------------------- request bodies

def test_a_chunked_upload_over_the_cap_gets_413_without_being_read(env):
    s = socket.create_connection(("127.0.0.1", env.port), timeout=5)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
    sent, answered = 0, False
    try:
        s.sendall(b"POST /search/image HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Type: multipart/form-data; boundary=b\r\n\r\n")
        head = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n'
                b"Content-Type: image/jpeg\r\n\r\n")
        s.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        chunk = b"%x\r\n%s\r\n" % (64 << 10, b"\xff" * (64 << 10))
        while sent < (64 << 20):  # the whole body would be 64 MB; the cap is 1 MB
            if select.select([s], [], [], 0)[0]:
                answered = True
                break
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                answered = True
                break
            sent += 64 << 10
        assert answered, "no answer before the whole 64 MB body was sent"
        assert sent < (24 << 20), sent  # the cap plus what the socket buffers held
        closed, got = _closed_within(s, 5)
        assert closed and got.startswith(b"HTTP/1.1 413"), got[:200]
        assert b"connection: close" in got.lower() and b'"detail"' in got
    finally:
        s.close()
    # a Content-Length over the cap is refused from the header, before any body is sent
    # (a client still sending then meets a closed socket: asked on a raw socket, no race)
    s = socket.create_connection(("127.0.0.1", env.port), timeout=5)
    try:
        s.sendall(b"POST /search/image HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                  b"Content-Type: multipart/form-data; boundary=b\r\n\r\n" % (2 << 20))
        closed, got = _closed_within(s, 5)
        assert got.startswith(b"HTTP/1.1 413") and b"over" in got, got[:300]
    finally:
        s.close()
    assert _get(env.base + "/health")[0] == 200


# ----------------------------------------------------------------------------- the index

def test_a_nan_index_row_is_skipped_counted_and_never_returned(env, caplog):
    from phoclip.search.index import EmbeddingIndex
    from phoclip.models.embed import embed_texts, query_processor
    from phoclip.search.query import zero_shot_tags

    with caplog.at_level(logging.WARNING, logger="phoclip.search.exact"):
        index = EmbeddingIndex(env.idx)
        emb = index.embeddings("images")
    msg = [r.getMessage() for r in caplog.records if r.name == "phoclip.search.exact"]
    assert len(msg) == 1 and "img_emb: 1 of 8 rows are not finite" in msg[0] and f"ids {NAN_ID})" in msg[0]
    assert index.bad_ids("images").tolist() == [NAN_ID] and torch.isfinite(emb).all()
    # exact and FAISS search: every row but the NaN one, for any query, even the NaN row's own
    q = torch.nn.functional.normalize(torch.randn(16, 64), dim=-1)
    for backend in ("exact", "faiss"):
        res = index.search(q, 100, "images", backend)
        assert len(res) == 16 and all(math.isfinite(m.score) for row in res for m in row)
        assert all(sorted(m.id for m in row) == [j for j in range(N_ITEMS) if j != NAN_ID] for row in res)
        res = index.search(q, 3, "images", backend)
        assert all(len(row) == 3 and NAN_ID not in {m.id for m in row} for row in res)
    from phoclip.models.loading import load_encoder

    model, tok = load_encoder(str(env.d / "model"))
    proc = query_processor(model, tok)
    assert embed_texts(model, proc, ["ảnh"]).shape == (1, 64)
    tags = zero_shot_tags(model, index, ["chó", "mèo"], proc, k=1)
    assert tags[NAN_ID] == [] and all(len(t) == 1 for j, t in enumerate(tags) if j != NAN_ID)
    # the service: every /search answers JSON (NaN is not JSON) without the row
    code, _, body = _get(env.base + "/search?q=" + urllib.parse.quote("ảnh số 2") + "&k=100")
    res = json.loads(body)["results"]
    assert code == 200 and len(res) == N_ITEMS - 1 and NAN_ID not in {r["id"] for r in res}
    code, _, body = _post(env.base + "/tags", {"tags": "chó", "id": str(NAN_ID)}, {})
    assert code == 404 and "damaged" in body["detail"]
    # more like it: never from a damaged row, and never returning it
    code, headers, body = _get(env.base + f"/items/{NAN_ID}/similar")
    assert code == 404 and "damaged" in _one_error(code, headers, body)
    code, _, body = _get(env.base + "/items/0/similar?k=100")
    res = json.loads(body)["results"]
    assert code == 200 and {r["id"] for r in res} == set(range(N_ITEMS)) - {0, NAN_ID}
    assert _get(env.base + f"/items/{NAN_ID}")[0] == 200  # its captions and source are still there


def test_search_cli_tags_skip_a_nan_row(env, capsys):
    tags = env.d / "tags.txt"
    tags.write_text("chó\nmèo\n", encoding="utf-8")
    assert _launch_module("search").main(["--index", str(env.idx), "--tags", str(tags), "--k", "1"]) == 0
    out = capsys.readouterr().out
    assert "p2.jpg: (skipped: damaged index row)" in out and "p3.jpg: " in out


# ----------------------------------------------------------------------------- ONNX towers

def test_onnx_towers_that_do_not_fit_are_refused_at_load_in_one_line(env, tmp_path, capsys):
    from phoclip.search.index import EmbeddingIndex
    from phoclip.models.onnx import OnnxModel, export_onnx

    good = tmp_path / "good"
    shutil.copytree(env.d / "model", good)
    export_onnx(env.model, good)
    assert OnnxModel(good).encode_text(torch.tensor([[0, 5, 2]])).shape == (1, 64)
    narrow = tmp_path / "narrow"
    export_onnx(_tiny_model_folder(env.tok, narrow, embed_dim=32), narrow)

    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    shutil.copy(narrow / "onnx" / "text.onnx", bad / "onnx" / "text.onnx")  # a 32-wide text tower
    with pytest.raises(ValueError, match=r"text\.onnx: gives \(1, 32\) finite embeddings .* embed_dim is 64"):
        OnnxModel(bad)
    # the service refuses it at start, in one line naming the file, instead of starting healthy
    serve = _launch_module("serve")  # the command: launch/serve.py
    assert serve.main(["--index", str(env.idx), "--model", str(bad), "--backend", "onnx", "--images-root", str(env.d)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("serve: ") and "text.onnx" in err and "Traceback" not in err
    # a file onnxruntime refuses: one line naming it, not onnxruntime's traceback
    (bad / "onnx" / "text.onnx").write_bytes(b"\x08\x07 not a model")
    with pytest.raises(ValueError, match=r"text\.onnx: onnxruntime refuses it \("):
        OnnxModel(bad)
    assert serve.main(["--index", str(env.idx), "--model", str(bad), "--backend", "onnx", "--images-root", str(env.d)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "text.onnx: onnxruntime refuses it" in err
    (bad / "onnx" / "meta.json").write_text("{")
    with pytest.raises(ValueError, match=r"meta\.json: not an ONNX export description"):
        OnnxModel(bad)
    # and an index of another width is refused whatever the fingerprint says
    fake = types.SimpleNamespace(fingerprint=EmbeddingIndex(env.idx).fingerprint, config={"embed_dim": 32})
    with pytest.raises(ValueError, match="holds 64-wide embeddings, the model makes 32-wide"):
        EmbeddingIndex(env.idx).check_model(fake)


# ----------------------------------------------------------------------------- thumbnails

def test_thumbnail_sources_are_read_up_to_a_cap(env, caplog):
    code, headers, body = _get(env.base + "/thumb/0")
    assert code == 200 and headers["Content-Type"] == "image/jpeg" and Image.open(io.BytesIO(body)).size[0] > 0
    with caplog.at_level(logging.WARNING, logger="phoclip.serve"):
        t0 = time.monotonic()
        code, headers, body = _get(env.base + f"/thumb/{BIG_ID}")
        assert code == 404 and time.monotonic() - t0 < 2  # refused from the member's header
    assert _one_error(code, headers, body) == "thumbnail unavailable"
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("phoclip.serve")]
    assert any(f"no thumbnail for item {BIG_ID}: too_large_file" in l and "209715200 bytes > 65536" in l
               for l in lines), lines
    # the detail view's photo has the same cap
    code, headers, body = _get(env.base + f"/photo/{BIG_ID}")
    assert code == 404 and _one_error(code, headers, body) == "photo unavailable"
    for path in ("/photo/0.5", "/photo/-1", f"/photo/{N_ITEMS}", "/photo/..%2F..%2Fetc%2Fpasswd"):
        assert 400 <= _get(env.base + path)[0] < 500, path


def _long_name_bomb(path, claim):
    """A tar whose first header is a GNU long name claiming `claim` bytes, written as a
    sparse file: tarfile reads such a header whole into memory before any member cap."""
    ti = tarfile.TarInfo("././@LongLink")
    ti.type, ti.size = tarfile.GNUTYPE_LONGNAME, claim
    with open(path, "wb") as f:
        f.write(ti.tobuf(format=tarfile.GNU_FORMAT))
        f.truncate(512 + (claim + 511) // 512 * 512 + 1024)


def test_pictures_come_from_the_index_folder_or_named_roots_and_shard_headers_are_capped(env, tmp_path, caplog):
    """An index whose index.json names a folder outside it serves nothing from there
    unless that folder is given (--images-root); a shard in the index folder whose long
    name header claims 256 MB is refused from the header, not read into memory."""
    import tracemalloc

    from phoclip.search.index import write_index

    outside = tmp_path / "outside"
    make_image(outside / "o.jpg", 1, size=(48, 40))
    ix = tmp_path / "ix"
    items = [{"key": "o", "path": str(outside / "o.jpg"), "caption": "ngoài", "shard": ""},
             {"key": "in", "path": str(ix / "in.jpg"), "caption": "trong", "shard": ""},
             {"key": "bomb", "path": "", "caption": "bom", "shard": str(ix / "bomb.tar")}]
    emb = torch.nn.functional.normalize(torch.randn(3, 64), dim=-1)
    write_index(ix, env.model, str(env.d / "model"), emb, items, source=str(outside))
    assert json.loads((ix / "index.json").read_text())["images_root"]  # recorded: outside the index folder
    make_image(ix / "in.jpg", 2, size=(48, 40))
    _long_name_bomb(ix / "bomb.tar", 256 << 20)
    with caplog.at_level(logging.WARNING, logger="phoclip.serve"):
        service = env.serve.Service(str(ix), device="cpu")
    said = [r.getMessage() for r in caplog.records if "images folder index.json names" in r.getMessage()]
    assert len(said) == 1 and str(outside) in said[0] and f"--images-root {outside}" in said[0], said
    with _running(service, _settings()) as (_, port):
        base = f"http://127.0.0.1:{port}"
        assert _get(base + "/thumb/1")[0] == 200  # inside the index folder
        code, headers, body = _get(base + "/thumb/0")
        assert code == 404 and _one_error(code, headers, body) == "thumbnail unavailable"
        assert service.indices.get().pictures.failures["outside_roots"] == 1
        tracemalloc.start()
        try:
            t0 = time.monotonic()
            code, headers, body = _get(base + "/photo/2")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert code == 404 and _one_error(code, headers, body) == "photo unavailable" and time.monotonic() - t0 < 2
        assert peak < 32 << 20, peak  # the 256 MB header was never read
    # named on the command line, the outside folder is served
    service = env.serve.Service(str(ix), device="cpu", images_roots=[str(outside)])
    with _running(service, _settings()) as (_, port):
        assert _get(f"http://127.0.0.1:{port}/thumb/0")[0] == 200


# ----------------------------------------------------------------------------- the schema

def test_the_openapi_schema_matches_what_the_service_answers(env):
    code, _, body = _get(env.base + "/openapi.json")
    spec = json.loads(body)
    paths, schemas = spec["paths"], spec["components"]["schemas"]
    assert code == 200 and "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert schemas["Error"]["properties"]["detail"]["type"] == "string"
    q = {p["name"]: p["schema"] for p in paths["/search"]["get"]["parameters"]}
    assert q["q"]["maxLength"] == 512 and q["q"]["minLength"] == 1 and q["k"]["maximum"] == 100
    documented = {(path, m, s) for path, ops in paths.items() for m, op in ops.items() for s in op["responses"]}
    for want in [("/search", "get", "422"), ("/search", "get", "503"), ("/search/image", "post", "413"),
                 ("/search/image", "post", "415"), ("/search/image", "post", "400"), ("/tags", "post", "404"),
                 ("/tags", "post", "413"), ("/thumb/{item_id}", "get", "404"), ("/health", "head", "200")]:
        assert want in documented, want
    for path, ops in paths.items():  # every error documented is the one error model
        for m, op in ops.items():
            for status, r in op["responses"].items():
                if status.startswith(("4", "5")):
                    assert r["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert set(paths["/thumb/{item_id}"]["get"]["responses"]["200"]["content"]) == {"image/jpeg"}
    assert set(paths["/"]["get"]["responses"]["200"]["content"]) == {"text/html"}
    assert set(paths["/app.js"]["get"]["responses"]["200"]["content"]) == {"text/javascript"}
    # ...and the service answers that way
    for path, ctype in (("/thumb/0", "image/jpeg"), ("/", "text/html"), ("/app.js", "text/javascript")):
        code, headers, _ = _get(env.base + path)
        assert code == 200 and headers["Content-Type"].startswith(ctype), (path, headers["Content-Type"])
    code, headers, body = _get(env.base + "/health", method="HEAD")
    assert code == 200 and body == b"" and headers["Content-Type"] == "application/json"
    for path, status in (("/search?q=" + "a" * 513, 422), ("/search?q=xe&k=0", 422), ("/search?q=%20", 422),
                         ("/search", 422), ("/thumb/0.5", 422), ("/thumb/99", 404), ("/nowhere", 404)):
        code, headers, body = _get(env.base + path)
        assert code == status, (path, code)
        _one_error(code, headers, body)
    # a 100 kB query is refused without being echoed back
    code, headers, body = _get(env.base + "/search?q=" + "x" * 100_000)
    detail = _one_error(code, headers, body)
    assert code == 422 and len(body) < 400 and "xxxxxxxxxx" not in detail and "512" in detail


# ----------------------------------------------------------------------------- the command

@pytest.mark.slow  # a second process importing torch: ~15 s on 2 cores
def test_the_command_serves_with_its_limits(env, tmp_path):
    """`python launch/serve.py --index ...` as README shows it, with the flags wired in."""
    with serve_command(["--index", env.idx, "--header-timeout", "1", "--max-upload-mb", "0.5"],
                       tmp_path / "serve.log") as base:
        port = urllib.parse.urlsplit(base).port
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        t0 = time.monotonic()
        assert _closed_within(s, 5)[0] and time.monotonic() - t0 < 3  # --header-timeout 1
        s.close()
        # --max-upload-mb 0.5: refused from the header, the connection closed (asked on a raw
        # socket: a client still sending the body could meet the close, a race)
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"POST /search/image HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                  b"Content-Type: multipart/form-data; boundary=b\r\n\r\n" % (600 << 10))
        got = _closed_within(s, 5)[1]
        s.close()
        assert got.startswith(b"HTTP/1.1 413") and b"bytes" in got, got[:300]
        assert _get(base + "/health")[0] == 200
    assert "serving 8 images" in (tmp_path / "serve.log").read_text()
