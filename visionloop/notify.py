"""Notifications about model updates: an activity event always, a webhook POST when configured.

Every retrain outcome, promotion and rollback goes through here, whoever started it (the
retrain flow, the API, a schedule), so a team's channel hears of each one. The webhook is
``VISIONLOOP_NOTIFY_WEBHOOK_URL`` unless a caller names another. A notification never fails
what it reports on: an unreachable webhook, or one answering 5xx or 429, is retried
``VISIONLOOP_NOTIFY_RETRIES`` times with a doubling pause, then logged and recorded as a
warning event, never raised.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx

from visionloop.events import EventKind, emit
from visionloop.settings import get_settings

log = logging.getLogger(__name__)
WEBHOOK_TIMEOUT_S = 5.0
RETRY_PAUSE_S = 0.5
"""The pause before the first retry; it doubles for each one after."""


def _where(url: str) -> str:
    """Scheme and host only: webhook paths often carry a secret token (Slack, Teams, ...)."""
    parsed = httpx.URL(url)
    return f"{parsed.scheme}://{parsed.host}" + (f":{parsed.port}" if parsed.port else "")


def _reason(exc: httpx.HTTPError) -> str:
    status = f" (HTTP {exc.response.status_code})" if isinstance(exc, httpx.HTTPStatusError) else ""
    return f"{type(exc).__name__}{status}"


def _retryable(exc: httpx.HTTPError) -> bool:
    """Transport failures and the server's own errors may pass; a 4xx says the call is wrong."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500 or exc.response.status_code == 429
    return True


def notify(
    kind: EventKind,
    message: str,
    payload: dict[str, Any] | None = None,
    *,
    webhook_url: str | None = None,
    level: str = "info",
    timeout: float = WEBHOOK_TIMEOUT_S,
    retries: int | None = None,
) -> bool:
    """Emit the event and POST ``{"kind", "message", "level", "payload", "created_at"}`` to the
    webhook (``webhook_url``, else the setting; an empty string means none).

    Returns whether the webhook accepted it (True when there is none to call).
    """
    event = emit(kind, message, payload, level=level)
    settings = get_settings()
    url = settings.notify_webhook_url.get_secret_value() if webhook_url is None else webhook_url
    if not url:
        return True
    attempts = 1 + (settings.notify_retries if retries is None else retries)
    body = {
        "kind": kind,
        "message": message,
        "level": level,
        "payload": payload or {},
        "created_at": event.created_at.isoformat(),
    }
    failure: httpx.HTTPError | None = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(RETRY_PAUSE_S * 2 ** (attempt - 1))
        try:
            response = httpx.post(url, json=body, timeout=timeout)
            response.raise_for_status()
            return True
        except httpx.HTTPError as exc:
            failure = exc
            if not _retryable(exc):
                break
            log.info("webhook at %s: attempt %d: %s", _where(url), attempt + 1, _reason(exc))
    assert failure is not None
    where, reason = _where(url), _reason(failure)
    log.warning("webhook at %s refused notification %s: %s", where, kind, reason)
    emit(
        EventKind.NOTIFICATION_FAILED,
        f"webhook at {where} did not take the {kind} notification after "
        f"{attempt + 1} attempt{'s' if attempt else ''}: {reason}",
        {"kind": kind, "webhook": where, "attempts": attempt + 1},
        level="warning",
    )
    return False
