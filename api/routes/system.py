"""Liveness of the API itself and the health of every service it depends on."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from monitoring.health import check_all
from visionloop.settings import get_settings

router = APIRouter(prefix="/api", tags=["system"])


@router.get("/health")
def health() -> dict[str, str]:
    """Liveness: the process answers. Dependencies are under /api/system/health."""
    return {"status": "ok"}


@router.get("/system/health")
async def system_health() -> dict:
    settings = get_settings()
    # The API cannot probe itself through HTTP from inside a request without deadlocking a
    # single worker, and the worker is reported by Prefect: neither belongs to this call.
    names = ["database", "s3", "prefect", "mlflow", "label-studio"]
    results = await run_in_threadpool(check_all, settings, names)
    return {
        "healthy": all(r.ok for r in results),
        "services": [r.as_dict() for r in results],
    }
