"""The app factory: one FastAPI app over a loaded `Service`, its routers, its guards and
its error handlers (every error is JSON {"detail": "one line"})."""
from __future__ import annotations

from typing import Optional

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from phoclip.serve.jobs import CpuJobs
from phoclip.serve.middleware import BodyLimit, SecurityHeaders
from phoclip.serve.routes import health, page, pictures, search, tags
from phoclip.serve.service import Service
from phoclip.serve.settings import FORM_OVERHEAD, Settings
from phoclip.data.text import strip_controls


def _validation_detail(exc: RequestValidationError) -> str:
    """FastAPI's validation errors as one short line, without the input (a 100 kB query
    is not echoed back)."""
    parts = []
    for e in exc.errors()[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "body", "path"))
        parts.append(f"{loc}: {e.get('msg', 'invalid')}" if loc else str(e.get("msg", "invalid")))
    return strip_controls("; ".join(parts))[:300] or "invalid request"


def create_app(service: Service, settings: Optional[Settings] = None) -> FastAPI:
    """The FastAPI app over a loaded `service` with the limits of `settings`."""
    settings = settings or Settings()
    app = FastAPI(title="PhoCLIP search", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload + FORM_OVERHEAD)
    app.add_middleware(SecurityHeaders)
    app.state.service, app.state.settings = service, settings
    app.state.cpu_jobs = CpuJobs(settings.cpu_jobs, settings.cpu_queue, settings.cpu_wait)
    app.state.static = page.static_files()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return JSONResponse({"detail": _validation_detail(exc)}, status_code=422)

    @app.exception_handler(Exception)
    async def crashed(request, exc: Exception):  # logged with its traceback by the server
        return JSONResponse({"detail": "internal error (logged)"}, status_code=500)

    for r in (health, search, tags, pictures, page):
        app.include_router(r.router)
    return app
