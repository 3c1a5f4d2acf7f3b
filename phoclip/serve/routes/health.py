"""GET|HEAD /health: liveness, and what is served."""
from fastapi import APIRouter

from phoclip.serve.deps import ServiceDep
from phoclip.serve.models import Health

router = APIRouter(tags=["health"])


@router.head("/health", response_model=Health)
@router.get("/health", response_model=Health)
async def health(service: ServiceDep) -> dict:
    # on the event loop, and cheap: it answers while every worker is busy
    return {"status": "ok", "images": len(service.items), "captions": service.index.meta["count"].get("captions", 0),
            "skipped": service.skipped, "dim": service.index.meta["dim"], "index_bytes": service.index_bytes,
            "backend": service.backend, "model": service.index.fingerprint, "device": str(service.device)}
