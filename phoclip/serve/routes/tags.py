"""Zero-shot tags: the page's vocabulary (GET /tags) and an image's best tags (POST /tags;
an indexed image by `id` of `?index=NAME`, default the first)."""
from typing import Optional

from fastapi import APIRouter, File, Form, HTTPException, UploadFile

from phoclip.serve.deps import IndexDep, JobsDep, ServiceDep, SettingsDep, read_image
from phoclip.serve.models import BUSY, ERR, TagResults, TagVocabulary
from phoclip.serve.settings import MAX_K, MAX_QUERY_CHARS, MAX_TAGS

router = APIRouter(tags=["tags"])


@router.get("/tags", response_model=TagVocabulary)
async def vocabulary(settings: SettingsDep) -> dict:
    return {"tags": list(settings.tags)}


@router.post("/tags", response_model=TagResults, responses={400: ERR, 404: ERR, 413: ERR, 415: ERR, 422: ERR,
                                                            503: BUSY})
async def tags(service: ServiceDep, served: IndexDep, settings: SettingsDep, jobs: JobsDep,
               tags: str = Form(..., max_length=64 * 1024), k: int = Form(3, ge=1, le=MAX_K),
               file: Optional[UploadFile] = File(None), id: Optional[int] = Form(None)) -> dict:
    names = [t.strip() for t in tags.splitlines() if t.strip()][:MAX_TAGS]
    if not names or any(len(t) > MAX_QUERY_CHARS for t in names):
        raise HTTPException(422, f"give 1..{MAX_TAGS} tags, one per line, each under {MAX_QUERY_CHARS} characters")
    if file is None and id is None:
        raise HTTPException(422, "give an image ('file') or an indexed image id ('id')")
    if id is not None and not served.has(id):
        raise HTTPException(404, "no such indexed image (or its index row is damaged)")

    def run() -> list:
        if file is None and not served.usable(id):
            raise HTTPException(404, "no such indexed image (or its index row is damaged)")
        return service.tags(served, names, k, read_image(file, settings) if file is not None else None, id)

    return {"tags": await jobs.run(run)}
