"""The service's settings: one typed class (what the command line fills in), checked
where it is made, and the fixed caps no setting changes."""
from __future__ import annotations

import os
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_QUERY_CHARS = 512
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


def _cpu_jobs() -> int:
    return max(2, min(4, os.cpu_count() or 1))


class Settings(BaseModel):
    """Where the index and model are, how the service listens, and what one request, one
    connection and the whole service may cost."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    index: str = ""
    """an index folder (launch/build_index.py)"""
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
    max_connections: int = Field(1024, ge=1)
    """open connections; past it the one waiting longest for a request head is closed"""

    @field_validator("images_roots")
    @classmethod
    def _folders(cls, roots: tuple[str, ...]) -> tuple[str, ...]:
        bad = [r for r in roots if not os.path.isdir(r)]
        if bad:
            raise ValueError(f"not a folder: {', '.join(bad)}")
        return roots
