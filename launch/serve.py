"""A search service over an index: a JSON API and a small Vietnamese web page.

    python launch/serve.py --index index/ [--model runs/exp1] --host 127.0.0.1 --port 8080
    open http://127.0.0.1:8080/

The model and the index are loaded once (GPU when present; `--backend onnx` runs the
encoders on onnxruntime) and probed: a model whose embeddings do not fit the index is
refused at start, not with a 500 for every query. Routes (schema: /openapi.json):
    GET|HEAD /health                   status, counts, model fingerprint
    GET  /search?q=TEXT&k=24&offset=0  text → image
    POST /search/image (multipart 'file')   image → text (shard indexes) and image → image
    POST /tags (multipart: 'tags' one per line, and 'file' or 'id')   zero-shot tags
    GET  /thumb/ID                     a JPEG thumbnail of indexed image ID (only indexed items)
    GET  /                             the page
Every request is untrusted: queries and uploads are capped (a body is counted as it
streams, chunked or not), images are refused before decoding when they would take more
than --max-decode-mb, and decoding and embedding run in at most --cpu-jobs worker
threads, never on the event loop (past --cpu-queue waiting jobs or --cpu-wait seconds of
waiting: 503 with Retry-After).
A connection must send a request head within --header-timeout s and its body within
--body-timeout s, and past --max-connections the one waiting longest for a request head
is closed: idle and slow clients cannot lock others out. Thumbnails are served by index
id only (no path reaches the file system), and the page writes captions as text, never
as HTML. Every error is JSON {"detail": "one line"}.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence

import anyio
import h11
import torch
from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from uvicorn.protocols.http.h11_impl import H11Protocol

from phoclip.errors import EXPECTED_ERRORS, one_line
from phoclip.gallery import load_item_bytes
from phoclip.images import BadImage, decode_rgb
from phoclip.index import EmbeddingIndex
from phoclip.log import init_logger
from phoclip.search import (DEFAULT_TEMPLATES, caption_matches, embed_images, embed_texts, query_processor,
                            tag_embeddings)
from phoclip.text import strip_controls

logger = logging.getLogger("serve")

MAX_QUERY_CHARS = 512
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_UPLOAD_PIXELS = 40_000_000
MAX_DECODE_BYTES = 256 * 1024 * 1024
MAX_THUMB_SOURCE_BYTES = 32 * 1024 * 1024
MAX_K = 100
MAX_TAGS = 200
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small fields around an upload


@dataclasses.dataclass
class Limits:
    """What one request, one connection and the whole service may cost."""

    max_upload: int = MAX_UPLOAD_BYTES
    """bytes of one uploaded image; a request body over it (+ FORM_OVERHEAD) gets 413 as
    soon as it is over, chunked or not, and the connection is closed unread"""
    max_decode_bytes: int = MAX_DECODE_BYTES
    """memory one image may take to decode (pixels x bytes per pixel, conversions to RGB
    included); refused from its header, before decoding, over it"""
    max_thumb_source: int = MAX_THUMB_SOURCE_BYTES
    """bytes read for one thumbnail's source (a file or a shard member); more: 404, logged"""
    cpu_jobs: int = dataclasses.field(default_factory=lambda: max(2, min(4, os.cpu_count() or 1)))
    """decodes and embeddings at once, in worker threads (never on the event loop)"""
    cpu_queue: int = 64
    """jobs that may wait for a worker (bursts of ordinary users, a page's thumbnails);
    one more gets 503 + Retry-After at once"""
    cpu_wait: float = 5.0
    """seconds a job may wait for a worker before it gets 503 + Retry-After"""
    header_timeout: float = 10.0
    """seconds a connection has to send a whole request head (from opening, or from its
    last response on keep-alive)"""
    body_timeout: float = 60.0
    """seconds from a request's head to the end of its body"""
    max_connections: int = 1024
    """open connections; past it the one waiting longest for a request head is closed"""


# ----------------------------------------------------------------------------- responses

class Error(BaseModel):
    """Every error: one line saying what is wrong."""
    detail: str


class Health(BaseModel):
    status: str
    images: int
    captions: int
    model: str
    device: str


class ImageHit(BaseModel):
    rank: int
    score: float
    id: int
    key: str
    caption: str
    path: str
    thumb: str


class SearchResults(BaseModel):
    query: str
    offset: int
    results: list[ImageHit]


class CaptionHit(BaseModel):
    rank: int
    score: float
    caption: str
    image: Optional[int]


class ImageSearchResults(BaseModel):
    images: list[ImageHit]
    captions: list[CaptionHit]


class TagScore(BaseModel):
    tag: str
    score: float


class TagResults(BaseModel):
    tags: list[TagScore]


class JavaScriptResponse(Response):
    media_type = "text/javascript"


ERR = {"model": Error}
BUSY = {"model": Error, "description": "every CPU worker is busy: retry after Retry-After seconds"}
JPEG = {"description": "a JPEG thumbnail", "content": {"image/jpeg": {"schema": {"type": "string",
                                                                                 "format": "binary"}}}}


# ----------------------------------------------------------------------------- images

def decode_upload(data: bytes, max_decode_bytes: int):
    """An RGB image from untrusted bytes: the upload pixel cap and the decoded-bytes cap,
    both from the header alone, then the decode (`decode_rgb`). Raises BadImage."""
    return decode_rgb(data, MAX_UPLOAD_PIXELS, max_decode_bytes)


def _finite(emb: torch.Tensor, what: str) -> torch.Tensor:
    if not bool(torch.isfinite(emb).all()):
        logger.error("the model gave a non-finite %s embedding", what)
        raise HTTPException(500, f"the model gave a non-finite {what} embedding (logged)")
    return emb


# ----------------------------------------------------------------------------- the service

class Service:
    """The loaded model, index and query processor; what the routes call (in worker
    threads: every method may run on several at once)."""

    def __init__(self, index_dir: str, model: Optional[str] = None, backend: str = "torch",
                 device: str = "auto", vncorenlp_dir: Optional[str] = None) -> None:
        from phoclip_train.export import load_encoder

        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   "cpu" if device == "auto" else device)
        self.index = EmbeddingIndex(index_dir)
        # onnxruntime takes numpy on the host; its own providers pick the device
        self.enc_device = torch.device("cpu") if backend == "onnx" else self.device
        name = model or self.index.meta["model"]
        self.model, tok = load_encoder(name, backend, str(self.enc_device))
        self.index.check_model(self.model)
        self.proc = query_processor(self.model, tok, None, vncorenlp_dir)
        self.size = int(self.model.config["vision"].get("image_size", 224))
        self.items = self.index.items("images")
        self.has_captions = self.index.meta["count"].get("captions", 0) > 0
        self.index.embeddings("images")  # load (and check) now, not at the first query
        if self.has_captions:
            self.index.embeddings("captions")
        self._probe(name, backend)
        self._thumbs: OrderedDict = OrderedDict()
        self._thumbs_lock = threading.Lock()

    def _probe(self, name: str, backend: str) -> None:
        """One text and one image through the encoders: output that does not fit the
        index (width, NaN) is refused now, not answered with a 500 for every query."""
        from PIL import Image

        dim = self.index.meta["dim"]
        for what, emb in (("text", embed_texts(self.model, self.proc, ["kiểm tra"], self.enc_device)),
                          ("image", embed_images(self.model, [Image.new("RGB", (self.size, self.size))],
                                                 self.size, self.enc_device))):
            if tuple(emb.shape) != (1, dim) or not bool(torch.isfinite(emb).all()):
                raise ValueError(f"{name} ({backend}): its {what} encoder gives {tuple(emb.shape)} "
                                 f"{'finite' if torch.isfinite(emb).all() else 'non-finite'} embeddings "
                                 f"for one probe input; the index {self.index.folder} holds {dim}-wide ones")

    def _image_hit(self, rank: int, score: float, i: int) -> dict:
        it = self.items[i]
        return {"rank": rank, "score": round(score, 4), "id": i, "key": str(it.get("key", "")),
                "caption": strip_controls(str(it.get("caption") or "")),
                "path": strip_controls(str(it.get("path") or "")), "thumb": f"/thumb/{i}"}

    def search_text(self, q: str, k: int, offset: int) -> list[dict]:
        emb = _finite(embed_texts(self.model, self.proc, [q], self.enc_device), "text")
        s, i = self.index.search(emb, k + offset, "images")
        return [self._image_hit(r + 1, float(s[0, r]), int(i[0, r])) for r in range(offset, s.shape[1])]

    def search_image(self, img, k: int) -> dict:
        emb = _finite(embed_images(self.model, [img], self.size, self.enc_device), "image")
        s, i = self.index.search(emb, k, "images")
        out = {"images": [self._image_hit(r + 1, float(s[0, r]), int(i[0, r])) for r in range(s.shape[1])],
               "captions": []}
        if self.has_captions:  # distinct captions: one caption of several images is listed once
            out["captions"] = [{"rank": m.rank, "score": round(m.score, 4),
                                "caption": strip_controls(str(m.item.get("caption", ""))),
                                "image": _int_or_none(m.item.get("image"))}
                               for m in caption_matches(self.index, emb, k)[0]]
        return out

    def usable(self, item_id: int) -> bool:
        """Whether indexed image `item_id` has an embedding (its row was not skipped)."""
        return 0 <= item_id < len(self.items) and not bool((self.index.bad_ids("images") == item_id).any())

    def tags(self, tags: list[str], k: int, img=None, item_id: Optional[int] = None) -> list[dict]:
        W = _finite(tag_embeddings(self.model, tags, self.proc, DEFAULT_TEMPLATES), "text")
        if img is not None:
            emb = _finite(embed_images(self.model, [img], self.size, self.enc_device)[0], "image")
        else:
            emb = self.index.embeddings("images")[item_id]
        sc = W @ emb.float()
        top = sc.topk(min(k, len(tags)))
        return [{"tag": tags[int(j)], "score": round(float(v), 4)} for v, j in zip(top.values, top.indices)]

    def cached_thumbnail(self, i: int) -> Optional[bytes]:
        with self._thumbs_lock:
            if i in self._thumbs:
                self._thumbs.move_to_end(i)
                return self._thumbs[i]
        return None

    def thumbnail(self, i: int, max_source: int = MAX_THUMB_SOURCE_BYTES,
                  max_decode_bytes: int = MAX_DECODE_BYTES, size: int = 256) -> bytes:
        """A JPEG thumbnail of indexed image `i`, its source read up to `max_source` bytes."""
        import io

        data = self.cached_thumbnail(i)
        if data is not None:
            return data
        im = decode_upload(load_item_bytes(self.items[i], max_bytes=max_source), max_decode_bytes)
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
        with self._thumbs_lock:
            self._thumbs[i] = buf.getvalue()
            if len(self._thumbs) > 2048:
                self._thumbs.popitem(last=False)
        return buf.getvalue()


def _int_or_none(x: Any) -> Optional[int]:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


class CpuJobs:
    """At most `slots` CPU-bound jobs at once, each in a worker thread, never on the event
    loop; at most `queue` more wait for one, each at most `wait` seconds. Past either
    bound a job gets 503 + Retry-After: a short wait, never a queue of minutes."""

    def __init__(self, slots: int, queue: int = 0, wait: float = 5.0) -> None:
        self.slots, self.queue, self.wait = max(1, slots), max(0, queue), wait
        self.admitted = 0  # running + waiting; only touched on the event loop: no lock
        self._free: Optional[anyio.Semaphore] = None

    def _busy(self) -> HTTPException:
        return HTTPException(503, f"busy: {self.slots} workers, {self.admitted} jobs admitted; retry "
                                  "in a second", headers={"Retry-After": "1"})

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.admitted >= self.slots + self.queue:
            raise self._busy()
        if self._free is None:  # made on the event loop
            self._free = anyio.Semaphore(self.slots)
        self.admitted += 1
        try:
            with anyio.move_on_after(self.wait) as waited:
                await self._free.acquire()
            if waited.cancelled_caught:
                raise self._busy()
            try:
                # a cancelled request (client gone) still waits for its thread: the slot
                # is not handed on while the job runs
                return await anyio.to_thread.run_sync(fn, *args)
            finally:
                self._free.release()
        finally:
            self.admitted -= 1


# ----------------------------------------------------------------------------- ASGI guards

class _BodyTooLarge(HTTPException):
    def __init__(self, cap: int) -> None:
        super().__init__(413, f"request body over {cap} bytes", headers={"Connection": "close"})


class BodyLimit:
    """Counts a request body as it arrives (Content-Length or chunked) and answers 413,
    Connection: close, as soon as it is over `max_bytes`: the rest is never read nor
    spooled. A Content-Length over the cap is refused before the first byte."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        n = dict(scope["headers"]).get(b"content-length")
        if n is not None and (not n.isdigit() or int(n) > self.max_bytes):
            return await _error(send, 413, f"request body over {self.max_bytes} bytes", close=True)
        seen = 0
        started = False

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)  # FastAPI passes HTTPExceptions on as they are
            return message

        async def sending(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except _BodyTooLarge as e:
            if started:
                raise
            await _error(send, 413, e.detail, close=True)


async def _error(send, status: int, detail: str, close: bool = False) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class SecurityHeaders:
    """nosniff and no-referrer on every response."""

    HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                message = dict(message, headers=[*message.get("headers", []),
                                                 *(h for h in self.HEADERS if h[0] not in have)])
            await send(message)

        await self.app(scope, receive, sending)


def _validation_detail(exc: RequestValidationError) -> str:
    """FastAPI's validation errors as one short line, without the input (a 100 kB query
    is not echoed back)."""
    parts = []
    for e in exc.errors()[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "body", "path"))
        parts.append(f"{loc}: {e.get('msg', 'invalid')}" if loc else str(e.get("msg", "invalid")))
    return strip_controls("; ".join(parts))[:300] or "invalid request"


# ----------------------------------------------------------------------------- the app

def create_app(service: Service, max_upload: int = MAX_UPLOAD_BYTES, limits: Optional[Limits] = None):
    """The FastAPI app over a loaded `Service` (`limits` wins over `max_upload`)."""

    limits = limits or Limits(max_upload=max_upload)
    app = FastAPI(title="PhoCLIP search", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload + FORM_OVERHEAD)
    app.add_middleware(SecurityHeaders)
    jobs = app.state.cpu_jobs = CpuJobs(limits.cpu_jobs, limits.cpu_queue, limits.cpu_wait)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return JSONResponse({"detail": _validation_detail(exc)}, status_code=422)

    @app.exception_handler(Exception)
    async def crashed(request, exc: Exception):  # logged with its traceback by the server
        return JSONResponse({"detail": "internal error (logged)"}, status_code=500)

    def read_image(file: UploadFile):
        """In a worker thread: the upload's bytes (spooled by the form parser), capped, decoded."""
        data = file.file.read(limits.max_upload + 1)
        if len(data) > limits.max_upload:
            raise HTTPException(413, f"upload over {limits.max_upload} bytes")
        try:
            return decode_upload(data, limits.max_decode_bytes)
        except BadImage as e:
            raise HTTPException(415 if e.reason in ("not_an_image", "empty") else 422,
                                f"not a usable image ({one_line(e)})"[:300]) from None

    @app.head("/health", response_model=Health)
    @app.get("/health", response_model=Health)
    async def health() -> dict:
        # on the event loop, and cheap: it answers while every worker is busy
        return {"status": "ok", "images": len(service.items),
                "captions": service.index.meta["count"].get("captions", 0),
                "model": service.index.fingerprint, "device": str(service.device)}

    @app.get("/search", response_model=SearchResults, responses={422: ERR, 503: BUSY})
    async def search(q: str = Query(..., min_length=1, max_length=MAX_QUERY_CHARS),
                     k: int = Query(24, ge=1, le=MAX_K), offset: int = Query(0, ge=0, le=10 * MAX_K)) -> dict:
        q = q.strip()
        if not q:
            raise HTTPException(422, "q: blank")
        return {"query": q, "offset": offset, "results": await jobs.run(service.search_text, q, k, offset)}

    @app.post("/search/image", response_model=ImageSearchResults,
              responses={400: ERR, 413: ERR, 415: ERR, 422: ERR, 503: BUSY})
    async def search_image(file: UploadFile = File(...), k: int = Form(12, ge=1, le=MAX_K)) -> dict:
        return await jobs.run(lambda: service.search_image(read_image(file), k))

    @app.post("/tags", response_model=TagResults, responses={400: ERR, 404: ERR, 413: ERR, 415: ERR,
                                                             422: ERR, 503: BUSY})
    async def tags(tags: str = Form(..., max_length=64 * 1024), k: int = Form(3, ge=1, le=MAX_K),
                   file: Optional[UploadFile] = File(None), id: Optional[int] = Form(None)) -> dict:
        names = [t.strip() for t in tags.splitlines() if t.strip()][:MAX_TAGS]
        if not names or any(len(t) > MAX_QUERY_CHARS for t in names):
            raise HTTPException(422, f"give 1..{MAX_TAGS} tags, one per line, each under {MAX_QUERY_CHARS} characters")
        if file is None and id is None:
            raise HTTPException(422, "give an image ('file') or an indexed image id ('id')")
        if id is not None and not service.usable(id):
            raise HTTPException(404, "no such indexed image (or its index row is damaged)")
        return {"tags": await jobs.run(lambda: service.tags(
            names, k, read_image(file) if file is not None else None, id))}

    @app.get("/thumb/{item_id}", response_class=Response, responses={200: JPEG, 404: ERR, 422: ERR, 503: BUSY})
    async def thumb(item_id: int) -> Response:
        if not 0 <= item_id < len(service.items):
            raise HTTPException(404, "no such indexed image")
        data = service.cached_thumbnail(item_id)
        if data is None:
            try:
                data = await jobs.run(service.thumbnail, item_id, limits.max_thumb_source,
                                      limits.max_decode_bytes)
            except HTTPException:
                raise
            except Exception as e:  # a moved, broken or oversized file: the item, not the service, fails
                logger.warning("no thumbnail for item %d: %s", item_id, strip_controls(one_line(e))[:300])
                raise HTTPException(404, "thumbnail unavailable") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE, headers={"Content-Security-Policy": CSP})

    @app.get("/app.js", response_class=JavaScriptResponse)
    async def script() -> Response:
        return JavaScriptResponse(SCRIPT)

    return app


# ----------------------------------------------------------------------------- the server

class _Tally:
    """Counts an event and logs it at most once a minute (a flood of idle connections
    must not flood the log)."""

    def __init__(self, what: str) -> None:
        self.what, self.n, self.last = what, 0, 0.0

    def add(self, client) -> None:
        self.n += 1
        now = time.monotonic()
        if now - self.last >= 60:
            logger.warning("%s: %d since the last report (latest from %s)", self.what, self.n,
                           "%s:%s" % client if client else "?")
            self.n, self.last = 0, now


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with deadlines for receiving a request and a cap on
    open connections, so that idle and slow clients cannot lock others out (uvicorn
    0.54 has neither: its keep-alive timer starts only after a first response and
    restarts on every byte). A connection must send a whole request head within
    `header_timeout` s of opening or of its last response, and the body within
    `body_timeout` s of the head; else it is closed (with a 408 when a head had begun).
    Past `max_connections`, the connection waiting longest for a request head is closed
    to make room; one with a request in progress never is. Subclass per server
    (`make_server`) to set the three."""

    header_timeout: float = Limits.header_timeout
    body_timeout: float = Limits.body_timeout
    max_connections: int = Limits.max_connections
    expired = _Tally("closed connections that sent no complete request in time")
    evicted = _Tally("over the connection cap: closed the connections waiting longest for a request")

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._timer: Optional[Any] = None
        self._phase: Any = None
        self._since = 0.0
        super().connection_made(transport)
        self._follow()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def _follow(self) -> None:
        """(Re)arm the deadline when the client's side of the exchange changes state:
        IDLE = waiting for a request head, SEND_BODY = receiving its body, else none."""
        phase = self.conn.their_state
        if phase is self._phase:
            return
        self._phase, self._since = phase, self.loop.time()
        self._disarm()
        timeout = (self.header_timeout if phase is h11.IDLE else
                   self.body_timeout if phase is h11.SEND_BODY else None)
        if timeout is not None and not self.transport.is_closing():
            self._timer = self.loop.call_later(timeout, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        self.expired.add(self.client)
        if self._phase is h11.IDLE and self.conn.trailing_data[0]:  # a head had begun
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"content-length: 30\r\nconnection: close\r\n\r\n"
                                 b'{"detail": "request timeout"}\n')
        self.transport.close()

    def _make_room(self) -> None:
        open_ = [c for c in self.connections if not c.transport.is_closing()]
        if len(open_) <= self.max_connections:
            return  # the others over the cap are closing already
        waiting = [c for c in open_ if isinstance(c, GuardedH11Protocol) and c._phase is h11.IDLE]
        # the oldest waiter; this new connection itself when every other has a request going
        victim = min(waiting, key=lambda c: c._since, default=self)
        self.evicted.add(victim.client)
        victim.transport.close()


def make_server(app, host: str, port: int, limits: Limits, log_level: str = "warning"):
    """A uvicorn server for `app` with `GuardedH11Protocol` (deadlines, connection cap) in
    place of uvicorn's own concurrency limit, which counted idle connections and answered
    everyone 503 while they stayed open. `port=0` picks a free port."""
    import resource

    import uvicorn

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    cap = limits.max_connections
    if soft != resource.RLIM_INFINITY and cap > soft - 64:
        cap = max(16, soft - 64)  # leave descriptors for files, threads and the listener
        logger.warning("--max-connections %d lowered to %d: the process may open %d files (ulimit -n)",
                       limits.max_connections, cap, soft)
    proto = type("GuardedH11Protocol", (GuardedH11Protocol,), {
        "header_timeout": limits.header_timeout, "body_timeout": limits.body_timeout, "max_connections": cap})
    config = uvicorn.Config(app, host=host, port=port, http=proto, ws="none", log_level=log_level,
                            timeout_keep_alive=5, h11_max_incomplete_event_size=64 * 1024,
                            limit_concurrency=None)
    return uvicorn.Server(config)


CSP = ("default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; img-src 'self' blob:; "
       "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")

PAGE = """<!doctype html>
<html lang="vi"><head><meta charset="utf-8"><title>PhoCLIP — tìm ảnh bằng tiếng Việt</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:16px;color:#222}
h1{font-size:22px}form{display:flex;gap:8px}#q{flex:1;font-size:17px;padding:8px}
button{font-size:16px;padding:8px 14px}
#drop{margin:12px 0;padding:14px;border:2px dashed #aaa;border-radius:8px;text-align:center;color:#555}
#drop.over{border-color:#2a6;background:#efe}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:12px;margin-top:12px}
figure{margin:0;border:1px solid #ddd;border-radius:6px;padding:6px;background:#fafafa}
figure img{width:100%;height:160px;object-fit:cover;border-radius:4px}
figcaption{font-size:13px;margin-top:4px;overflow-wrap:anywhere}.score{color:#777;font-size:12px}
#status{color:#555;margin-top:8px}#pager{margin-top:12px;display:flex;gap:8px}
#captions li{margin:3px 0}
</style></head><body>
<h1>PhoCLIP — tìm ảnh bằng tiếng Việt</h1>
<form id="f"><input id="q" name="q" autocomplete="off" placeholder="Ví dụ: một con chó chạy trên bãi cỏ">
<button id="go" type="submit">Tìm</button></form>
<div id="drop">Kéo thả một ảnh vào đây (hoặc <label><u>chọn ảnh</u>
<input id="file" type="file" accept="image/*" hidden></label>) để tìm ảnh tương tự và chú thích phù hợp</div>
<div id="status"></div><ol id="captions"></ol><div id="grid"></div>
<div id="pager"><button id="prev" type="button" hidden>← Trang trước</button>
<button id="next" type="button" hidden>Trang sau →</button></div>
<script src="/app.js"></script></body></html>
"""

SCRIPT = r"""
const K = 24; let query = "", offset = 0;
const $ = (id) => document.getElementById(id);
function status(t) { $("status").textContent = t; }
function show(results) {
  const grid = $("grid"); grid.replaceChildren();
  for (const r of results) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.className = "thumb"; img.loading = "lazy"; img.src = r.thumb; img.alt = r.caption || r.key;
    const cap = document.createElement("figcaption");
    const sc = document.createElement("div"); sc.className = "score";
    sc.textContent = "#" + r.rank + " · " + r.score.toFixed(3);
    const txt = document.createElement("div"); txt.textContent = r.caption || r.path || r.key;
    cap.append(sc, txt); fig.append(img, cap); grid.append(fig);
  }
}
async function search(q, off) {
  query = q; offset = off; $("captions").replaceChildren();
  status("Đang tìm…");
  const res = await fetch("/search?" + new URLSearchParams({q: q, k: K, offset: off}));
  const body = await res.json();
  if (!res.ok) { status("Lỗi: " + (body.detail || res.status)); return; }
  show(body.results);
  status(body.results.length ? "Kết quả " + (off + 1) + "–" + (off + body.results.length) + " cho «" + q + "»"
                             : "Không có kết quả");
  $("prev").hidden = off === 0; $("next").hidden = body.results.length < K;
}
async function searchImage(file) {
  status("Đang tìm theo ảnh…"); $("prev").hidden = $("next").hidden = true;
  const fd = new FormData(); fd.append("file", file); fd.append("k", K);
  const res = await fetch("/search/image", {method: "POST", body: fd});
  const body = await res.json();
  if (!res.ok) { status("Lỗi: " + (body.detail || res.status)); return; }
  show(body.images);
  const ol = $("captions"); ol.replaceChildren();
  for (const c of body.captions.slice(0, 5)) {
    const li = document.createElement("li"); li.textContent = c.caption + " (" + c.score.toFixed(3) + ")"; ol.append(li);
  }
  status("Ảnh tương tự" + (body.captions.length ? " và chú thích phù hợp" : ""));
}
$("f").addEventListener("submit", (e) => { e.preventDefault(); const q = $("q").value.trim(); if (q) search(q, 0); });
$("prev").addEventListener("click", () => search(query, Math.max(0, offset - K)));
$("next").addEventListener("click", () => search(query, offset + K));
$("file").addEventListener("change", (e) => { if (e.target.files[0]) searchImage(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files[0]) searchImage(e.dataTransfer.files[0]); });
"""


def _raise_open_files_limit() -> None:
    """Up to the hard limit: each connection is a descriptor."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    init_logger()
    d = Limits()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, help="an index folder (launch/build_index.py)")
    p.add_argument("--model", help="default: the model the index was built with")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                   help="onnx: embed with onnxruntime (export_model.py --format onnx first)")
    p.add_argument("--device", default="auto")
    p.add_argument("--vncorenlp-dir", help="VnCoreNLP model folder (default: $VNCORENLP_DIR)")
    p.add_argument("--max-upload-mb", type=float, default=d.max_upload / 2**20)
    p.add_argument("--max-decode-mb", type=float, default=d.max_decode_bytes / 2**20,
                   help="memory one image may take to decode; larger images are refused unread")
    p.add_argument("--max-thumb-source-mb", type=float, default=d.max_thumb_source / 2**20,
                   help="bytes read for one thumbnail's source file or shard member")
    p.add_argument("--cpu-jobs", type=int, default=d.cpu_jobs, help="decodes and embeddings at once")
    p.add_argument("--cpu-queue", type=int, default=d.cpu_queue,
                   help="jobs that may wait for a worker; more get 503 with Retry-After")
    p.add_argument("--cpu-wait", type=float, default=d.cpu_wait,
                   help="seconds a job may wait for a worker before it gets 503")
    p.add_argument("--header-timeout", type=float, default=d.header_timeout,
                   help="seconds a connection has to send a request head")
    p.add_argument("--body-timeout", type=float, default=d.body_timeout,
                   help="seconds a request has to send its body")
    p.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="open connections; past it the one idle longest is closed")
    args = p.parse_args(argv)
    if (min(args.max_upload_mb, args.max_decode_mb, args.max_thumb_source_mb, args.header_timeout,
            args.body_timeout, args.cpu_wait) <= 0 or args.cpu_jobs < 1 or args.cpu_queue < 0
            or args.max_connections < 1):
        p.error("sizes, timeouts, --cpu-jobs and --max-connections must be positive, --cpu-queue >= 0")
    limits = Limits(max_upload=int(args.max_upload_mb * 2**20), max_decode_bytes=int(args.max_decode_mb * 2**20),
                    max_thumb_source=int(args.max_thumb_source_mb * 2**20), cpu_jobs=args.cpu_jobs,
                    cpu_queue=args.cpu_queue, cpu_wait=args.cpu_wait,
                    header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                    max_connections=args.max_connections)
    try:
        service = Service(args.index, args.model, args.backend, args.device, args.vncorenlp_dir)
    except EXPECTED_ERRORS as e:
        print(f"serve: {strip_controls(one_line(e))}", file=sys.stderr)
        return 2
    _raise_open_files_limit()
    server = make_server(create_app(service, limits=limits), args.host, args.port, limits)
    logger.info("serving %d images of %s on http://%s:%d/", len(service.items), args.index, args.host, args.port)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
