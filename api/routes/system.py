"""Liveness of the API itself, the health of every service it needs, the machine's resources."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from api.deps import RequestLogDep, SettingsDep
from api.schemas import HealthOut, InfoOut, ResourcesOut
from monitoring.health import check_all

router = APIRouter(prefix="/api", tags=["system"])

HEALTH_SERVICES = ["database", "s3", "mlflow", "prefect", "label-studio"]


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers. Dependencies are under /api/system/health."""
    return {"status": "ok"}


@router.get("/system/health", response_model=HealthOut)
async def system_health(settings: SettingsDep) -> HealthOut:
    """Each service up or down, with its latency and the setting to check when it is down."""
    # The API cannot probe itself through HTTP from inside a request without deadlocking a
    # single worker, and the worker is reported by Prefect: neither belongs to this call.
    results = await run_in_threadpool(check_all, settings, HEALTH_SERVICES)
    return HealthOut(healthy=all(r.ok for r in results), services=[r.as_dict() for r in results])


@router.get("/system/resources", response_model=ResourcesOut)
def resources(request: Request, settings: SettingsDep, requests: RequestLogDep) -> ResourcesOut:
    """CPU, memory, disk (of the data dir) and network of the machine; latency percentiles,
    error rate and predictions per minute of this API process over the last few minutes."""
    sample = request.app.state.resource_sampler.sample(settings.data_dir)
    return ResourcesOut.model_validate({**sample.__dict__, "api": requests.summary().__dict__})


@router.get("/system/info", response_model=InfoOut)
def info(request: Request, settings: SettingsDep) -> InfoOut:
    """What this platform is and where its other user interfaces are."""
    return InfoOut.model_validate(
        {
            "name": "visionloop",
            "version": request.app.version,
            "model_name": settings.model_name,
            "class_names": settings.class_names,
            "links": {
                "prefect_ui": settings.prefect_api.removesuffix("/api"),
                "label_studio": settings.label_studio,
                "mlflow": settings.mlflow_uri,
                "api_docs": "/docs",
            },
        }
    )
