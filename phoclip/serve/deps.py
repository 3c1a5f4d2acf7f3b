"""What the routes depend on, in one place: the loaded service, the settings, the CPU
job queue (all held by the app, set by `create_app`), the index a request names, and
reading an uploaded image."""
from __future__ import annotations

from typing import Annotated, Optional

from fastapi import Depends, HTTPException, Query, Request, UploadFile

from phoclip.data.images import BadImage
from phoclip.data.text import strip_controls
from phoclip.errors import one_line
from phoclip.serve.indices import ServedIndex
from phoclip.serve.jobs import CpuJobs
from phoclip.serve.models import NAME_CHARS
from phoclip.serve.service import Service
from phoclip.serve.settings import Settings
from phoclip.serve.uploads import decode_upload


def get_service(request: Request) -> Service:
    return request.app.state.service


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_jobs(request: Request) -> CpuJobs:
    return request.app.state.cpu_jobs


ServiceDep = Annotated[Service, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
JobsDep = Annotated[CpuJobs, Depends(get_jobs)]


def served_index(service: Service, name: Optional[str]) -> ServedIndex:
    """The index called `name` (None or "": the default) as it is now: the request keeps
    this object to its end, whatever a reload swaps in meanwhile; 404 for another name."""
    try:
        return service.indices.get(name)
    except KeyError:
        known = ", ".join(service.indices.names())
        raise HTTPException(404, f"no index named {strip_controls(str(name))[:64]!r} (indices: {known[:200]})") from None


def get_index(service: ServiceDep, index: Optional[str] = Query(
        None, max_length=NAME_CHARS, description="an index name (GET /indices-list); default: the first")) -> ServedIndex:
    return served_index(service, index)


IndexDep = Annotated[ServedIndex, Depends(get_index)]


def image_from_bytes(data: bytes, settings: Settings):
    """An image from untrusted bytes under the service's caps; 413/415/422 in one line."""
    if len(data) > settings.max_upload:
        raise HTTPException(413, f"upload over {settings.max_upload} bytes")
    try:
        return decode_upload(data, settings.max_decode_bytes)
    except BadImage as e:
        raise HTTPException(415 if e.reason in ("not_an_image", "empty") else 422,
                            f"not a usable image ({one_line(e)})"[:300]) from None


def read_image(file: UploadFile, settings: Settings):
    """In a worker thread: the upload's bytes (spooled by the form parser), capped, decoded."""
    return image_from_bytes(file.file.read(settings.max_upload + 1), settings)


def indexed(served: ServedIndex, item_id: int) -> int:
    """`item_id` if the index holds it, else 404."""
    if not served.has(item_id):
        raise HTTPException(404, "no such indexed image")
    return item_id
