"""The API's gate: tokens and body size are settled before a single body byte is read.

A pure ASGI layer (``BaseHTTPMiddleware`` would read and buffer bodies) in front of routing:

* a mutating request (any method but GET, HEAD, OPTIONS) needs the API token; the Label Studio
  webhook also opens with the webhook secret, which opens nothing else;
* a data-bearing GET (see ``DATA_GETS``) needs the read token or the API token;
* a ``Content-Length`` over ``max_body_bytes`` is 413 at once; a body without one (chunked) is
  counted as it passes through ``receive`` and refused with 413 once past the limit, so no
  more than the limit is ever buffered.

Refusals are answered here, in the API's JSON, without calling ``receive``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import security
from api.errors import error_response
from visionloop.settings import Settings, get_settings

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_KINDS = {401: "unauthorized", 503: "service_unavailable"}
WEBHOOK_PATH = "/api/labeling/webhook"

# Every GET operation of the app is in exactly one of these two lists (a test holds the app to
# it). Data-bearing: what hands out the labelled dataset, images or stored reports.
DATA_GETS = (
    "/api/labeling/export",
    "/api/metrics/drift/report",
    "/api/metrics/drift/{result_id}/report",
    "/api/runs/{flow_run_id}/logs",
    "/api/labeling/feedback/export",
    "/api/labeling/queue/{item_id}/preview",
    "/api/retraining/runs/{run_id}/report",
    "/api/runs/{flow_run_id}/logs/stream",
)
# Public: status, counts, conditions, history, model metadata, health and the dashboard.
PUBLIC_GETS = (
    "/",
    "/dashboard",
    "/dashboard/event-kinds.js",
    "/api/health",
    "/api/system/health",
    "/api/system/resources",
    "/api/system/info",
    "/api/retraining/status",
    "/api/retraining/conditions",
    "/api/retraining/history",
    "/api/retraining/runs/{run_id}",
    "/api/runs",
    "/api/runs/{flow_run_id}",
    "/api/labeling/queue",
    "/api/labeling/stats",
    "/api/labeling/ledger",
    "/api/labeling/feedback/trends",
    "/api/labeling/snapshots",
    "/api/metrics/drift",
    "/api/metrics/drift/history",
    "/api/metrics/drift/{result_id}",
    "/api/models",
    "/api/events",
    "/api/events/stream",
)


def _pattern(templates: tuple[str, ...]) -> re.Pattern[str]:
    parts = (re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(t)) for t in templates)
    # An optional trailing slash: the router redirects it to the same operation.
    return re.compile("(?:" + "|".join(parts) + ")/?")


_DATA = _pattern(DATA_GETS)


def is_data_get(path: str) -> bool:
    return _DATA.fullmatch(path) is not None


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a body passes the limit. An HTTPException, so the route's
    body parsing lets it through and the error handlers answer it as 413 JSON."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes (max_body_bytes)")


def _header(scope: Scope, name: bytes) -> list[bytes]:
    return [v for k, v in scope["headers"] if k == name]


def _content_length(scope: Scope) -> int | None:
    values = _header(scope, b"content-length")
    if not values:
        return None
    if len(set(values)) != 1 or not values[0].isdigit():
        return -1
    return int(values[0])


class Gate:
    def __init__(self, app: ASGIApp, settings: Callable[[], Settings] = get_settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = self.settings()
        refusal = self._refusal(scope, settings)
        if refusal is not None:
            status, kind, detail, headers = refusal
            await error_response(status, kind, detail, headers)(scope, receive, send)
            return
        await self._pass(scope, receive, send, settings.max_body_bytes)

    def _refusal(
        self, scope: Scope, settings: Settings
    ) -> tuple[int, str, str, dict[str, str] | None] | None:
        method, path = scope["method"].upper(), scope["path"]
        if method in SAFE_METHODS:
            if not is_data_get(path):
                return None
            return self._token(scope, security.read_tokens(settings), security.READ_UNAUTHORIZED)
        if path.rstrip("/") == WEBHOOK_PATH:
            expected, refused = security.webhook_tokens(settings), security.WEBHOOK_UNAUTHORIZED
        else:
            expected, refused = security.api_tokens(settings), security.UNAUTHORIZED
        denied = self._token(scope, expected, refused)
        if denied is not None:
            return denied
        length = _content_length(scope)
        if length == -1:
            return 400, "bad_request", "the Content-Length header is not one number", None
        if length is not None and length > settings.max_body_bytes:
            return 413, "payload_too_large", BodyTooLarge(settings.max_body_bytes).detail, None
        return None

    @staticmethod
    def _token(
        scope: Scope, expected: list[bytes], refused: str
    ) -> tuple[int, str, str, dict[str, str] | None] | None:
        denied = security.refusal(scope["headers"], expected, refused)
        if denied is None:
            return None
        code, detail, headers = denied
        return code, _KINDS[code], detail, headers

    async def _pass(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            if seen > limit:
                raise BodyTooLarge(limit)
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge as exc:
            # Raised where no handler turned it into the 413 (a route reading the stream itself).
            if started:
                raise
            await error_response(413, "payload_too_large", exc.detail)(scope, receive, send)
