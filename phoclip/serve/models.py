"""The service's typed answers (what /openapi.json documents) and the response
descriptions shared by the routes."""
from __future__ import annotations

from typing import Annotated, Optional, Union

from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from phoclip.serve.settings import MAX_EMBEDDING_DIM, MAX_KNN_RESULTS, MAX_KNN_TEXT, MAX_METADATA_IDS, MAX_URL_CHARS


class Error(BaseModel):
    """Every error: one line saying what is wrong."""
    detail: str


class IndexHealth(BaseModel):
    """One named index: its size and the version served."""
    name: str
    images: int
    captions: int
    skipped: Optional[int]
    """rows not served (not finite unit vectors); null: not counted (too large to scan)"""
    version: Optional[str]
    index_bytes: int


class Health(BaseModel):
    """Liveness and what is served: the encoder backend, the default index's size, and
    every index by name."""
    status: str
    images: int
    captions: int
    skipped: Optional[int]
    """index rows not served (not finite unit vectors); null: not counted (too large to scan)"""
    dim: int
    index_bytes: int
    """bytes of the index's embedding files"""
    backend: str
    model: str
    device: str
    indices: list[IndexHealth]


NAME_CHARS = 64
_Short = Annotated[str, Field(max_length=16)]


class KnnRequest(BaseModel):
    """clip-retrieval's /knn-service body, as its page and its Python client send it.
    One query: `text` (when not empty), else `image` (base64), else `image_url`, else
    `embedding_input` (the index's width; normalised here). `modality` "image" searches
    the image embeddings, anything else the caption (text) embeddings. `use_mclip`,
    `use_safety_model`, `use_violence_detector`, `aesthetic_score` and `aesthetic_weight`
    are accepted and not applied (this service has no such models)."""

    model_config = ConfigDict(extra="ignore")

    text: Optional[str] = Field(None, max_length=MAX_KNN_TEXT)
    image: Optional[str] = None
    """base64 of the picture's file (a data: URL prefix is tolerated); capped as an upload"""
    image_url: Optional[str] = Field(None, max_length=MAX_URL_CHARS)
    """fetched only from the hosts serve --allow-image-url names"""
    embedding_input: Optional[list[float]] = Field(None, max_length=MAX_EMBEDDING_DIM)
    modality: str = Field("image", max_length=16)
    num_images: int = Field(..., ge=1, le=MAX_KNN_RESULTS)
    """results that carry their metadata (the first ones)"""
    num_result_ids: Optional[int] = Field(None, ge=1, le=MAX_KNN_RESULTS)
    """results in all (default: num_images)"""
    indice_name: Optional[str] = Field(None, max_length=NAME_CHARS)
    """an index name from /indices-list (null or "": the first)"""
    deduplicate: bool = False
    """drop a result within cosine 0.94 of a better one (among the best 1,000)"""
    use_mclip: bool = False
    use_safety_model: bool = False
    use_violence_detector: bool = False
    aesthetic_score: Optional[Union[int, _Short]] = Field(None, union_mode="left_to_right")
    aesthetic_weight: Optional[Union[float, _Short]] = Field(None, union_mode="left_to_right")


class MetadataRequest(BaseModel):
    """clip-retrieval's /metadata body: image rows by id."""

    model_config = ConfigDict(extra="ignore")

    ids: list[int] = Field(..., max_length=MAX_METADATA_IDS)
    indice_name: Optional[str] = Field(None, max_length=NAME_CHARS)


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
