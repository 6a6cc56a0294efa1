"""Activity events: what the loop did, for the dashboard's feed and live progress."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from enum import Enum
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from visionloop.db import session_scope
from visionloop.models import ActivityEvent


class EventKind(str, Enum):
    """Every kind of activity event; the API and the dashboard read this list too."""

    TRAINING_STARTED = "training.started"
    TRAINING_EPOCH = "training.epoch"
    TRAINING_FINISHED = "training.finished"
    EVALUATION_FINISHED = "evaluation.finished"
    MODEL_PROMOTED = "model.promoted"
    MODEL_ROLLED_BACK = "model.rolled_back"
    RETRAIN_REQUESTED = "retrain.requested"
    RETRAIN_CONDITIONS = "retrain.conditions"
    RETRAIN_STARTED = "retrain.started"
    RETRAIN_STAGE = "retrain.stage"
    RETRAIN_FAILED = "retrain.failed"
    RETRAIN_FINISHED = "retrain.finished"
    INGEST_PROGRESS = "ingest.progress"
    INGEST_COMPLETED = "ingest.completed"
    QUEUE_ADDED = "queue.added"
    LABELS_SYNCED = "labels.synced"
    LABEL_APPROVED = "labels.approved"
    LABEL_SENT_BACK = "labels.sent_back"
    SNAPSHOT_CREATED = "snapshot.created"
    DRIFT_SKIPPED = "drift.skipped"
    DRIFT_LEVEL_CHANGED = "drift.level_changed"
    DRIFT_STREAM_CHANGE = "drift.stream_change"
    NOTIFICATION_FAILED = "notification.failed"


Listener = Callable[[ActivityEvent], None]
_listeners: list[Listener] = []


def subscribe(listener: Listener) -> Callable[[], None]:
    """Hear this process's events as they are emitted (the CLI's progress bars).

    Returns the function that unsubscribes."""
    _listeners.append(listener)
    return lambda: _listeners.remove(listener)


def emit(
    kind: EventKind,
    message: str,
    payload: dict[str, Any] | None = None,
    *,
    level: str = "info",
    engine: Engine | None = None,
) -> ActivityEvent:
    event = ActivityEvent(
        kind=getattr(kind, "value", kind), message=message, payload=payload or {}, level=level
    )
    with session_scope(engine) as session:
        session.add(event)
    for listener in list(_listeners):
        listener(event)
    return event


def recent(
    limit: int = 100,
    since: datetime | None = None,
    kind_prefix: str | None = None,
    engine: Engine | None = None,
) -> list[ActivityEvent]:
    with session_scope(engine) as session:
        query = select(ActivityEvent).order_by(ActivityEvent.id.desc()).limit(limit)
        if since is not None:
            query = query.where(ActivityEvent.created_at >= since)
        if kind_prefix:
            query = query.where(ActivityEvent.kind.startswith(kind_prefix))
        return list(session.exec(query))


def page(
    session: Session, *, after_id: int | None, limit: int, kind_prefix: str | None = None
) -> list[ActivityEvent]:
    """Events after ``after_id`` (the first ``limit``), or else the newest ``limit``; oldest
    first, the order a feed shows them in."""
    query = select(ActivityEvent)
    if kind_prefix:
        query = query.where(col(ActivityEvent.kind).startswith(kind_prefix))
    if after_id is not None:
        query = query.where(col(ActivityEvent.id) > after_id)
        return list(session.exec(query.order_by(col(ActivityEvent.id)).limit(limit)))
    newest = session.exec(query.order_by(col(ActivityEvent.id).desc()).limit(limit))
    return list(newest)[::-1]
