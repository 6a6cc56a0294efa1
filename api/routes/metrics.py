"""Drift: the latest measurement with its per-feature detail, the timeline, Evidently's report."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.responses import HTMLResponse, Response
from sqlmodel import Session, col, select

from api.deps import ReadToken, SessionDep, SettingsDep, StoreDep
from api.errors import AUTH, NotFound, content, responses
from api.schemas import MAX_ID, DriftHistoryOut, DriftOut, DriftPointOut, IsoDatetime
from visionloop.models import DriftResult
from visionloop.settings import Settings
from visionloop.storage import ObjectStore, StorageError

router = APIRouter(prefix="/api/metrics", tags=["drift"])

_P_VALUE_KEY = "_p_value"  # stored beside the per-feature entries by monitoring.drift_monitor


def _drift_out(row: DriftResult) -> DriftOut:
    features = {
        k: v for k, v in (row.features or {}).items() if k != _P_VALUE_KEY and isinstance(v, dict)
    }
    ranked = sorted(features.values(), key=lambda f: -float(f.get("severity", 0.0)))
    return DriftOut.model_validate(
        {
            **{name: getattr(row, name) for name in DriftResult.model_fields},
            "p_value": (row.features or {}).get(_P_VALUE_KEY),
            "features": ranked,
            "report_url": f"/api/metrics/drift/{row.id}/report" if row.report_key else None,
        }
    )


def _latest(session: Session) -> DriftResult:
    row = session.exec(select(DriftResult).order_by(col(DriftResult.id).desc()).limit(1)).first()
    if row is None:
        raise NotFound(
            "drift has not been measured yet (the drift flow runs hourly, or start it in Prefect)"
        )
    return row


def _result(session: Session, result_id: int) -> DriftResult:
    row = session.get(DriftResult, result_id)
    if row is None:
        raise NotFound(f"no drift result {result_id}")
    return row


@router.get("/drift", response_model=DriftOut, responses=responses(404))
def drift(session: SessionDep) -> DriftOut:
    """The latest drift measurement: score, p-value, drift share, level, per-feature drift."""
    return _drift_out(_latest(session))


@router.get("/drift/history", response_model=DriftHistoryOut, responses=responses(422))
def drift_history(
    session: SessionDep,
    settings: SettingsDep,
    since: IsoDatetime | None = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 500,
) -> DriftHistoryOut:
    """The drift timeline (newest ``limit`` points, oldest first) with the level thresholds."""
    query = select(DriftResult).order_by(col(DriftResult.id).desc()).limit(limit)
    if since is not None:
        query = query.where(col(DriftResult.created_at) >= since)
    rows = list(session.exec(query))[::-1]
    return DriftHistoryOut(
        yellow=settings.drift_yellow,
        red=settings.drift_red,
        points=[DriftPointOut.model_validate(r) for r in rows],
    )


def _report(settings: Settings, store: ObjectStore, row: DriftResult) -> HTMLResponse:
    if not row.report_key:
        raise NotFound(f"drift result {row.id} has no HTML report")
    try:
        html = store.get_bytes(settings.bucket_reports, row.report_key)
    except StorageError as exc:
        raise NotFound(
            f"the report of drift result {row.id} is gone from the object store: {exc}"
        ) from exc
    return HTMLResponse(html)


# response_class=Response: the 200 is documented as what it is, the errors beside it as JSON.
_HTML = content("text/html", "Evidently's HTML report.")
ResultId = Annotated[int, Path(ge=1, le=MAX_ID)]


@router.get(
    "/drift/report",
    response_class=Response,
    dependencies=[ReadToken],
    responses={**_HTML, **AUTH, **responses(404, 503)},
)
def latest_report(session: SessionDep, settings: SettingsDep, store: StoreDep) -> HTMLResponse:
    """Evidently's HTML report of the latest measurement."""
    return _report(settings, store, _latest(session))


@router.get("/drift/{result_id}", response_model=DriftOut, responses=responses(404, 422))
def drift_result(session: SessionDep, result_id: ResultId) -> DriftOut:
    return _drift_out(_result(session, result_id))


@router.get(
    "/drift/{result_id}/report",
    response_class=Response,
    dependencies=[ReadToken],
    responses={**_HTML, **AUTH, **responses(404, 422, 503)},
)
def report(
    session: SessionDep, settings: SettingsDep, store: StoreDep, result_id: ResultId
) -> HTMLResponse:
    return _report(settings, store, _result(session, result_id))
