"""The visionloop API: thin routers over the same domain code the flows use."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from api.routes import system
from visionloop.settings import get_settings


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(
        title="visionloop",
        description="Continuous training for YOLO detectors: retraining status and conditions, "
        "labelling queue, drift, models and serving.",
        version="0.1.0",
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    app.include_router(system.router)
    return app


app = create_app()
