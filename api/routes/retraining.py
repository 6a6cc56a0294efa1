"""Retraining: status, the conditions and their reasons, history, and the trigger button."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Query

from api.deps import LauncherDep, SessionDep, SettingsDep, Token
from api.errors import AUTH, BODY, BusyErrorBody, NotFound, ServiceUnavailable, responses
from api.schemas import (
    MAX_ID,
    ConditionsOut,
    Offset,
    Page,
    RetrainingRunOut,
    RetrainingStatusOut,
    TriggerIn,
    TriggerOut,
)
from monitoring.conditions import retraining_conditions
from training.retrain_requests import (
    LaunchFailed,
    request_retrain,
    retraining_history,
    retraining_status,
)
from visionloop.models import RetrainingRun, RetrainStatus
from visionloop.registry import CHAMPION, get_alias

router = APIRouter(prefix="/api/retraining", tags=["retraining"])


@router.get("/status", response_model=RetrainingStatusOut, responses=responses(503))
def status(settings: SettingsDep, session: SessionDep) -> RetrainingStatusOut:
    """The run in progress (with its stage and latest epoch), the last finished one, and why a
    retrain would or would not start now. Read only: the run states are the database's, which
    the trigger and the check-retrain flow reconcile with Prefect."""
    overview = retraining_status(session)
    decision = retraining_conditions(session, settings)
    champion = get_alias(settings, CHAMPION)
    return RetrainingStatusOut.model_validate(
        {
            "state": overview.state,
            "current": overview.current,
            "progress": overview.progress,
            "last_finished": overview.last_finished,
            "champion_version": champion.version if champion else None,
            "conditions": decision,
            "state_note": overview.state_note,
        }
    )


@router.get("/conditions", response_model=ConditionsOut, responses=responses(503))
def conditions(settings: SettingsDep, session: SessionDep) -> ConditionsOut:
    """Every retraining condition with its value, threshold, whether it fired and why."""
    return ConditionsOut.model_validate(retraining_conditions(session, settings))


@router.get("/history", response_model=Page[RetrainingRunOut], responses=responses(422))
def history(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Offset = 0,
    status: RetrainStatus | None = None,
    trigger: Annotated[str | None, Query(max_length=32)] = None,
) -> Page[RetrainingRunOut]:
    """Retraining runs, newest first."""
    total, rows = retraining_history(
        session,
        limit=limit,
        offset=offset,
        status=status.value if status else None,
        trigger=trigger,
    )
    return Page[RetrainingRunOut](
        total=total,
        limit=limit,
        offset=offset,
        items=[RetrainingRunOut.model_validate(r) for r in rows],
    )


@router.get("/runs/{run_id}", response_model=RetrainingRunOut, responses=responses(404, 422))
def run(session: SessionDep, run_id: Annotated[int, Path(ge=1, le=MAX_ID)]) -> RetrainingRunOut:
    row = session.get(RetrainingRun, run_id)
    if row is None:
        raise NotFound(f"no retraining run {run_id}")
    return RetrainingRunOut.model_validate(row)


@router.post(
    "/trigger",
    status_code=202,
    response_model=TriggerOut,
    dependencies=[Token],
    responses={**AUTH, **BODY, **responses(409, s409=BusyErrorBody)},
)
def trigger(
    settings: SettingsDep,
    session: SessionDep,
    launcher: LauncherDep,
    body: Annotated[TriggerIn | None, Body()] = None,
) -> TriggerOut:
    """Start a retrain now (deployment ``retrain/retrain``), whatever the conditions say.

    409 names the retraining run that is still running or queued: one retrain at a time.
    """
    reason = body.reason if body else ""
    try:
        launched = request_retrain(session, settings, reason, launcher)
    except LaunchFailed as exc:
        raise ServiceUnavailable(str(exc)) from exc
    return TriggerOut(
        retraining_run_id=launched.retraining_run_id,
        flow_run_id=launched.flow_run_id,
        status_url=f"/api/retraining/runs/{launched.retraining_run_id}",
    )
