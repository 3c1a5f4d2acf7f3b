"""Search: text → image (GET /search), image → image and text (POST /search/image), and
more like an indexed image (GET /items/{id}/similar); `?index=NAME` searches that index
(default the first)."""
from fastapi import APIRouter, File, Form, HTTPException, Query, UploadFile

from phoclip.serve.deps import IndexDep, JobsDep, ServiceDep, SettingsDep, indexed, read_image
from phoclip.serve.models import BUSY, ERR, ImageSearchResults, SearchResults
from phoclip.serve.settings import MAX_K, MAX_OFFSET, MAX_QUERY_CHARS

router = APIRouter(tags=["search"])


@router.get("/search", response_model=SearchResults, responses={404: ERR, 422: ERR, 503: BUSY})
async def search(service: ServiceDep, served: IndexDep, jobs: JobsDep,
                 q: str = Query(..., min_length=1, max_length=MAX_QUERY_CHARS),
                 k: int = Query(24, ge=1, le=MAX_K), offset: int = Query(0, ge=0, le=MAX_OFFSET)) -> dict:
    q = q.strip()
    if not q:
        raise HTTPException(422, "q: blank")
    return {"query": q, "offset": offset, "results": await jobs.run(service.search_text, served, q, k, offset)}


@router.post("/search/image", response_model=ImageSearchResults,
             responses={400: ERR, 404: ERR, 413: ERR, 415: ERR, 422: ERR, 503: BUSY})
async def search_image(service: ServiceDep, served: IndexDep, settings: SettingsDep, jobs: JobsDep,
                       file: UploadFile = File(...), k: int = Form(12, ge=1, le=MAX_K)) -> dict:
    return await jobs.run(lambda: service.search_image(served, read_image(file, settings), k))


@router.get("/items/{item_id}/similar", response_model=SearchResults, responses={404: ERR, 422: ERR, 503: BUSY})
async def similar(item_id: int, service: ServiceDep, served: IndexDep, jobs: JobsDep, k: int = Query(24, ge=1, le=MAX_K),
                  offset: int = Query(0, ge=0, le=MAX_OFFSET)) -> dict:
    indexed(served, item_id)

    def run() -> dict:
        if not served.usable(item_id):
            raise HTTPException(404, "this image's index row is damaged")
        return {"query": service.key(served, item_id), "offset": offset,
                "results": service.similar(served, item_id, k, offset)}

    return await jobs.run(run)
