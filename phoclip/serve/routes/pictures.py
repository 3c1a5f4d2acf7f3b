"""Indexed images by id only (no path reaches the file system): a thumbnail, a larger
photo for the detail view, and the item's captions and source (`?index=NAME`: of that
index, default the first)."""
import logging

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

from phoclip.data.text import strip_controls
from phoclip.errors import one_line
from phoclip.serve.deps import IndexDep, JobsDep, ServiceDep, SettingsDep, indexed
from phoclip.serve.models import BUSY, ERR, JPEG, Item
from phoclip.serve.picture_cache import PictureUnavailable
from phoclip.serve.settings import THUMB_SIZE

logger = logging.getLogger(__name__)
router = APIRouter(tags=["pictures"])


async def _picture(served, settings, jobs, item_id: int, what: str, make) -> Response:
    indexed(served, item_id)
    try:
        data = await jobs.run(make, item_id, settings.max_thumb_source, settings.max_decode_bytes)
    except HTTPException:
        raise
    except PictureUnavailable:  # logged by the cache when it first failed
        raise HTTPException(404, f"{what} unavailable") from None
    except Exception as e:  # a moved, broken or oversized file: the item, not the service, fails
        logger.warning("no %s for item %d: %s", what, item_id, strip_controls(one_line(e))[:300])
        raise HTTPException(404, f"{what} unavailable") from None
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


@router.get("/thumb/{item_id}", response_class=Response, responses={200: JPEG, 404: ERR, 422: ERR, 503: BUSY})
async def thumb(item_id: int, served: IndexDep, settings: SettingsDep, jobs: JobsDep) -> Response:
    data = served.pictures.cached(item_id, THUMB_SIZE) if served.has(item_id) else None
    if data is not None:  # cached: no worker needed
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})
    return await _picture(served, settings, jobs, item_id, "thumbnail", served.pictures.picture)


@router.get("/photo/{item_id}", response_class=Response, responses={200: JPEG, 404: ERR, 422: ERR, 503: BUSY})
async def photo(item_id: int, served: IndexDep, settings: SettingsDep, jobs: JobsDep) -> Response:
    return await _picture(served, settings, jobs, item_id, "photo", served.pictures.photo)


@router.get("/items/{item_id}", response_model=Item, responses={404: ERR, 422: ERR, 503: BUSY})
async def item(item_id: int, service: ServiceDep, served: IndexDep, jobs: JobsDep) -> dict:
    # an item's metadata may be read from disk (a part's parquet): in a worker, not on the loop
    return await jobs.run(service.item, served, indexed(served, item_id))
