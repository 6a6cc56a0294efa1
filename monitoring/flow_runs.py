"""The platform's Prefect flow runs: a list with state and duration, cancel, and their logs.

Prefect owns flow runs, their states and their logs (ARCHITECTURE.md, "Where each fact lives");
this module only reads and asks through Prefect's API, bounded like every other Prefect call
(``training.prefect_calls``), so the API's run panel shows exactly what the Prefect UI shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from training.prefect_calls import bounded_prefect_calls
from visionloop.settings import Settings

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

CANCEL_MESSAGE = "cancelled through the visionloop API"
NOT_STARTED = frozenset({"SCHEDULED", "PENDING", "PAUSED"})


class FlowRunNotFound(LookupError):
    """Prefect has no flow run with that id."""


class FlowRunFinished(RuntimeError):
    """The flow run is over already: there is nothing to cancel."""


@dataclass(frozen=True)
class FlowRunInfo:
    id: str
    name: str
    flow: str
    deployment: str | None
    state: str
    state_type: str
    final: bool
    expected_start: datetime | None
    start: datetime | None
    end: datetime | None
    duration_s: float | None
    """Run time so far for a running run; None before it starts."""
    parameters: dict[str, Any]


@dataclass(frozen=True)
class LogLine:
    index: int
    """Position in the run's log, oldest first: what a reader resumes after."""
    timestamp: datetime
    level: str
    logger: str
    message: str


def _client() -> SyncPrefectClient:
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _uuid(flow_run_id: str) -> UUID:
    try:
        return UUID(flow_run_id)
    except ValueError as exc:
        raise FlowRunNotFound(f"{flow_run_id!r} is not a Prefect flow run id") from exc


def _info(run: Any, flows: dict[UUID, str], deployments: dict[UUID, str]) -> FlowRunInfo:
    state = run.state
    start, end = run.start_time, run.end_time
    duration = None
    if start is not None:
        until = end if end is not None else datetime.now(UTC)
        duration = round(max(0.0, (until - start).total_seconds()), 3)
    return FlowRunInfo(
        id=str(run.id),
        name=run.name,
        flow=flows.get(run.flow_id, "?"),
        deployment=deployments.get(run.deployment_id) if run.deployment_id else None,
        state=state.name if state else "Unknown",
        state_type=state.type.value if state else "UNKNOWN",
        final=bool(state and state.is_final()),
        expected_start=run.expected_start_time,
        start=start,
        end=end,
        duration_s=duration,
        parameters=dict(run.parameters or {}),
    )


def _names(prefect: SyncPrefectClient, runs: list[Any]) -> tuple[dict[UUID, str], dict[UUID, str]]:
    """Flow and deployment names of ``runs``, in one call each."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowFilter,
        FlowFilterId,
    )

    flow_ids = list({r.flow_id for r in runs})
    deployment_ids = list({r.deployment_id for r in runs if r.deployment_id})
    flows = (
        prefect.read_flows(flow_filter=FlowFilter(id=FlowFilterId(any_=flow_ids))) if runs else []
    )
    deployments = (
        prefect.read_deployments(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=deployment_ids))
        )
        if deployment_ids
        else []
    )
    return {f.id: f.name for f in flows}, {d.id: d.name for d in deployments}


def list_flow_runs(
    settings: Settings, *, limit: int = 20, offset: int = 0, state: str | None = None
) -> list[FlowRunInfo]:
    """Flow runs, the most recently (expected to be) started first; ``state`` is a Prefect
    state type (``RUNNING``, ``COMPLETED``, ``FAILED``, ``CANCELLED``, ``SCHEDULED``...)."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    run_filter = None
    if state:
        types = FlowRunFilterStateType(any_=[StateType(state.upper())])
        run_filter = FlowRunFilter(state=FlowRunFilterState(type=types))
    with bounded_prefect_calls(settings), _client() as prefect:
        runs = prefect.read_flow_runs(
            flow_run_filter=run_filter,
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=limit,
            offset=offset,
        )
        flows, deployments = _names(prefect, runs)
    return [_info(run, flows, deployments) for run in runs]


def _read_run(prefect: SyncPrefectClient, flow_run_id: str) -> Any:
    """Prefect's flow run, or ``FlowRunNotFound`` for an id it does not know."""
    from prefect.exceptions import ObjectNotFound

    try:
        return prefect.read_flow_run(_uuid(flow_run_id))
    except ObjectNotFound as exc:
        raise FlowRunNotFound(f"Prefect has no flow run {flow_run_id}") from exc


def get_flow_run(settings: Settings, flow_run_id: str) -> FlowRunInfo:
    with bounded_prefect_calls(settings), _client() as prefect:
        run = _read_run(prefect, flow_run_id)
        flows, deployments = _names(prefect, [run])
    return _info(run, flows, deployments)


def flow_run_state(settings: Settings, flow_run_id: str) -> tuple[str, bool]:
    """The run's state name and whether it is final: one call, for a reader polling it."""
    with bounded_prefect_calls(settings), _client() as prefect:
        state = _read_run(prefect, flow_run_id).state
    return (state.name if state else "Unknown"), bool(state and state.is_final())


def cancel_flow_run(settings: Settings, flow_run_id: str) -> FlowRunInfo:
    """Cancel a run that has not finished: one still waiting is cancelled at once, a running
    one is set to Cancelling, which makes its worker stop the run's process (Prefect's own
    cancellation, as the Prefect UI's button does)."""
    from prefect.states import Cancelled, Cancelling

    with bounded_prefect_calls(settings), _client() as prefect:
        run = _read_run(prefect, flow_run_id)
        if run.state is not None and run.state.is_final():
            raise FlowRunFinished(f"flow run {flow_run_id} is over already ({run.state.name})")
        # A run not yet started is cancelled outright: set to Cancelling, a run whose process
        # is still starting can miss the event (the worker's observer drops it for a process
        # it has not registered yet) and then run to the end.
        waiting = run.state is not None and run.state.type.value in NOT_STARTED
        prefect.set_flow_run_state(
            run.id, (Cancelled if waiting else Cancelling)(message=CANCEL_MESSAGE), force=True
        )
        if waiting and prefect.read_flow_run(run.id).run_count > run.run_count:
            # It started between the read and the write: only Cancelling makes the worker
            # stop that process.
            prefect.set_flow_run_state(run.id, Cancelling(message=CANCEL_MESSAGE), force=True)
    return get_flow_run(settings, flow_run_id)


PREFECT_PAGE = 200
"""The most log lines Prefect's API hands out per call."""


def flow_run_logs(
    settings: Settings, flow_run_id: str, *, after: int = -1, limit: int = PREFECT_PAGE
) -> list[LogLine]:
    """The run's log lines after position ``after`` (-1: from the start), oldest first, at
    most ``limit`` of them (read from Prefect a page at a time)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    run_id = _uuid(flow_run_id)
    logs: list[Any] = []
    with bounded_prefect_calls(settings), _client() as prefect:
        while len(logs) < limit:
            page = prefect.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
                sort=LogSort.TIMESTAMP_ASC,
                offset=after + 1 + len(logs),
                limit=min(PREFECT_PAGE, limit - len(logs)),
            )
            logs.extend(page)
            if len(page) < PREFECT_PAGE:
                break
    return [
        LogLine(
            index=after + 1 + i,
            timestamp=log.timestamp,
            level=_level_name(log.level),
            logger=log.name,
            message=log.message,
        )
        for i, log in enumerate(logs)
    ]


def _level_name(level: int) -> str:
    import logging

    return logging.getLevelName(level)
