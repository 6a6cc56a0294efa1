"""The API's own vital signs: request latency percentiles, error rate and predictions per minute.

A pure ASGI middleware (not ``BaseHTTPMiddleware``, which buffers streaming responses) records
each request's status and time to its response's start into a bounded ring buffer; the
resources endpoint summarises the last few minutes of it. Long-lived streams are left out:
their "latency" is the lifetime of a browser tab.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

WINDOW_S = 300.0
"""Requests older than this no longer count."""
CAPACITY = 20_000
"""Most requests kept: bounds memory under any load (the window then covers less time)."""
PREDICT_PATH = "/api/predict"
UNTIMED_PATHS = frozenset({"/api/events/stream"})


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic() when the response started
    latency_ms: float
    status: int
    path: str


@dataclass(frozen=True)
class RequestSummary:
    window_s: float
    requests: int
    requests_per_minute: float
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    error_rate: float | None  # share of 5xx answers
    client_error_rate: float | None  # share of 4xx answers
    predictions_per_minute: float


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; None when empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class RequestLog:
    """Thread-safe ring buffer of recent requests."""

    def __init__(self, capacity: int = CAPACITY, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[Sample] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def record(self, latency_ms: float, status: int, path: str, at: float | None = None) -> None:
        with self._lock:
            self._samples.append(
                Sample(time.monotonic() if at is None else at, latency_ms, status, path)
            )

    def summary(self, now: float | None = None) -> RequestSummary:
        now = time.monotonic() if now is None else now
        with self._lock:
            recent = [s for s in self._samples if now - s.at <= self.window_s]
        # Per-minute rates over the time actually covered, so a fresh process is not under-reported.
        covered = min(self.window_s, max(now - min((s.at for s in recent), default=now), 1.0))
        minute = [s for s in recent if now - s.at <= 60.0]
        latencies = [s.latency_ms for s in recent]
        count = len(recent)
        return RequestSummary(
            window_s=self.window_s,
            requests=count,
            requests_per_minute=round(count * 60.0 / covered, 2) if count else 0.0,
            latency_p50_ms=percentile(latencies, 50),
            latency_p95_ms=percentile(latencies, 95),
            latency_p99_ms=percentile(latencies, 99),
            error_rate=round(sum(s.status >= 500 for s in recent) / count, 4) if count else None,
            client_error_rate=round(sum(400 <= s.status < 500 for s in recent) / count, 4)
            if count
            else None,
            predictions_per_minute=float(
                sum(1 for s in minute if s.path == PREDICT_PATH and s.status < 400)
            ),
        )


class TelemetryMiddleware:
    def __init__(self, app: ASGIApp, log: RequestLog) -> None:
        self.app = app
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTIMED_PATHS:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        recorded = False

        async def timed_send(message: Message) -> None:
            nonlocal recorded
            if message["type"] == "http.response.start" and not recorded:
                recorded = True
                self.log.record(
                    (time.perf_counter() - started) * 1000, message["status"], scope["path"]
                )
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        except BaseException:
            if not recorded:  # the error handler outside this middleware answers 500
                self.log.record((time.perf_counter() - started) * 1000, 500, scope["path"])
            raise
