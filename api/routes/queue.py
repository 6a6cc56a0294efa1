"""The labelling queue, what the reviews say about the model, and dataset exports.

(The Label Studio webhook under the same prefix lives in ``api/routes/labeling.py``.)
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response, StreamingResponse
from sqlmodel import col, func, select

from api.deps import SessionDep, SettingsDep, StoreDep
from api.errors import responses
from api.schemas import MAX_ID, IsoDatetime, Offset, Page, QueueItemOut, QueueStatsOut, SnapshotOut
from labeling.review_queue import QueueFilter, queue_page, queue_stats
from training.snapshot_export import ExportFormat, export_snapshot, snapshot_for_export
from visionloop.models import DatasetSnapshot, QueueStatus

router = APIRouter(prefix="/api/labeling", tags=["labeling"])


@router.get("/queue", response_model=Page[QueueItemOut], responses=responses(422))
def queue(
    session: SessionDep,
    status: QueueStatus | None = None,
    flagged_reason: Annotated[str | None, Query(max_length=100)] = None,
    min_confidence: Annotated[float | None, Query(ge=0, le=1)] = None,
    max_confidence: Annotated[float | None, Query(ge=0, le=1)] = None,
    created_after: IsoDatetime | None = None,
    created_before: IsoDatetime | None = None,
    order: Annotated[str, Query(pattern="^(newest|oldest)$")] = "newest",
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Offset = 0,
) -> Page[QueueItemOut]:
    """Queue items matching every filter given, newest first unless ``order=oldest``."""
    where = QueueFilter(
        status, flagged_reason, min_confidence, max_confidence, created_after, created_before
    )
    total, rows = queue_page(
        session, where, limit=limit, offset=offset, newest_first=order == "newest"
    )
    return Page[QueueItemOut](
        total=total,
        limit=limit,
        offset=offset,
        items=[QueueItemOut.model_validate(r) for r in rows],
    )


@router.get("/stats", response_model=QueueStatsOut)
def stats(session: SessionDep, settings: SettingsDep) -> QueueStatsOut:
    """Pending / labelled / approved counts, per flagged reason, how often reviewers agree with
    the model, and per-class error rates from their corrections."""
    result = queue_stats(session, settings.class_names)
    return QueueStatsOut.model_validate(
        {
            **result.__dict__,
            "pending": result.by_status.get(QueueStatus.pending.value, 0),
            "labeled": result.by_status.get(QueueStatus.labeled.value, 0),
            "approved": result.by_status.get(QueueStatus.approved.value, 0),
            "classes": [
                {
                    **c.__dict__,
                    "false_positives": c.false_positives,
                    "missed": c.missed,
                    "error_rate": c.error_rate,
                }
                for c in result.classes
            ],
        }
    )


@router.get("/snapshots", response_model=Page[SnapshotOut], responses=responses(422))
def snapshots(
    session: SessionDep,
    kind: Annotated[str | None, Query(pattern="^(training|holdout|bootstrap)$")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Offset = 0,
) -> Page[SnapshotOut]:
    """Dataset snapshots, newest first: what ``/export`` can hand out."""
    query = select(DatasetSnapshot)
    if kind:
        query = query.where(DatasetSnapshot.kind == kind)
    total = session.exec(select(func.count()).select_from(query.subquery())).one()
    rows = session.exec(query.order_by(col(DatasetSnapshot.id).desc()).offset(offset).limit(limit))
    return Page[SnapshotOut](
        total=total, limit=limit, offset=offset, items=[SnapshotOut.model_validate(r) for r in rows]
    )


@router.get(
    "/export",
    response_class=Response,  # the 200 is a zip or a JSON document, the errors beside it JSON
    responses={
        200: {
            "description": "The snapshot: a zip for yolo, JSON for coco and labelstudio.",
            "content": {
                "application/zip": {"schema": {"type": "string", "format": "binary"}},
                "application/json": {},
            },
        },
        **responses(404, 422, 503),
    },
)
def export(
    settings: SettingsDep,
    session: SessionDep,
    store: StoreDep,
    format: ExportFormat = "yolo",
    snapshot_id: Annotated[
        int | None, Query(ge=1, le=MAX_ID, description="Default: the newest one.")
    ] = None,
) -> StreamingResponse:
    """A dataset snapshot as a YOLO zip, COCO JSON or Label Studio JSON."""
    snapshot = snapshot_for_export(session, snapshot_id)
    result = export_snapshot(settings, snapshot, format, store)
    return StreamingResponse(
        result.chunks(),
        media_type=result.media_type,
        headers={
            "Content-Disposition": f'attachment; filename="{result.filename}"',
            "X-Snapshot-Id": str(snapshot.id),
            "X-Snapshot-Hash": snapshot.manifest_hash,
        },
    )
