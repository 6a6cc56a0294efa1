"""The visionloop API: thin routers over the same domain code the flows use."""

from __future__ import annotations

import importlib
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from api import errors
from api.deps import batcher_pool
from api.gate import Gate
from api.routes import (
    dashboard,
    events,
    feedback,
    labeling,
    ledger,
    metrics,
    models,
    previews,
    queue,
    retraining,
    runs,
    serving,
    system,
)
from api.telemetry import RequestLog, TelemetryMiddleware
from monitoring.confidence_stream import DETECTOR_MODULE
from monitoring.resources import ResourceSampler
from visionloop.settings import get_settings

WARM_IMPORTS = (DETECTOR_MODULE, "labeling.tasks")
"""What ``/api/predict`` imports lazily after answering (the confidence stream's detector, the
queueing for review): seconds of imports that, left to the first requests, hold the import lock
while every request waits (river alone pulls in scikit-learn). Imported once the API is up, in
the background, so start-up does not wait for them either."""


def _warm_imports() -> None:
    for name in WARM_IMPORTS:
        importlib.import_module(name)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    threading.Thread(target=_warm_imports, name="warm-imports", daemon=True).start()
    yield
    # Uvicorn has let the requests in flight finish by now; what still waits is failed (503).
    app.state.batchers.close()


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(
        lifespan=lifespan,
        title="visionloop",
        description="Continuous training for YOLO detectors: retraining status and conditions, "
        "labelling queue, drift, models and serving. Mutating operations need "
        "`Authorization: Bearer <VISIONLOOP_API_TOKEN>`; data-bearing reads (dataset exports, "
        "drift reports) need `VISIONLOOP_API_READ_TOKEN` or the API token; the Label Studio "
        "webhook also opens with `VISIONLOOP_WEBHOOK_SECRET`. Bodies over `max_body_bytes` "
        "get 413 before they are read. Every error is JSON "
        '`{"error": kind, "detail": sentence}`. The dashboard is at `/dashboard`.',
        version="0.1.0",
    )
    app.state.request_log = RequestLog()
    app.state.batchers = batcher_pool(settings)
    app.state.resource_sampler = ResourceSampler()
    errors.install(app)
    # Inside the telemetry, so refusals are counted; outside routing, so nothing reads a body
    # before the gate has let the request through.
    app.add_middleware(Gate)
    app.add_middleware(TelemetryMiddleware, log=app.state.request_log)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    for module in (
        system,
        retraining,
        queue,
        previews,
        feedback,
        ledger,
        metrics,
        models,
        serving,
        events,
        runs,
        dashboard,
    ):
        app.include_router(module.router)
    # The webhook's own router declares no error responses; these are what it can answer here.
    app.include_router(labeling.router, responses={**errors.AUTH, **errors.BODY})
    app.state.event_streams = events.StreamSlots(settings.max_event_streams)
    app.mount("/static", StaticFiles(directory=dashboard.STATIC_DIR), name="static")
    return app


app = create_app()
