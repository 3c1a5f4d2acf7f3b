"""Indexed images by id only (no path reaches the file system): a thumbnail, a larger
photo for the detail view, and the item's captions and source."""
import logging

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

from phoclip.errors import one_line
from phoclip.serve.deps import JobsDep, ServiceDep, SettingsDep, indexed
from phoclip.serve.models import BUSY, ERR, JPEG, Item
from phoclip.serve.service import PictureUnavailable
from phoclip.data.text import strip_controls

logger = logging.getLogger(__name__)
router = APIRouter(tags=["pictures"])


async def _picture(service, settings, jobs, item_id: int, what: str, make) -> Response:
    indexed(service, item_id)
    try:
        data = await jobs.run(make, item_id, settings.max_thumb_source, settings.max_decode_bytes)
    except HTTPException:
        raise
    except PictureUnavailable:  # logged by the service when it first failed
        raise HTTPException(404, f"{what} unavailable") from None
    except Exception as e:  # a moved, broken or oversized file: the item, not the service, fails
        logger.warning("no %s for item %d: %s", what, item_id, strip_controls(one_line(e))[:300])
        raise HTTPException(404, f"{what} unavailable") from None
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


@router.get("/thumb/{item_id}", response_class=Response, responses={200: JPEG, 404: ERR, 422: ERR, 503: BUSY})
async def thumb(item_id: int, service: ServiceDep, settings: SettingsDep, jobs: JobsDep) -> Response:
    data = service.cached_thumbnail(item_id) if 0 <= item_id < len(service.items) else None
    if data is not None:  # cached: no worker needed
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})
    return await _picture(service, settings, jobs, item_id, "thumbnail", service.thumbnail)


@router.get("/photo/{item_id}", response_class=Response, responses={200: JPEG, 404: ERR, 422: ERR, 503: BUSY})
async def photo(item_id: int, service: ServiceDep, settings: SettingsDep, jobs: JobsDep) -> Response:
    return await _picture(service, settings, jobs, item_id, "photo", service.photo)


@router.get("/items/{item_id}", response_model=Item, responses={404: ERR, 422: ERR})
async def item(item_id: int, service: ServiceDep) -> dict:
    return service.item(indexed(service, item_id))
