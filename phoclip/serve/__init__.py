"""The search service as a library: `create_app(Service(...), Settings(...))` gives the
FastAPI app (routers per resource under `routes/`, dependencies in `deps`, typed answers
in `models`, the page as package data under `static/`), `make_server` the uvicorn
server that guards it against idle and slow clients. The command line lives in
`phoclip_cli.serve` (`launch/serve.py`, `phoclip-serve`).

    service = Service("index/")                # model + index loaded and probed
    settings = Settings(index="index/", port=8080)
    make_server(create_app(service, settings), settings).run()

`Service(["vi=idx_vi/", "news=idx_news/"])` serves several indices by name (the first is
the default); each is opened again when its folder changes (`Settings.reload_every`).

Routes (schema: /openapi.json; each of ours takes ?index=NAME, default the first):
    GET|HEAD /health                     status, index sizes and versions, backend, model fingerprint
    GET  /search?q=TEXT&k=24&offset=0    text → image
    POST /search/image (multipart 'file') image → text (shard indexes) and image → image
    GET  /items/ID, /items/ID/similar    an indexed image's captions and source; more like it
    GET  /tags, POST /tags               the tag vocabulary; zero-shot tags of a 'file' or an 'id'
    GET  /thumb/ID, /photo/ID            JPEGs of indexed image ID (only indexed items)
    GET  /                               the page (static/index.html, app.js, style.css)
clip-retrieval's back-end API (its page and its ClipClient work unchanged; CORS answered):
    POST /knn-service                    {text|image|image_url|embedding_input, modality, num_images, ...}
    POST /metadata                       {ids, indice_name} -> [{id, metadata}]
    GET  /indices-list, /config.json     the index names; the back end for clip-retrieval's page
Every request is untrusted: queries and uploads are capped (a body is counted as it
streams, chunked or not), images are refused before decoding when they would take more
than `max_decode_bytes`, and decoding and embedding run in at most `cpu_jobs` worker
threads, never on the event loop (past `cpu_queue` waiting jobs or `cpu_wait` seconds of
waiting: 503 with Retry-After). A connection must send a request head within
`header_timeout` s and its body within `body_timeout` s, and past `max_connections` the
one waiting longest for a request head is closed. The page writes captions as text,
never as HTML. Every error is JSON {"detail": "one line"}.

Heavy modules (torch, fastapi) load on first use of these names.
"""
from __future__ import annotations

from phoclip.serve.settings import Settings

__all__ = ["Settings", "Service", "create_app", "make_server", "CpuJobs"]

_LAZY = {"Service": "phoclip.serve.service", "create_app": "phoclip.serve.app",
         "make_server": "phoclip.serve.server", "CpuJobs": "phoclip.serve.jobs"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'phoclip.serve' has no attribute {name!r}")
