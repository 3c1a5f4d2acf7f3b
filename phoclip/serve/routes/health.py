"""GET|HEAD /health: liveness, and what is served."""
from fastapi import APIRouter

from phoclip.serve.deps import ServiceDep
from phoclip.serve.indices import CAPTIONS, IMAGES
from phoclip.serve.models import Health

router = APIRouter(tags=["health"])


@router.head("/health", response_model=Health)
@router.get("/health", response_model=Health)
async def health(service: ServiceDep) -> dict:
    # on the event loop, and cheap: it answers while every worker is busy
    every = [{"name": s.name, "images": s.count(IMAGES), "captions": s.count(CAPTIONS), "skipped": s.skipped,
              "version": None if s.version is None else str(s.version), "index_bytes": s.bytes}
             for s in service.indices.all()]
    first = service.indices.get()
    return {"status": "ok", "images": every[0]["images"], "captions": every[0]["captions"], "skipped": first.skipped,
            "dim": first.dim, "index_bytes": first.bytes, "backend": service.backend, "model": first.fingerprint,
            "device": str(service.device), "indices": every}
