"""The activity feed: recent events as JSON, and live as a server-sent event stream.

Flows run in the Prefect worker's processes, so the API cannot hear their events through
``visionloop.events.subscribe``; the stream polls the ``activity_events`` table for ids past
the last one sent instead. Each SSE message carries the event's id, so a browser's
``EventSource`` that reconnects (``Last-Event-ID``) continues exactly where it left off.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse
from sqlalchemy.engine import Engine
from sqlmodel import Session
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from api.deps import EngineDep
from api.errors import content, responses
from api.schemas import MAX_ID, EventOut
from visionloop.events import page

router = APIRouter(prefix="/api/events", tags=["events"])

POLL_S = 0.5
"""How often the stream looks for new events."""
HEARTBEAT_S = 15.0
"""A comment line this often keeps proxies from closing an idle stream."""
MAX_BATCH = 500
RETRY_AFTER_S = 30


class StreamSlots:
    """How many live streams this process still accepts: each one holds a poll loop and a
    connection for as long as a browser tab stays open, so their number is bounded."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.open >= self.limit:
                return False
            self.open += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.open = max(0, self.open - 1)


class SlotStream(StreamingResponse):
    """A stream that frees its slot however it ends, even when it never started to send."""

    def __init__(self, slots: StreamSlots, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._slots = slots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._slots.give_back()


def take_slot(request: Request) -> StreamSlots:
    slots: StreamSlots = request.app.state.event_streams
    if not slots.take():
        raise HTTPException(
            503,
            f"too many live event streams are open ({slots.limit}, max_event_streams); "
            "close one or try again later",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    return slots


def events_after(
    engine: Engine, after_id: int | None, limit: int, kind_prefix: str | None = None
) -> list[EventOut]:
    # A session per call: the stream polls for minutes, and must not hold one open meanwhile.
    with Session(engine) as session:
        rows = page(session, after_id=after_id, limit=limit, kind_prefix=kind_prefix)
        return [EventOut.model_validate(r) for r in rows]


def _message(event: EventOut) -> str:
    return f"id: {event.id}\ndata: {json.dumps(event.model_dump(mode='json'))}\n\n"


@router.get("", response_model=list[EventOut], responses=responses(422))
def events(
    engine: EngineDep,
    after_id: Annotated[
        int | None, Query(ge=0, le=MAX_ID, description="Only events with a larger id.")
    ] = None,
    kind: Annotated[
        str | None, Query(max_length=64, description="Only kinds starting with this: training.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_BATCH)] = 100,
) -> list[EventOut]:
    """Recent activity events, oldest first: the newest ``limit``, or those after ``after_id``."""
    return events_after(engine, after_id, limit, kind)


@router.get(
    "/stream",
    response_class=Response,  # the 200 is an event stream, the errors beside it JSON
    responses={
        **content("text/event-stream", "Server-sent events, one per activity event."),
        **responses(422, 503),
    },
)
async def stream(
    request: Request,
    engine: EngineDep,
    replay: Annotated[int, Query(ge=0, le=MAX_BATCH, description="Recent events sent first.")] = 50,
    kind: Annotated[str | None, Query(max_length=64)] = None,
    last_event_id: Annotated[
        int | None, Header(ge=0, le=MAX_ID, description="Sent by EventSource.")
    ] = None,
) -> StreamingResponse:
    """Activity events as they happen (ingest progress, queue growth, training stages and epochs,
    promotions, drift level changes, alerts); the newest ``replay`` first, or everything after
    ``Last-Event-ID`` when a client reconnects."""

    fetch = partial(events_after, engine)
    slots = take_slot(request)

    async def messages() -> AsyncIterator[str]:
        yield "retry: 3000\n\n"
        if last_event_id is not None:
            backlog = await run_in_threadpool(fetch, last_event_id, MAX_BATCH, kind)
        else:
            backlog = await run_in_threadpool(fetch, None, replay, kind) if replay else []
        last = backlog[-1].id if backlog else None
        for event in backlog:
            yield _message(event)
        if last is None:
            # Nothing replayed: start after the newest event, not from the beginning of time.
            newest = await run_in_threadpool(fetch, None, 1, None)
            last = newest[-1].id if newest else 0
        beat = time.monotonic()
        while not await request.is_disconnected():
            await asyncio.sleep(POLL_S)
            fresh = await run_in_threadpool(fetch, last, MAX_BATCH, kind)
            for event in fresh:
                yield _message(event)
            if fresh:
                last = fresh[-1].id
                beat = time.monotonic()
            elif time.monotonic() - beat >= HEARTBEAT_S:
                beat = time.monotonic()
                yield ": keep-alive\n\n"

    return SlotStream(
        slots,
        messages(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
