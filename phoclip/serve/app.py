"""The app factory: one FastAPI app over a loaded `Service`, its routers, its guards, its
error handlers (every error is JSON {"detail": "one line"}) and the task that reloads a
changed index while serving."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Optional

import anyio
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from phoclip.data.text import strip_controls
from phoclip.serve.jobs import CpuJobs
from phoclip.serve.middleware import BodyBudget, BodyLimit, RouteCors, SecurityHeaders
from phoclip.serve.routes import health, knn, page, pictures, search, tags
from phoclip.serve.service import Service
from phoclip.serve.settings import FORM_OVERHEAD, Settings, knn_body_cap

logger = logging.getLogger(__name__)


def _validation_detail(exc: RequestValidationError) -> str:
    """FastAPI's validation errors as one short line, without the input (a 100 kB query
    is not echoed back)."""
    parts = []
    for e in exc.errors()[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "body", "path"))
        parts.append(f"{loc}: {e.get('msg', 'invalid')}" if loc else str(e.get("msg", "invalid")))
    return strip_controls("; ".join(parts))[:300] or "invalid request"


async def _reload_forever(service: Service, every: float) -> None:
    """Every `every` seconds, in a thread (opening an index reads files), reopen the
    indices whose folder changed; a bug here is logged and the next round still runs."""
    while True:
        await anyio.sleep(every)
        try:
            await anyio.to_thread.run_sync(service.indices.reload_changed)
        except Exception:  # noqa: BLE001 -- an expected failure is handled inside; this is a bug, logged
            logger.exception("reloading the indices failed")


def create_app(service: Service, settings: Optional[Settings] = None) -> FastAPI:
    """The FastAPI app over a loaded `service` with the limits of `settings`."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(_reload_forever(service, settings.reload_every)) if settings.reload_every else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = FastAPI(title="PhoCLIP search", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.body_budget = BodyBudget(settings.max_body_memory)
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload + FORM_OVERHEAD,
                       per_path={"/knn-service": knn_body_cap(settings.max_upload)}, budget=app.state.body_budget)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(RouteCors, paths=knn.CORS_PATHS)
    app.state.service, app.state.settings = service, settings
    app.state.cpu_jobs = CpuJobs(settings.cpu_jobs, settings.cpu_queue, settings.cpu_wait)
    app.state.static = page.static_files()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return JSONResponse({"detail": _validation_detail(exc)}, status_code=422)

    @app.exception_handler(Exception)
    async def crashed(request, exc: Exception):  # logged with its traceback by the server
        return JSONResponse({"detail": "internal error (logged)"}, status_code=500)

    for r in (health, search, tags, pictures, knn, page):
        app.include_router(r.router)
    return app
