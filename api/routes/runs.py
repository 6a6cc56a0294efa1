"""Run control: the platform's Prefect flow runs, cancel one, and read or follow its logs.

The logs are served in Prefect's order (by timestamp) with each line's position, so a reader
that comes back (``after``, or ``Last-Event-ID`` on the stream) continues where it stopped.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from api.deps import ReadToken, SettingsDep, Token
from api.errors import AUTH, content, responses
from api.routes.events import SlotStream, take_slot
from api.schemas import FlowRunOut, LogLineOut
from monitoring.flow_runs import (
    cancel_flow_run,
    flow_run_logs,
    flow_run_state,
    get_flow_run,
    list_flow_runs,
)
from training.prefect_calls import PrefectUnavailable

router = APIRouter(prefix="/api/runs", tags=["runs"])

StateType = Literal[
    "SCHEDULED",
    "PENDING",
    "RUNNING",
    "PAUSED",
    "CANCELLING",
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "CRASHED",
]
RUN_ID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
# A pattern, not just a length: 36 characters of anything include code points that a URL
# cannot carry whole, so the schema itself would describe ids the route must refuse.
RunId = Annotated[str, Path(pattern=RUN_ID_PATTERN, description="The Prefect flow run id.")]
POLL_S = 1.0
"""How often the log stream asks Prefect for new lines (Prefect ships logs in batches of
about two seconds anyway)."""
MAX_LINES = 1000
SETTLE_S = 3.0


@router.get("", response_model=list[FlowRunOut], responses=responses(422, 503))
def runs(
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    offset: Annotated[int, Query(ge=0, le=100_000)] = 0,
    state: StateType | None = None,
) -> list[FlowRunOut]:
    """Flow runs of every deployment (ingest, label sync, drift, retrain...) and of flows run
    by hand, newest first, with deployment, state, start and duration."""
    found = list_flow_runs(settings, limit=limit, offset=offset, state=state)
    return [FlowRunOut.model_validate(r) for r in found]


@router.get("/{flow_run_id}", response_model=FlowRunOut, responses=responses(404, 422, 503))
def run(settings: SettingsDep, flow_run_id: RunId) -> FlowRunOut:
    return FlowRunOut.model_validate(get_flow_run(settings, flow_run_id))


@router.post(
    "/{flow_run_id}/cancel",
    response_model=FlowRunOut,
    dependencies=[Token],
    responses={**AUTH, **responses(404, 409, 422)},
)
def cancel(settings: SettingsDep, flow_run_id: RunId) -> FlowRunOut:
    """Cancel a run that has not finished (409 when it has): a waiting run at once, a running
    one through Prefect's Cancelling state, on which its worker stops the run's process."""
    return FlowRunOut.model_validate(cancel_flow_run(settings, flow_run_id))


@router.get(
    "/{flow_run_id}/logs",
    response_model=list[LogLineOut],
    dependencies=[ReadToken],
    responses={
        **AUTH,
        **responses(404, 422),
        **content("text/plain", "With `format=text`: the log as a download."),
    },
)
def logs(
    settings: SettingsDep,
    flow_run_id: RunId,
    after: Annotated[int, Query(ge=-1, le=10_000_000, description="Lines after this one.")] = -1,
    limit: Annotated[int, Query(ge=1, le=MAX_LINES)] = 200,
    format: Literal["json", "text"] = "json",
) -> list[LogLineOut] | Response:
    """The run's log lines, oldest first (data-bearing: logs name paths and errors)."""
    get_flow_run(settings, flow_run_id)  # 404 for a run Prefect does not know
    lines = flow_run_logs(settings, flow_run_id, after=after, limit=limit)
    if format == "text":
        text = "".join(
            f"{line.timestamp.isoformat()} {line.level:<8} {line.logger}: {line.message}\n"
            for line in lines
        )
        return PlainTextResponse(
            text,
            headers={"Content-Disposition": f'attachment; filename="flow-run-{flow_run_id}.log"'},
        )
    return [LogLineOut.model_validate(line) for line in lines]


def _message(line: LogLineOut) -> str:
    return f"id: {line.index}\ndata: {json.dumps(line.model_dump(mode='json'))}\n\n"


@router.get(
    "/{flow_run_id}/logs/stream",
    response_class=Response,  # the 200 is an event stream, the errors beside it JSON
    dependencies=[ReadToken],
    responses={
        **content("text/event-stream", "Server-sent events, one per log line, then `end`."),
        **AUTH,
        **responses(404, 422),
    },
)
async def stream_logs(
    request: Request,
    settings: SettingsDep,
    flow_run_id: RunId,
    last_event_id: Annotated[
        int,
        Header(ge=-1, le=10_000_000, description="Sent by EventSource: the last line it has."),
    ] = -1,
) -> StreamingResponse:
    """The run's log live: every line so far (or after ``Last-Event-ID``), then new lines as
    Prefect receives them, and an ``end`` event with the final state once the run is over
    and its last lines are sent."""
    await run_in_threadpool(get_flow_run, settings, flow_run_id)
    slots = take_slot(request)

    async def messages() -> AsyncIterator[str]:
        yield "retry: 3000\n\n"
        last = last_event_id
        beat = time.monotonic()
        settled = False
        while not await request.is_disconnected():
            # Read the state before the lines: a run seen final has shipped everything it logs
            # by the time its lines are read after it.
            try:
                state, final = await run_in_threadpool(flow_run_state, settings, flow_run_id)
                fresh = await run_in_threadpool(
                    flow_run_logs, settings, flow_run_id, after=last, limit=MAX_LINES
                )
            except PrefectUnavailable as exc:
                # The answer has started: the outage can only be told in the stream itself.
                # EventSource reconnects by itself, with Last-Event-ID, after ``retry``.
                yield f"event: unavailable\ndata: {json.dumps({'detail': str(exc)})}\n\n"
                return
            for line in fresh:
                yield _message(LogLineOut.model_validate(line))
            if fresh:
                last = fresh[-1].index
                beat = time.monotonic()
                continue  # there may be more than one page
            if final and not settled:
                # A process ships its last lines a moment after its final state (Prefect sends
                # logs in batches): one more look after that moment before the end.
                settled = True
                await asyncio.sleep(SETTLE_S)
                continue
            if final:
                yield f"event: end\ndata: {json.dumps({'state': state})}\n\n"
                return
            if time.monotonic() - beat >= 15:
                beat = time.monotonic()
                yield ": keep-alive\n\n"
            await asyncio.sleep(POLL_S)

    return SlotStream(
        slots,
        messages(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
