"""clip-retrieval's back-end API, so its page and its Python client (`ClipClient`) work
against this service unchanged: POST /knn-service, POST /metadata, GET /indices-list and
the page's GET /config.json. Bodies are JSON whatever their content type (the page posts
text/plain, the client none), parsed strictly (NaN and Infinity refused) into capped
models; answers are strict JSON. CORS is answered for these routes (any origin, no
credentials): the page runs on another origin."""
from __future__ import annotations

import json
import math
from typing import Any

import torch
from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from phoclip.serve.deps import JobsDep, ServiceDep, SettingsDep, image_from_bytes, served_index
from phoclip.serve.indices import CAPTIONS, IMAGES, ServedIndex
from phoclip.serve.models import BUSY, ERR, KnnRequest, MetadataRequest
from phoclip.serve.service import Service
from phoclip.serve.settings import Settings
from phoclip.serve.uploads import Refused, base64_bytes, fetch_image_url

router = APIRouter(tags=["clip-retrieval"])
CORS_PATHS = ("/knn-service", "/metadata", "/indices-list", "/config.json")
_ERRORS = {s: ERR for s in (400, 403, 404, 413, 415, 422)} | {503: BUSY}
_LIST = {"description": "a JSON list", "content": {"application/json": {"schema": {"type": "array"}}}}


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


async def _body(request: Request, model: type[BaseModel]) -> Any:
    """The request's JSON body, whatever its content type, as `model`; 400/422 in one line."""
    raw = await request.body()
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, NaN, nested too deep, a 5,000-digit number
        raise HTTPException(400, f"body: not JSON ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(data, dict):
        raise HTTPException(422, "body: a JSON object is expected")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_input=False)) from None


def _body_schema(model: type[BaseModel]) -> dict:
    schema = {"schema": model.model_json_schema()}
    return {"requestBody": {"required": True, "content": {"application/json": schema, "text/plain": schema}}}


def _embedding(req: KnnRequest, dim: int) -> torch.Tensor:
    """`embedding_input` as a [1, dim] unit query; 422 unless it is `dim` finite numbers, not all 0."""
    v = req.embedding_input
    if len(v) != dim:
        raise HTTPException(422, f"embedding_input: {len(v)} numbers, the index holds {dim}-wide embeddings")
    if not all(math.isfinite(x) for x in v):
        raise HTTPException(422, "embedding_input: not finite numbers")
    t = torch.tensor(v, dtype=torch.float64)
    norm = float(t.norm())
    if not math.isfinite(norm) or norm == 0:
        raise HTTPException(422, "embedding_input: zero (or too large) length")
    return (t / norm).float()[None]


def _query(service: Service, settings: Settings, req: KnnRequest, dim: int) -> torch.Tensor:
    """In a worker thread: the query embedding, in clip-retrieval's order of precedence."""
    try:
        if req.text:
            return service.embed_text(req.text)
        if req.image:
            data = base64_bytes(req.image, settings.max_upload)
        elif req.image_url:
            data = fetch_image_url(req.image_url, settings.image_url_hosts, settings.max_upload)
        elif req.embedding_input is not None:
            return _embedding(req, dim)
        else:
            raise HTTPException(422, "give text, image, image_url or embedding_input")
    except Refused as e:
        raise HTTPException(e.status, e.detail) from None
    return service.embed_image(image_from_bytes(data, settings))


@router.post("/knn-service", responses={200: _LIST, **_ERRORS}, openapi_extra=_body_schema(KnnRequest))
async def knn_service(request: Request, service: ServiceDep, settings: SettingsDep, jobs: JobsDep) -> JSONResponse:
    """The nearest images: [{id, similarity, url, caption, image_path, ...}], the first
    num_images with their metadata, the others id and similarity only."""
    req = await _body(request, KnnRequest)
    served: ServedIndex = served_index(service, req.indice_name)
    kind = IMAGES if req.modality == "image" else CAPTIONS
    if not served.count(kind):
        raise HTTPException(422, f"index {served.name} has no {kind} embeddings (modality {req.modality!r})"[:200])
    if not (req.text or req.image or req.image_url) and req.embedding_input is not None:
        _embedding(req, served.dim)  # refused on the event loop, before taking a worker
    base = str(request.base_url)
    k = req.num_result_ids or req.num_images

    def run() -> list:
        return service.knn(served, _query(service, settings, req, served.dim), kind, k, req.num_images,
                           req.deduplicate, base)

    return JSONResponse(await jobs.run(run))


@router.post("/metadata", responses={200: _LIST, **_ERRORS}, openapi_extra=_body_schema(MetadataRequest))
async def metadata(request: Request, service: ServiceDep, jobs: JobsDep) -> JSONResponse:
    """[{id, metadata}] of image rows `ids` of `indice_name`."""
    req = await _body(request, MetadataRequest)
    served = served_index(service, req.indice_name)
    bad = [i for i in req.ids if not served.has(i)]
    if bad:
        raise HTTPException(404, f"no image {bad[0]} in index {served.name} ({served.count(IMAGES)} images)")
    if not req.ids:
        return JSONResponse([])
    return JSONResponse(await jobs.run(service.metadata, served, req.ids, str(request.base_url)))


@router.get("/indices-list", response_model=list[str])
async def indices_list(service: ServiceDep) -> list[str]:
    """The index names, the default first."""
    return service.indices.names()


@router.get("/config.json")
async def config(request: Request) -> dict:
    """What clip-retrieval's page reads at start: this service as its back end."""
    return {"defaultBackend": str(request.base_url).rstrip("/"), "defaultIndex": "", "urlColumn": "url"}
