"""Label sync: reviewers' annotations in Label Studio become the platform's reviewed labels.

Label Studio owns the annotations (ARCHITECTURE.md, "Where each fact lives"); ``sync_labels`` pulls
them and brings each queue row and its reviewed label in line, so running it twice changes
nothing the second time. The webhook calls it for the tasks an event names; the label-sync
flow calls it for every queued task, catching whatever a webhook missed.

Per task, the annotation that counts is the ground-truth one, else the latest submitted
one; skips (``was_cancelled``) only count when nothing was submitted:

| in Label Studio | queue row | reviewed label |
| --- | --- | --- |
| a valid submitted annotation | ``labeled`` | written (boxes, verdict, reviewer) |
| an invalid one | ``pending``, ``sync_error`` lists every problem | removed |
| only skips | ``skipped`` | removed |
| no annotation (any more) | ``pending`` | removed |
| the task was deleted | ``cancelled`` (unless labeled: the label is kept) | kept |

Reviewed boxes are YOLO-normalised: ``{"cls", "name", "cx", "cy", "w", "h"}`` (0..1 of the
upright image). The verdict judges the champion's pre-annotation against them: ``accepted``
when every predicted box survived unchanged and nothing was added, ``rejected`` when no
predicted box survived (or the model missed everything), else ``corrected``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import numpy as np
from label_studio_sdk.core.api_error import ApiError
from sqlmodel import Session, col, select

from labeling.provision import unreachable
from labeling.wiring import ReviewProject, review_project
from visionloop.boxes import (
    FROM_NAME,
    MATCH_IOU,
    RECTANGLE,
    TO_NAME,
    Extent,
    YoloBox,
    box_dicts,
    clip_extent,
    corners,
    extent_box,
    greedy_match,
    iou_matrix,
    ls_extent,
)
from visionloop.events import EventKind, emit
from visionloop.models import (
    Image,
    ImageStatus,
    LabelingQueueItem,
    Prediction,
    QueueStatus,
    ReviewedLabel,
    Verdict,
    utcnow,
)
from visionloop.settings import Settings

EDGE_TOLERANCE = 0.5
"""Percent of the image a box may stick out (drawing to the very edge overshoots); clipped."""
MIN_BOX_PX = 2.0
"""Boxes narrower or lower than this many pixels are degenerate."""
MAX_ROTATION = 0.5
"""Degrees; a rotated rectangle has no YOLO form."""
UNCHANGED_IOU = 0.99
"""A predicted box kept at least this exactly counts as accepted as is."""


class InvalidAnnotation(ValueError):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass
class SyncReport:
    labeled: list[int] = field(default_factory=list)
    """Task ids whose reviewed label was written or changed."""
    rejected: dict[int, str] = field(default_factory=dict)
    """Task id -> why its annotation cannot be used."""
    skipped: list[int] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)
    reopened: list[int] = field(default_factory=list)
    """Tasks whose annotations were removed: back to pending."""
    unchanged: int = 0

    @property
    def changed(self) -> int:
        return (
            len(self.labeled)
            + len(self.rejected)
            + len(self.skipped)
            + len(self.cancelled)
            + len(self.reopened)
        )

    def summary(self) -> dict[str, Any]:
        return {
            "labeled": len(self.labeled),
            "rejected": {str(k): v for k, v in self.rejected.items()},
            "skipped": len(self.skipped),
            "cancelled": len(self.cancelled),
            "reopened": len(self.reopened),
            "unchanged": self.unchanged,
        }


def announce(report: SyncReport, via: str) -> None:
    """An activity event for a sync that changed something (``via``: flow or webhook)."""
    if not report.changed:
        return
    emit(
        EventKind.LABELS_SYNCED,
        f"{len(report.labeled)} reviewed labels synced, {len(report.rejected)} annotations "
        f"rejected ({via})",
        {**report.summary(), "labeled_tasks": report.labeled, "via": via},
        level="warning" if report.rejected else "info",
    )


# --- validation ----------------------------------------------------------------------------


class _Rejected(ValueError):
    """One region's problem (the caller says which region)."""


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _check_tags(region: Mapping[str, Any], width: int, height: int) -> None:
    """The region is a rectangle of the review config, drawn on the image as ingested."""
    if region.get("type") != RECTANGLE or region.get("from_name") != FROM_NAME:
        raise _Rejected(f"not a {FROM_NAME!r} rectangle ({region.get('type')!r})")
    if region.get("to_name") != TO_NAME:
        raise _Rejected(f"drawn on {region.get('to_name')!r}, not {TO_NAME!r}")
    shown = (region.get("original_width"), region.get("original_height"))
    if None not in shown and shown != (width, height):
        # The browser showed the image at another size or orientation than it was
        # ingested with: the percentages would land in the wrong place.
        raise _Rejected(f"drawn on a {shown[0]}x{shown[1]} image, but it is {width}x{height}")


def _label(value: Mapping[str, Any], class_names: Sequence[str]) -> str:
    labels = value.get("rectanglelabels") or []
    if len(labels) != 1:
        raise _Rejected(f"needs exactly one label, has {labels}")
    if labels[0] not in class_names:
        raise _Rejected(f"unknown label {labels[0]!r} (known: {', '.join(class_names)})")
    return labels[0]


def _upright_extent(value: Mapping[str, Any]) -> Extent:
    """Percent corners of an upright rectangle reaching at most ``EDGE_TOLERANCE`` outside."""
    x, y, w, h = (_number(value.get(k)) for k in ("x", "y", "width", "height"))
    if x is None or y is None or w is None or h is None:
        raise _Rejected("coordinates missing or not numbers")
    rotation = _number(value.get("rotation", 0)) or 0.0
    if abs(rotation) > MAX_ROTATION:
        raise _Rejected(f"rotated by {rotation:g} degrees; boxes must be upright")
    # A rotation within MAX_ROTATION is read as none: the box is taken as drawn.
    extent = ls_extent({**value, "rotation": 0}, 100.0, 100.0)
    tol = EDGE_TOLERANCE
    if extent[0] < -tol or extent[1] < -tol or extent[2] > 100 + tol or extent[3] > 100 + tol:
        raise _Rejected(f"outside the image (x={x:.1f}%, y={y:.1f}%, w={w:.1f}%, h={h:.1f}%)")
    return extent


def _region_box(
    region: Mapping[str, Any], class_names: Sequence[str], width: int, height: int
) -> YoloBox:
    """One region as a YOLO box (6 decimals, as stored), clipped to the image."""
    _check_tags(region, width, height)
    value = region.get("value") or {}
    label = _label(value, class_names)
    x0, y0, x1, y1 = clip_extent(_upright_extent(value), 100.0)
    w_px, h_px = (x1 - x0) / 100 * width, (y1 - y0) / 100 * height
    if w_px < MIN_BOX_PX or h_px < MIN_BOX_PX:
        raise _Rejected(f"degenerate box ({w_px:.1f}x{h_px:.1f} px)")
    box = extent_box(list(class_names).index(label), (x0, y0, x1, y1))
    return YoloBox(box.cls, *(round(v, 6) for v in box[1:]))


def validate_regions(
    result: Sequence[dict[str, Any]], class_names: Sequence[str], width: int, height: int
) -> list[dict[str, Any]]:
    """Reviewed boxes from an annotation's ``result``; ``InvalidAnnotation`` lists every problem."""
    problems: list[str] = []
    boxes: list[YoloBox] = []
    for index, region in enumerate(result, start=1):
        try:
            boxes.append(_region_box(region, class_names, width, height))
        except _Rejected as exc:
            problems.append(f"region {index}: {exc}")
    if problems:
        raise InvalidAnnotation(problems)
    return box_dicts(boxes, class_names)


# --- verdict -------------------------------------------------------------------------------


def judge(predicted: Sequence[dict[str, Any]], reviewed: Sequence[dict[str, Any]]) -> Verdict:
    """The reviewer's verdict on ``predicted`` (normalised ``x1..y2``) given ``reviewed`` (YOLO).

    Boxes are matched one to one within their class (``greedy_match``).
    """
    ious = iou_matrix(corners(predicted), corners(reviewed))
    same_class = np.array(
        [[p["name"] == r["name"] for r in reviewed] for p in predicted], bool
    ).reshape(ious.shape)
    matched = greedy_match(np.where(same_class, ious, -1.0), MATCH_IOU)
    if len(predicted) == len(reviewed) == len(matched) and all(m >= UNCHANGED_IOU for m in matched):
        return Verdict.accepted
    return Verdict.corrected if matched else Verdict.rejected


# --- reconciling one task ------------------------------------------------------------------


def _when(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")) if value else utcnow()


def decisive_annotation(annotations: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The annotation that counts: ground truth, else the latest submitted, else the latest skip."""
    annotations = list(annotations)
    submitted = [a for a in annotations if not a.get("was_cancelled")]
    pool = [a for a in submitted if a.get("ground_truth")] or submitted or annotations
    return max(pool, key=lambda a: (_when(a.get("updated_at")), a.get("id", 0)), default=None)


def _reviewer(value: Any, users: dict[int, str], project: ReviewProject) -> str | None:
    if isinstance(value, dict):
        return value.get("email") or str(value.get("id"))
    if isinstance(value, int):
        if value not in users:
            try:
                users[value] = project.ls.users.get(id=value).email or str(value)
            except ApiError:
                users[value] = str(value)
        return users[value]
    return None


def _set_label(session: Session, item: LabelingQueueItem, label: ReviewedLabel | None) -> bool:
    """Make the image's reviewed label ``label`` (None: none); True when something changed."""
    existing = session.exec(
        select(ReviewedLabel).where(ReviewedLabel.image_id == item.image_id)
    ).first()
    if label is None:
        if existing is None:
            return False
        session.delete(existing)
        return True
    fields = (
        "boxes",
        "verdict",
        "label",
        "reviewer",
        "label_studio_annotation_id",
        "label_studio_task_id",
        "prediction_model_version",
        "confidence",
        "image_path",
    )
    if existing is not None and all(getattr(existing, f) == getattr(label, f) for f in fields):
        return False
    if existing is None:
        session.add(label)
    else:
        for f in fields:
            setattr(existing, f, getattr(label, f))
        existing.used_for_training = False  # changed boxes have not been trained on
    return True


def _set_status(item: LabelingQueueItem, **values: Any) -> bool:
    changed = any(getattr(item, k) != v for k, v in values.items())
    for k, v in values.items():
        setattr(item, k, v)
    return changed


def _image_status(session: Session, image_id: int, status: ImageStatus) -> None:
    image = session.get(Image, image_id)
    if image is not None:
        image.status = status


def _unlabel(
    session: Session, item: LabelingQueueItem, status: QueueStatus, error: str | None = None
) -> bool:
    """Put the row back to ``status`` without a reviewed label; True when something changed."""
    changed = _set_status(item, status=status, sync_error=error, human_label=None, labeled_at=None)
    changed |= _set_label(session, item, None)
    _image_status(session, item.image_id, ImageStatus.queued)
    return changed


def _reviewed_label(
    session: Session,
    settings: Settings,
    item: LabelingQueueItem,
    annotation: dict[str, Any],
    boxes: list[dict[str, Any]],
    reviewer: str | None,
) -> ReviewedLabel:
    """The reviewed label an accepted annotation makes, judged against the shown prediction."""
    prediction = session.get(Prediction, item.prediction_id) if item.prediction_id else None
    shown = [
        b for b in (prediction.boxes if prediction else []) if b["name"] in settings.class_names
    ]
    counts = Counter(b["name"] for b in boxes)
    return ReviewedLabel(
        image_id=item.image_id,
        image_path=item.image_path,
        label=counts.most_common(1)[0][0] if counts else None,
        boxes=boxes,
        confidence=item.confidence_score,
        reviewer=reviewer,
        verdict=judge(shown, boxes),
        label_studio_task_id=item.label_studio_task_id,
        label_studio_annotation_id=annotation.get("id"),
        prediction_model_version=prediction.model_version if prediction else None,
    )


def _store_label(
    session: Session, item: LabelingQueueItem, label: ReviewedLabel, annotated_at: datetime
) -> bool:
    """Write the reviewed label and mark the row labeled; True when something changed."""
    changed = _set_label(session, item, label)
    changed |= _set_status(
        item, status=QueueStatus.labeled, sync_error=None, human_label=label.label
    )
    if changed:
        item.labeled_at = annotated_at
    _image_status(session, item.image_id, ImageStatus.labeled)
    return changed


def _tally(report: SyncReport, changed: bool, bucket: list[int], task_id: int) -> None:
    if changed:
        bucket.append(task_id)
    else:
        report.unchanged += 1


def reconcile(
    session: Session,
    settings: Settings,
    item: LabelingQueueItem,
    task: dict[str, Any] | None,
    report: SyncReport,
    *,
    users: dict[int, str],
    project: ReviewProject,
) -> None:
    """Bring one queue row (and its image's reviewed label) in line with its task."""
    task_id = item.label_studio_task_id
    assert task_id is not None
    if task is None:  # deleted in Label Studio: a label already taken is kept
        changed = item.status != QueueStatus.labeled and _set_status(
            item, status=QueueStatus.cancelled
        )
        _tally(report, changed, report.cancelled, task_id)
        return
    annotation = decisive_annotation(task.get("annotations") or [])
    if annotation is None:
        _tally(report, _unlabel(session, item, QueueStatus.pending), report.reopened, task_id)
        return
    if annotation.get("was_cancelled"):
        _tally(report, _unlabel(session, item, QueueStatus.skipped), report.skipped, task_id)
        return
    image = session.get(Image, item.image_id)
    assert image is not None
    result = annotation.get("result") or []
    try:
        boxes = validate_regions(result, settings.class_names, image.width or 0, image.height or 0)
    except InvalidAnnotation as exc:
        error = f"annotation {annotation.get('id')}: {exc}"
        if _unlabel(session, item, QueueStatus.pending, error):
            report.rejected[task_id] = error
        else:
            report.unchanged += 1
        return
    reviewer = _reviewer(annotation.get("completed_by"), users, project)
    label = _reviewed_label(session, settings, item, annotation, boxes, reviewer)
    changed = _store_label(session, item, label, _when(annotation.get("updated_at")))
    _tally(report, changed, report.labeled, task_id)


# --- whole project / some tasks --------------------------------------------------------------


def _fetch_tasks(
    project: ReviewProject, task_ids: Collection[int] | None
) -> dict[int, dict[str, Any]]:
    """Tasks with their annotations, by id; a deleted task is simply absent."""
    tasks: dict[int, dict[str, Any]] = {}
    if task_ids is None:
        for task in project.ls.tasks.list(project=project.id, fields="all", page_size=100):
            tasks[int(task.id)] = {"annotations": task.annotations or []}
        return tasks
    for task_id in task_ids:
        try:
            task = project.ls.tasks.get(id=task_id)
        except ApiError as exc:
            if exc.status_code == 404:
                continue
            raise
        if task.project == project.id:
            tasks[int(task.id)] = {"annotations": task.annotations or []}
    return tasks


def _queued_items(session: Session, task_ids: Collection[int] | None) -> list[LabelingQueueItem]:
    """Rows with a task: those of ``task_ids``, or (None) every one not cancelled."""
    query = select(LabelingQueueItem).where(
        col(LabelingQueueItem.label_studio_task_id).is_not(None),
    )
    if task_ids is None:
        query = query.where(LabelingQueueItem.status != QueueStatus.cancelled)
    else:
        query = query.where(col(LabelingQueueItem.label_studio_task_id).in_(list(task_ids)))
    return list(session.exec(query.order_by(col(LabelingQueueItem.id))))


def sync_labels(
    session: Session,
    settings: Settings,
    task_ids: Collection[int] | None = None,
    project: ReviewProject | None = None,
) -> SyncReport:
    """Reconcile the queue rows of ``task_ids`` (default: every queued task) with Label Studio.

    The changes are made in ``session``, for the caller to commit as one transaction.
    """
    report = SyncReport()
    items = _queued_items(session, task_ids)
    if not items:
        return report
    project = project or review_project(settings)
    wanted = None if task_ids is None else [i.label_studio_task_id for i in items]
    try:
        tasks = _fetch_tasks(project, wanted)  # type: ignore[arg-type]
        users: dict[int, str] = {}
        for item in items:
            task = tasks.get(item.label_studio_task_id)  # type: ignore[arg-type]
            reconcile(session, settings, item, task, report, users=users, project=project)
    except httpx.TransportError as exc:
        # The caller's transaction rolls back: a sync cut short changes nothing.
        raise unreachable(settings.label_studio, exc) from exc
    return report


def task_ids_for_annotations(session: Session, annotation_ids: Iterable[int]) -> list[int]:
    """Tasks whose reviewed label came from one of ``annotation_ids`` (deletion events name
    annotations only)."""
    ids = list(annotation_ids)
    if not ids:
        return []
    rows = session.exec(
        select(ReviewedLabel.label_studio_task_id).where(
            col(ReviewedLabel.label_studio_annotation_id).in_(ids)
        )
    )
    return [int(t) for t in rows if t is not None]
