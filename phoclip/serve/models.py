"""The service's typed answers (what /openapi.json documents) and the response
descriptions shared by the routes."""
from __future__ import annotations

from typing import Optional

from fastapi.responses import Response
from pydantic import BaseModel


class Error(BaseModel):
    """Every error: one line saying what is wrong."""
    detail: str


class Health(BaseModel):
    """Liveness and what is served: the encoder backend and the index's size."""
    status: str
    images: int
    captions: int
    skipped: int
    """index rows not served (not finite unit vectors at load)"""
    dim: int
    index_bytes: int
    """bytes of the index's embedding files"""
    backend: str
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


class Item(BaseModel):
    """One indexed image: its source and every caption the index holds for it."""
    id: int
    key: str
    path: str
    """the image file ("" for a shard's item)"""
    shard: str
    """the shard file's name holding it ("" for a file)"""
    source: str
    captions: list[str]
    thumb: str
    photo: str


class TagScore(BaseModel):
    tag: str
    score: float


class TagResults(BaseModel):
    tags: list[TagScore]


class TagVocabulary(BaseModel):
    tags: list[str]


class JavaScriptResponse(Response):
    media_type = "text/javascript"


class CssResponse(Response):
    media_type = "text/css"


class SvgResponse(Response):
    media_type = "image/svg+xml"


ERR = {"model": Error}
BUSY = {"model": Error, "description": "every CPU worker is busy: retry after Retry-After seconds"}
JPEG = {"description": "a JPEG picture", "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}
