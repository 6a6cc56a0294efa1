"""Notifications about model updates: an activity event always, a webhook POST when configured.

A notification never fails what it reports on: webhook errors are logged (and recorded as a
warning event), not raised.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from visionloop.events import EventKind, emit

log = logging.getLogger(__name__)
WEBHOOK_TIMEOUT_S = 5.0


def _where(url: str) -> str:
    """Scheme and host only: webhook paths often carry a secret token (Slack, Teams, ...)."""
    parsed = httpx.URL(url)
    return f"{parsed.scheme}://{parsed.host}" + (f":{parsed.port}" if parsed.port else "")


def notify(
    kind: EventKind,
    message: str,
    payload: dict[str, Any] | None = None,
    *,
    webhook_url: str | None = None,
    level: str = "info",
    timeout: float = WEBHOOK_TIMEOUT_S,
) -> bool:
    """Emit the event and POST ``{"kind", "message", "level", "payload"}`` to ``webhook_url``.

    Returns whether the webhook accepted it (True when there is none to call).
    """
    event = emit(kind, message, payload, level=level)
    if not webhook_url:
        return True
    body = {
        "kind": kind,
        "message": message,
        "level": level,
        "payload": payload or {},
        "created_at": event.created_at.isoformat(),
    }
    try:
        response = httpx.post(webhook_url, json=body, timeout=timeout)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        where = _where(webhook_url)
        reason = f"{type(exc).__name__}" + (
            f" (HTTP {exc.response.status_code})" if isinstance(exc, httpx.HTTPStatusError) else ""
        )
        log.warning("webhook at %s refused notification %s: %s", where, kind, reason)
        emit(
            EventKind.NOTIFICATION_FAILED,
            f"webhook at {where} did not take the {kind} notification: {reason}",
            {"kind": kind, "webhook": where},
            level="warning",
        )
        return False
    return True
