"""What the routers depend on, injected so tests and the benchmark can swap any of it
(``app.dependency_overrides``): settings, a database session, the champion predictor and its
batcher, the object store, the retrain launcher and the bearer-token checks."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Annotated, Protocol

from fastapi import Depends, Request
from sqlalchemy.engine import Engine
from sqlmodel import Session

from api.security import require_api_token, require_read_token, require_webhook_token
from api.telemetry import RequestLog
from serving.batching import BatcherPool, MicroBatcher
from serving.predictor import ChampionPredictor, get_predictor
from training.retrain_launcher import LaunchedRetrain, launch_retrain
from visionloop.db import engine_for
from visionloop.settings import Settings, get_settings
from visionloop.storage import ObjectStore


def settings() -> Settings:
    return get_settings()


SettingsDep = Annotated[Settings, Depends(settings)]


def db_engine(settings: SettingsDep) -> Engine:
    return engine_for(settings.db_url)


EngineDep = Annotated[Engine, Depends(db_engine)]
"""For what outlives one request's session (the event stream polls with a session per poll)."""


def db_session(engine: EngineDep) -> Iterator[Session]:
    """The request's session: commits when the route returns; when it raises, nothing is
    committed.

    Not ``session_scope``: its rollback expires every row, and the error handlers read rows a
    domain error carries (``RetrainBusy.holder``) after this ends. Closing without committing
    rolls the transaction back all the same and leaves the rows readable.
    """
    with Session(engine, expire_on_commit=False) as session:
        yield session
        session.commit()


# "function" scope: the commit happens before the response is sent, so a client never sees a
# success for a write that then fails to commit.
SessionDep = Annotated[Session, Depends(db_session, scope="function")]


def predictor(settings: SettingsDep) -> ChampionPredictor:
    """The process's shared predictor: it follows the `champion` alias by itself."""
    return get_predictor(settings)


PredictorDep = Annotated[ChampionPredictor, Depends(predictor)]


def batcher_pool(settings: Settings) -> BatcherPool:
    """The app's batchers (``app.state.batchers``), closed by the app's lifespan."""
    return BatcherPool(
        max_batch=settings.batch_max,
        max_wait_ms=settings.batch_wait_ms,
        max_queue=settings.batch_queue,
    )


def batcher(request: Request, predictor: PredictorDep) -> MicroBatcher:
    """The batcher in front of the request's predictor: concurrent predictions share batches.

    Follows ``predictor``, so overriding the predictor gives the override a batcher of its own.
    """
    return request.app.state.batchers.get(predictor)


BatcherDep = Annotated[MicroBatcher, Depends(batcher)]

_stores: dict[tuple[str, str, bool], ObjectStore] = {}
_stores_lock = threading.Lock()


def object_store(settings: SettingsDep) -> ObjectStore:
    """One client per S3 endpoint, so its connection pool is reused across requests."""
    key = (settings.s3_host, settings.s3_access_key, settings.s3_secure)
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = ObjectStore(settings)
        return store


StoreDep = Annotated[ObjectStore, Depends(object_store)]


class Launcher(Protocol):
    def __call__(
        self,
        session: Session,
        settings: Settings,
        *,
        trigger: str,
        reason: str,
        retraining_run_id: int | None = None,
    ) -> LaunchedRetrain: ...


def retrain_launcher() -> Launcher:
    """Starts the Prefect deployment ``retrain/retrain``."""
    return launch_retrain


LauncherDep = Annotated[Launcher, Depends(retrain_launcher)]


def request_log(request: Request) -> RequestLog:
    return request.app.state.request_log


RequestLogDep = Annotated[RequestLog, Depends(request_log)]

Token = Depends(require_api_token)
"""For ``dependencies=[Token]`` on every mutating operation."""
ReadToken = Depends(require_read_token)
"""For ``dependencies=[ReadToken]`` on every data-bearing GET (``api.gate.DATA_GETS``)."""
WebhookToken = Depends(require_webhook_token)
"""For the Label Studio webhook only."""
