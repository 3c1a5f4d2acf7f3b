"""The service's settings: one typed class (what the command line fills in), checked
where it is made, and the fixed caps no setting changes."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal, Mapping, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_QUERY_CHARS = 512
MAX_KNN_TEXT = 2048  # clip-retrieval's text: a caption searched again may be longer than a typed query
MAX_KNN_RESULTS = 10_000  # clip-retrieval's num_result_ids (its page asks 3,000, its download 10,000)
MAX_METADATA_IDS = 1000  # ids of one /metadata request (its page asks 40 at a time)
MAX_EMBEDDING_DIM = 8192  # longest embedding_input parsed (then it must equal the index's width)
MAX_URL_CHARS = 2048
MAX_UPLOAD_PIXELS = 40_000_000
MAX_K = 100
MAX_TAGS = 200
MAX_OFFSET = 10 * MAX_K
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small fields around an upload
THUMB_SIZE = 256
PHOTO_SIZE = 1024  # the detail view's picture, longest side

# everyday Vietnamese subjects: the page's zero-shot tags when no --tags file is given
DEFAULT_TAGS = ("người", "trẻ em", "chó", "mèo", "chim", "ngựa", "xe hơi", "xe máy", "xe đạp", "xe buýt",
                "thuyền", "máy bay", "nhà", "đường phố", "cây", "hoa", "biển", "núi", "bầu trời",
                "đồ ăn", "bóng đá", "trong nhà", "ngoài trời", "ban đêm")


_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # an index's name (in URLs and clip-retrieval's indice_name)


def named_indices(specs: str | Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """{name: folder} from `NAME=PATH` specs or bare paths (named by their folder);
    refused in one line for a bad or repeated name."""
    if isinstance(specs, Mapping):
        pairs = list(specs.items())
    else:
        pairs = []
        for s in [specs] if isinstance(specs, str) else list(specs):
            name, sep, path = s.partition("=")
            if sep and NAME.fullmatch(name) and path:
                pairs.append((name, path))
            else:  # a bare path, "=" in it or not: named by its folder, spelled as a name
                folder = re.sub(r"[^A-Za-z0-9._-]", "_", Path(os.path.abspath(s)).name).lstrip("._-")[:64]
                pairs.append((folder or "index", s))
    out: dict[str, str] = {}
    for name, path in pairs:
        if not NAME.fullmatch(name):
            raise ValueError(f"index name {name!r}: use letters, digits, '.', '_' or '-' (64 at most), "
                             "as --index NAME=PATH")
        if name in out:
            raise ValueError(f"index name {name!r} given twice ({out[name]}, {path}): name them with --index NAME=PATH")
        out[name] = path
    if not out:
        raise ValueError("no index given")
    return out


def knn_body_cap(max_upload: int) -> int:
    """Bytes of a /knn-service body: a base64 picture takes 4/3 of its bytes, plus the JSON around it."""
    return (max_upload + 2) // 3 * 4 + FORM_OVERHEAD


def _cpu_jobs() -> int:
    return max(2, min(4, os.cpu_count() or 1))


class Settings(BaseModel):
    """Where the index and model are, how the service listens, and what one request, one
    connection and the whole service may cost."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    index: tuple[str, ...] = ()
    """the indices served: NAME=PATH (repeatable) or a bare index folder (named by its
    folder); the first is the default of every route"""
    model: Optional[str] = None
    """the model folder; default: the model the index was built with"""
    backend: Literal["torch", "onnx"] = "torch"
    """onnx: the encoders run on onnxruntime (export_model.py --format onnx first)"""
    device: str = "auto"
    """torch device for the torch backend; auto: cuda when present"""
    vncorenlp_dir: Optional[str] = None
    """VnCoreNLP model folder (default: $VNCORENLP_DIR)"""
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    """0 picks a free port"""
    tags: tuple[str, ...] = Field(DEFAULT_TAGS, min_length=1, max_length=MAX_TAGS)
    """the page's zero-shot tag vocabulary (GET /tags)"""
    max_upload: int = Field(10 * 1024 * 1024, gt=0)
    """bytes of one uploaded image; a request body over it (+ FORM_OVERHEAD) gets 413 as
    soon as it is over, chunked or not, and the connection is closed unread"""
    max_decode_bytes: int = Field(256 * 1024 * 1024, gt=0)
    """memory one image may take to decode (pixels x bytes per pixel, conversions to RGB
    included); refused from its header, before decoding, over it"""
    max_thumb_source: int = Field(32 * 1024 * 1024, gt=0)
    """bytes read for one thumbnail's source (a file or a shard member); more: 404, logged"""
    images_roots: tuple[str, ...] = ()
    """folders pictures are served from (an item whose file resolves elsewhere, links
    followed: 404, logged); default: the index folder and the images folder it was built from"""
    cpu_jobs: int = Field(default_factory=_cpu_jobs, ge=1)
    """decodes and embeddings at once, in worker threads (never on the event loop)"""
    cpu_queue: int = Field(64, ge=0)
    """jobs that may wait for a worker (bursts of ordinary users, a page's thumbnails);
    one more gets 503 + Retry-After at once"""
    cpu_wait: float = Field(5.0, gt=0)
    """seconds a job may wait for a worker before it gets 503 + Retry-After"""
    header_timeout: float = Field(10.0, gt=0)
    """seconds a connection has to send a whole request head (from opening, or from its
    last response on keep-alive)"""
    body_timeout: float = Field(60.0, gt=0)
    """seconds from a request's head to the end of its body"""
    body_min_rate: float = Field(1024.0, ge=0)
    """bytes a second a request body must arrive at, over every --header-timeout window;
    slower (a few bytes, then nothing): the connection is closed"""
    write_timeout: float = Field(30.0, gt=0)
    """seconds a response may wait for the client to read it (its send buffer full, as
    with a client that pipelines requests and never reads); then the connection is closed"""
    max_connections: int = Field(1024, ge=1)
    """open connections; past it the one that has made the least progress on its head,
    its body or reading its response is closed (never one whose request is being worked on)"""
    max_body_memory: int = Field(256 * 1024 * 1024, gt=0)
    """bytes of request bodies held at once, all requests together (a request with a
    Content-Length holds it from its head, a chunked one as it arrives); a request that
    would go over gets 503 + Retry-After, its body unread"""
    image_url_hosts: tuple[str, ...] = ()
    """hosts /knn-service's image_url may fetch from ("name" or "name:port"); none: the
    service fetches no URL"""
    reload_every: float = Field(5.0, ge=0)
    """seconds between checks for a changed index (an add or a rebuild), served without a
    restart; 0: never reloaded"""

    @model_validator(mode="after")
    def _budget_fits_a_request(self) -> "Settings":
        one = max(self.max_upload + FORM_OVERHEAD, knn_body_cap(self.max_upload))
        if self.max_body_memory < one:
            raise ValueError(f"max_body_memory {self.max_body_memory} is under one largest request body ({one} bytes, "
                             "from max_upload): every such upload would be refused")
        return self

    @field_validator("index", mode="before")
    @classmethod
    def _one_or_more(cls, v):
        return (v,) if isinstance(v, str) and v else () if v == "" else v

    @field_validator("index")
    @classmethod
    def _names(cls, specs: tuple[str, ...]) -> tuple[str, ...]:
        if specs:
            named_indices(specs)  # a bad or repeated name refused here, naming the flag
        return specs

    @field_validator("image_url_hosts")
    @classmethod
    def _hosts(cls, hosts: tuple[str, ...]) -> tuple[str, ...]:
        bad = [h for h in hosts if not _HOST.fullmatch(h)]
        if bad:
            raise ValueError(f"not a host name or host:port: {', '.join(bad)}")
        return hosts

    @field_validator("images_roots")
    @classmethod
    def _folders(cls, roots: tuple[str, ...]) -> tuple[str, ...]:
        bad = [r for r in roots if not os.path.isdir(r)]
        if bad:
            raise ValueError(f"not a folder: {', '.join(bad)}")
        return roots
