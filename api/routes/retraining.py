"""Retraining: status, the conditions and their reasons, history, and the trigger button."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Body, Path, Query
from fastapi.responses import Response

from api.deps import LauncherDep, ReadToken, SessionDep, SettingsDep, StoreDep, Token
from api.errors import (
    AUTH,
    BODY,
    BusyErrorBody,
    NotFound,
    ServiceUnavailable,
    content,
    responses,
)
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
from monitoring.champion_cache import cached_champion_birth
from monitoring.conditions import retraining_conditions
from training.retrain_report import report_key
from training.retrain_requests import (
    LaunchFailed,
    request_retrain,
    retraining_history,
    retraining_status,
)
from visionloop.models import DriftLevel, RetrainingRun, RetrainStatus

router = APIRouter(prefix="/api/retraining", tags=["retraining"])


@router.get("/status", response_model=RetrainingStatusOut, responses=responses(503))
def status(settings: SettingsDep, session: SessionDep) -> RetrainingStatusOut:
    """The run in progress (with its stage and latest epoch), the last finished one, and why a
    retrain would or would not start now. Read only: the run states are the database's, which
    the trigger and the check-retrain flow reconcile with Prefect."""
    overview = retraining_status(session)
    decision = retraining_conditions(session, settings)
    champion = cached_champion_birth(settings)  # what the conditions just read: no second call
    finding = {c.name: c for c in decision.conditions}
    last = overview.last_finished
    return RetrainingStatusOut.model_validate(
        {
            "status": overview.job_status,
            "last_retrain_time": last.finished_at if last else None,
            "drift_detected": finding["drift"].value in (DriftLevel.yellow, DriftLevel.red),
            "new_labels_count": finding["new_labels"].value,
            "should_retrain": decision.should_retrain,
            "state": overview.state,
            "current": overview.current,
            "progress": overview.progress,
            "last_finished": overview.last_finished,
            "champion_version": champion.version,
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
    limit: Annotated[int, Query(ge=1, le=500)] = 10,
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


REPORT_MEDIA = {
    "md": "text/markdown; charset=utf-8",
    "json": "application/json",
    "html": "text/html; charset=utf-8",
}
CSP = "Content-Security-Policy"


@router.get(
    "/runs/{run_id}/report",
    response_class=Response,
    dependencies=[ReadToken],
    responses={
        **content(
            ("text/markdown", "application/json", "text/html"),
            "The report for people (`format=md`, the default), for tools (`format=json`), or "
            "as one page with its pictures inline (`format=html`).",
        ),
        **AUTH,
        **responses(404, 422),
    },
)
def report(
    settings: SettingsDep,
    store: StoreDep,
    run_id: Annotated[int, Path(ge=1, le=MAX_ID)],
    format: Literal["md", "json", "html"] = "md",
) -> Response:
    """The retrain's report: trigger, labels consumed by reason, overall and per-class AP before
    and after on the held-out set, how sure the verdict is, the gate's reasons, time per stage
    and held-out images drawn champion against challenger (data-bearing)."""
    key = report_key(run_id, format)
    if not store.exists(settings.bucket_reports, key):
        if format == "html" and store.exists(settings.bucket_reports, report_key(run_id, "md")):
            raise NotFound(
                f"retraining run {run_id}'s report predates HTML reports: format=md has it"
            )
        raise NotFound(
            f"retraining run {run_id} has no report: only runs that reached a verdict write one"
        )
    body = store.get_bytes(settings.bucket_reports, key)
    if format == "html":
        # Everything the page shows is inline: it may load nothing and run nothing.
        policy = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
        return Response(body, media_type=REPORT_MEDIA[format], headers={CSP: policy})
    return Response(body, media_type=REPORT_MEDIA[format])


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
        job_id=launched.retraining_run_id,
        retraining_run_id=launched.retraining_run_id,
        flow_run_id=launched.flow_run_id,
        status_url=f"/api/retraining/runs/{launched.retraining_run_id}",
    )
