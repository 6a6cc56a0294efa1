"""The labelling queue, what the reviews say about the model, and dataset exports.

(The Label Studio webhook under the same prefix lives in ``api/routes/labeling.py``.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import FileResponse, Response
from sqlmodel import col, func, select

from api.deps import ReadToken, SessionDep, SettingsDep, StoreDep, Token
from api.errors import AUTH, BODY, responses
from api.schemas import (
    MAX_ID,
    ApproveIn,
    IsoDatetime,
    ItemId,
    LabelIn,
    Offset,
    Page,
    QueueItemOut,
    QueueStatsOut,
    RejectIn,
    ReviewOut,
    SnapshotOut,
)
from labeling.review_actions import (
    LabelBox,
    Reviewed,
    approve_label,
    reject_label,
    submit_label,
)
from labeling.review_queue import QueueFilter, queue_page, queue_stats
from training.snapshot_export import (
    Export,
    ExportFormat,
    export_snapshot,
    snapshot_for_export,
)
from visionloop.models import DatasetSnapshot, QueueStatus
from visionloop.settings import Settings
from visionloop.storage import ObjectStore

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


def _reviewed(result: Reviewed) -> ReviewOut:
    return ReviewOut.model_validate(
        {"item": result.item, "label": result.label, "changed": result.changed}
    )


@router.post(
    "/queue/{item_id}/label",
    response_model=ReviewOut,
    dependencies=[Token],
    responses={**AUTH, **BODY, **responses(404, 409, 503)},
)
def label_item(
    item_id: ItemId, body: LabelIn, session: SessionDep, settings: SettingsDep
) -> ReviewOut:
    """Label a queued image: the boxes (and any verdicts and note) become an annotation in
    Label Studio, which stays the source of truth, synced into the reviewed label at once.

    Sending the same label again creates nothing (``changed`` false). 422 lists every problem
    with the boxes; 409 when the image is not in Label Studio yet.
    """
    boxes = [LabelBox(**box.model_dump()) for box in body.boxes]
    return _reviewed(submit_label(session, settings, item_id, boxes, body.notes))


@router.post(
    "/queue/{item_id}/approve",
    response_model=ReviewOut,
    dependencies=[Token],
    responses={**AUTH, **BODY, **responses(404, 409)},
)
def approve_item(item_id: ItemId, body: ApproveIn, session: SessionDep) -> ReviewOut:
    """A second reviewer approves the item's label (with ``VISIONLOOP_TRAIN_APPROVED_ONLY``,
    only approved labels train). 409 when there is no label, when the approver made it, or
    when someone else approved it; approving again is a no-op."""
    return _reviewed(approve_label(session, item_id, body.reviewer))


@router.post(
    "/queue/{item_id}/reject",
    response_model=ReviewOut,
    dependencies=[Token],
    responses={**AUTH, **BODY, **responses(404, 409, 503)},
)
def reject_item(
    item_id: ItemId, body: RejectIn, session: SessionDep, settings: SettingsDep
) -> ReviewOut:
    """Send the item's label back: the reason shows on its task in Label Studio, the task is
    reopened, and the item is pending (no reviewed label) until the reviewer updates the
    annotation or submits another."""
    return _reviewed(reject_label(session, settings, item_id, body.reviewer, body.reason))


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


EXPORT_CACHE_KEEP = 6
"""Built exports kept on disk; the oldest goes first."""


@dataclass(frozen=True)
class CachedExport:
    path: Path
    filename: str
    media_type: str
    hit: bool  # served from the cache, not built for this request


class ExportCache:
    """Built exports on disk, keyed by the snapshot's manifest hash, kind and format.

    A snapshot is content-addressed: the same manifest hash is the same labelled data, so its
    export never changes and is built once, not once per request (a zip of every image).
    """

    def __init__(self, root: Path, keep: int = EXPORT_CACHE_KEEP) -> None:
        self.root = root
        self.keep = keep
        self._lock = threading.Lock()

    def get(self, key: str, build: Callable[[], Export]) -> CachedExport:
        # One build at a time: concurrent first requests wait for it instead of each building.
        with self._lock:
            found = self._find(key)
            if found is not None:
                return CachedExport(*found, hit=True)
            export = build()
            return CachedExport(*self._store(key, export), hit=False)

    def _find(self, key: str) -> tuple[Path, str, str] | None:
        folder = self.root / key
        files = [f for f in folder.glob("*") if f.is_file()] if folder.is_dir() else []
        if len(files) != 1:
            return None
        os.utime(folder)  # recently used: evicted last
        media_type = "application/zip" if files[0].suffix == ".zip" else "application/json"
        return files[0], files[0].name, media_type

    def _store(self, key: str, export: Export) -> tuple[Path, str, str]:
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=".building-"))
        try:
            with export.body, open(staging / export.filename, "wb") as out:
                shutil.copyfileobj(export.body, out)
            # A rename, so a half-written export is never found by the next request.
            os.replace(staging, self.root / key)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._evict()
        return self.root / key / export.filename, export.filename, export.media_type

    def _evict(self) -> None:
        folders = [f for f in self.root.iterdir() if f.is_dir() and not f.name.startswith(".")]
        folders.sort(key=lambda f: f.stat().st_mtime, reverse=True)
        for stale in folders[self.keep :]:
            shutil.rmtree(stale, ignore_errors=True)


_caches: dict[Path, ExportCache] = {}
_caches_lock = threading.Lock()


def export_cache(settings: Settings) -> ExportCache:
    root = Path(settings.data_dir) / "cache" / "exports"
    with _caches_lock:
        return _caches.setdefault(root, ExportCache(root))


def _etag(snapshot: DatasetSnapshot, fmt: str) -> str:
    return f'"{snapshot.manifest_hash}-{snapshot.kind}-{fmt}"'


def _cached_export(
    settings: Settings, store: ObjectStore, snapshot: DatasetSnapshot, fmt: ExportFormat
) -> CachedExport:
    key = f"{snapshot.manifest_hash}-{snapshot.kind}-{fmt}"
    return export_cache(settings).get(key, lambda: export_snapshot(settings, snapshot, fmt, store))


@router.get(
    "/export",
    response_class=Response,  # the 200 is a zip or a JSON document, the errors beside it JSON
    dependencies=[ReadToken],
    responses={
        200: {
            "description": "The snapshot: a zip for yolo, JSON for coco and labelstudio. "
            "`ETag` names the snapshot's content; `X-Export-Cache` says whether this export "
            "was built for the request (miss) or reused (hit).",
            "content": {
                "application/zip": {"schema": {"type": "string", "format": "binary"}},
                "application/json": {},
            },
        },
        304: {"description": "The snapshot is the one named by `If-None-Match`."},
        **AUTH,
        **responses(404, 409, 422, 503),
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
    if_none_match: Annotated[str | None, Header(max_length=200)] = None,
) -> Response:
    """A dataset snapshot as a YOLO zip, COCO JSON or Label Studio JSON."""
    snapshot = snapshot_for_export(session, snapshot_id)
    etag = _etag(snapshot, format)
    identity = {"ETag": etag, "X-Snapshot-Id": str(snapshot.id)}
    if if_none_match is not None and etag in (t.strip() for t in if_none_match.split(",")):
        return Response(status_code=304, headers=identity)
    cached = _cached_export(settings, store, snapshot, format)
    return FileResponse(
        cached.path,
        media_type=cached.media_type,
        filename=cached.filename,
        headers={
            **identity,
            "X-Snapshot-Hash": snapshot.manifest_hash,
            "X-Export-Cache": "hit" if cached.hit else "miss",
        },
    )
