"""What the routes depend on, in one place: the loaded service, the settings, the CPU
job queue (all held by the app, set by `create_app`), and reading an uploaded image."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, UploadFile

from phoclip.serve.jobs import CpuJobs
from phoclip.serve.service import Service, decode_upload
from phoclip.serve.settings import Settings


def get_service(request: Request) -> Service:
    return request.app.state.service


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_jobs(request: Request) -> CpuJobs:
    return request.app.state.cpu_jobs


ServiceDep = Annotated[Service, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
JobsDep = Annotated[CpuJobs, Depends(get_jobs)]


def read_image(file: UploadFile, settings: Settings):
    """In a worker thread: the upload's bytes (spooled by the form parser), capped, decoded."""
    from phoclip.errors import one_line
    from phoclip.data.images import BadImage

    data = file.file.read(settings.max_upload + 1)
    if len(data) > settings.max_upload:
        raise HTTPException(413, f"upload over {settings.max_upload} bytes")
    try:
        return decode_upload(data, settings.max_decode_bytes)
    except BadImage as e:
        raise HTTPException(415 if e.reason in ("not_an_image", "empty") else 422,
                            f"not a usable image ({one_line(e)})"[:300]) from None


def indexed(service: Service, item_id: int) -> int:
    """`item_id` if the index holds it, else 404."""
    if not 0 <= item_id < len(service.items):
        raise HTTPException(404, "no such indexed image")
    return item_id
