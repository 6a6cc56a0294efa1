"""Activity events: what the loop did, for the dashboard's feed and live progress."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import select

from visionloop.db import session_scope
from visionloop.models import ActivityEvent

Listener = Callable[[ActivityEvent], None]
_listeners: list[Listener] = []


def subscribe(listener: Listener) -> Callable[[], None]:
    """Hear this process's events as they are emitted (the CLI's progress bars); returns unsubscribe."""
    _listeners.append(listener)
    return lambda: _listeners.remove(listener)


def emit(
    kind: str,
    message: str,
    payload: dict[str, Any] | None = None,
    *,
    level: str = "info",
    engine: Engine | None = None,
) -> ActivityEvent:
    event = ActivityEvent(kind=kind, message=message, payload=payload or {}, level=level)
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
