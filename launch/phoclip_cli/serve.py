"""A search service over one or more indices: a JSON API, a Vietnamese search page, and
clip-retrieval's back-end API (its page and its Python client work against it unchanged).

    python launch/serve.py --index index/ [--model runs/exp1] --host 127.0.0.1 --port 8080
    python launch/serve.py --index vi=idx_vi/ --index news=idx_news/    # several, by name
    open http://127.0.0.1:8080/

An index that changes on disk (an add, a rebuild) is served within --reload-every
seconds, without a restart; one that then fails to open is logged and the old version
keeps serving.

The model and the index are loaded once (GPU when present; `--backend onnx` runs the
encoders on onnxruntime) and probed: a model whose embeddings do not fit the index is
refused at start, not with a 500 for every query. The page keeps its query in the URL
(?q=, ?like=ID, &item=ID), so results can be shared. The routes: phoclip.serve's
docstring, and /openapi.json of a running service.
Every request is untrusted: bodies are capped as they stream, images are refused before
decoding past --max-decode-mb, decoding and embedding run in at most --cpu-jobs worker
threads (past --cpu-queue waiting jobs or --cpu-wait seconds: 503 with Retry-After), and
idle, slow and non-reading connections are cut (--header-timeout, --body-timeout,
--body-min-rate, --write-timeout, --max-connections), and the request bodies held at once
are capped (--max-body-memory-mb).
The service itself is phoclip.serve; this is its command line.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from pydantic import ValidationError

from phoclip.data.text import strip_controls
from phoclip.errors import EXPECTED_ERRORS, one_line
from phoclip.log import init_logger
from phoclip.serve.settings import MAX_QUERY_CHARS, MAX_TAGS, Settings
from phoclip_cli.common import HelpFormatter, read_lines, refuse

logger = logging.getLogger("serve")

MB = 1 << 20
# settings given in other units on the command line
_FLAG_OF = {"max_upload": "--max-upload-mb", "max_decode_bytes": "--max-decode-mb",
            "max_thumb_source": "--max-thumb-source-mb", "images_roots": "--images-root",
            "max_body_memory": "--max-body-memory-mb",
            "image_url_hosts": "--allow-image-url"}


def build_parser() -> argparse.ArgumentParser:
    """The command's flags; defaults and meanings come from `phoclip.serve.Settings` (one
    place: its field docstrings)."""
    d = Settings()

    def doc(field: str) -> str:
        return " ".join((Settings.model_fields[field].description or "").split())

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--index", required=True, action="append", metavar="[NAME=]PATH",
                   help="an index folder, or NAME=PATH (repeatable: several named indices, the first the default; "
                        "a bare folder is named by its folder)")
    p.add_argument("--model", help="a model folder, run folder or checkpoint (default: the model the index was built with)")
    p.add_argument("--host", default=d.host, help="the address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=d.port, help="the port to listen on (0: a free one)")
    p.add_argument("--backend", choices=("torch", "onnx"), default=d.backend, help=doc("backend"))
    p.add_argument("--device", default=d.device, help=doc("device"))
    p.add_argument("--vncorenlp-dir", help=doc("vncorenlp_dir"))
    p.add_argument("--tags", help="the page's zero-shot tags: a file with one Vietnamese tag per line "
                                  "(default: a few everyday subjects)")
    p.add_argument("--max-upload-mb", type=float, default=d.max_upload / MB,
                   help="MB one uploaded image may take; a request body over it gets 413 as it streams, "
                        "chunked or not, and is not read further")
    p.add_argument("--max-decode-mb", type=float, default=d.max_decode_bytes / MB,
                   help="MB of memory one image may take to decode; larger images are refused from their "
                        "header, unread")
    p.add_argument("--images-root", action="append", metavar="DIR",
                   help="a folder pictures are served from (repeatable); an item whose file resolves elsewhere, "
                        "links followed, gets 404, logged once (default: the index folder, and the images folder "
                        "index.json names only when it is inside the index folder; one outside is logged with "
                        "the flag to add)")
    p.add_argument("--max-body-memory-mb", type=float, default=d.max_body_memory / MB,
                   help="MB of request bodies held at once, all requests together; a request that would go over "
                        "gets 503 + Retry-After, its body unread")
    p.add_argument("--max-thumb-source-mb", type=float, default=d.max_thumb_source / MB,
                   help="MB read for one thumbnail's source file or shard member (more: 404, logged)")
    p.add_argument("--allow-image-url", action="append", metavar="HOST",
                   help="a host (or host:port) whose pictures /knn-service's image_url may fetch (repeatable); "
                        "by default the service fetches no URL")
    p.add_argument("--reload-every", type=float, default=d.reload_every, metavar="SECONDS", help=doc("reload_every"))
    for field, kind in (("cpu_jobs", int), ("cpu_queue", int), ("cpu_wait", float), ("header_timeout", float),
                        ("body_timeout", float), ("body_min_rate", float), ("write_timeout", float),
                        ("max_connections", int)):
        p.add_argument("--" + field.replace("_", "-"), type=kind, default=getattr(d, field), help=doc(field))
    return p


def read_tags(path: str) -> tuple[str, ...]:
    """One tag a line (blank lines skipped); refused in one line naming the file when it
    is unreadable, empty or has too many or too long tags."""
    tags = tuple(dict.fromkeys(read_lines(path)))
    if not 0 < len(tags) <= MAX_TAGS or any(len(t) > MAX_QUERY_CHARS for t in tags):
        raise ValueError(f"{path}: give 1..{MAX_TAGS} tags, one per line, each under {MAX_QUERY_CHARS} characters "
                         f"(it has {len(tags)})")
    return tags


def settings_from_args(args: argparse.Namespace):
    """`phoclip.serve.Settings` from parsed flags (raises pydantic's ValidationError)."""
    extra = {"tags": read_tags(args.tags)} if args.tags else {}
    return Settings(index=tuple(args.index), model=args.model, backend=args.backend, device=args.device,
                    vncorenlp_dir=args.vncorenlp_dir, host=args.host, port=args.port,
                    max_upload=int(args.max_upload_mb * MB), max_decode_bytes=int(args.max_decode_mb * MB),
                    max_thumb_source=int(args.max_thumb_source_mb * MB), images_roots=tuple(args.images_root or ()),
                    cpu_jobs=args.cpu_jobs,
                    cpu_queue=args.cpu_queue, cpu_wait=args.cpu_wait, header_timeout=args.header_timeout,
                    body_timeout=args.body_timeout, body_min_rate=args.body_min_rate,
                    write_timeout=args.write_timeout, max_connections=args.max_connections,
                    max_body_memory=int(args.max_body_memory_mb * MB),
                    image_url_hosts=tuple(args.allow_image_url or ()), reload_every=args.reload_every, **extra)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, load and probe the model and index, serve until stopped. 2: refused."""
    p = build_parser()
    args = p.parse_args(argv)
    init_logger()
    try:
        settings = settings_from_args(args)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        flag = _FLAG_OF.get(field, "--" + field.replace("_", "-"))
        p.error(f"{flag}: {err['msg']}")
    except EXPECTED_ERRORS as e:
        p.error(strip_controls(one_line(e)))
    from phoclip.serve import Service, create_app, make_server  # lazy: torch and fastapi (~3 s); --help answers without
    from phoclip.serve.server import raise_open_files_limit  # lazy: uvicorn; --help answers without it

    try:
        service = Service.from_settings(settings)
    except EXPECTED_ERRORS as e:
        return refuse("serve", e)
    raise_open_files_limit()
    server = make_server(create_app(service, settings), settings)
    first = service.indices.get()
    logger.info("serving %d images of %s on http://%s:%d/ (%s; indices: %s)", first.count(), Path(first.folder),
                settings.host, settings.port, settings.backend, ", ".join(service.indices.names()))
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
