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
upright image); a box the reviewer marked ``incorrect`` is not one of them, and each box's
verdict is kept beside them (``labeling.verdicts``), with the reviewer's note on the queue row.
The image's verdict judges the champion's pre-annotation against the reviewed boxes:
``accepted`` when every predicted box survived unchanged and nothing was added, ``rejected``
when no predicted box survived (or the model missed everything), else ``corrected``.

An annotation that cannot be used, or that an approver sent back (``labeling.review_actions``),
is sent back to its reviewer in Label Studio with the reason (``labeling.task_notes``); the
sync passes over a sent-back annotation, and any older one, until the reviewer updates it or
submits another. A label that changes loses its approval.
"""

from __future__ import annotations

import logging
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

from labeling.label_config import NOTES_NAME, VERDICT_NAME
from labeling.provision import unreachable
from labeling.task_notes import clear_note, send_back
from labeling.verdicts import ReviewedRegion, box_feedback
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
    BoxVerdict,
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

log = logging.getLogger(__name__)

EDGE_TOLERANCE = 0.5
"""Percent of the image a box may stick out (drawing to the very edge overshoots); clipped."""
MIN_BOX_PX = 2.0
"""Boxes narrower or lower than this many pixels are degenerate."""
MAX_ROTATION = 0.5
"""Degrees; a rotated rectangle has no YOLO form."""
UNCHANGED_IOU = 0.99
"""A predicted box kept at least this exactly counts as accepted as is."""
MAX_NOTES = 5000
"""Characters of a reviewer's note kept."""


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


@dataclass(frozen=True)
class AnnotationContent:
    """What an annotation says: its boxes (with any verdict chosen for them) and its note."""

    regions: list[ReviewedRegion]
    notes: str | None


def _chosen_verdict(result: Mapping[str, Any]) -> BoxVerdict:
    choices = (result.get("value") or {}).get("choices") or []
    if len(choices) != 1 or choices[0] not in {v.value for v in BoxVerdict}:
        raise _Rejected(f"a box verdict must be one of {[v.value for v in BoxVerdict]}")
    return BoxVerdict(choices[0])


def _note_text(result: Mapping[str, Any]) -> str:
    text = (result.get("value") or {}).get("text") or []
    if isinstance(text, str):
        text = [text]
    return "\n".join(str(t) for t in text)


def read_annotation(
    result: Sequence[dict[str, Any]], class_names: Sequence[str], width: int, height: int
) -> AnnotationContent:
    """The boxes, box verdicts and note of an annotation's ``result``; ``InvalidAnnotation``
    lists every problem (regions numbered among the rectangles, in order)."""
    problems: list[str] = []
    rectangles = [r for r in result if r.get("from_name") not in (VERDICT_NAME, NOTES_NAME)]
    ids = [r.get("id") for r in rectangles]
    chosen: dict[str, BoxVerdict] = {}
    notes: list[str] = []
    for r in result:
        if r.get("from_name") == NOTES_NAME:
            notes.append(_note_text(r))
        elif r.get("from_name") == VERDICT_NAME:
            where = f"region {ids.index(r.get('id')) + 1}" if r.get("id") in ids else None
            try:
                if where is None:
                    raise _Rejected(f"a box verdict for no box (region id {r.get('id')!r})")
                chosen[str(r.get("id"))] = _chosen_verdict(r)
            except _Rejected as exc:
                problems.append(f"{where or 'verdict'}: {exc}")
    regions: list[ReviewedRegion] = []
    for index, region in enumerate(rectangles, start=1):
        try:
            [box] = box_dicts([_region_box(region, class_names, width, height)], class_names)
        except _Rejected as exc:
            problems.append(f"region {index}: {exc}")
            continue
        region_id = region.get("id")
        regions.append(ReviewedRegion(region_id, box, chosen.get(str(region_id))))
    if problems:
        raise InvalidAnnotation(problems)
    note = "\n".join(n for n in notes if n.strip()).strip()[:MAX_NOTES]
    return AnnotationContent(regions, note or None)


def validate_regions(
    result: Sequence[dict[str, Any]], class_names: Sequence[str], width: int, height: int
) -> list[dict[str, Any]]:
    """Reviewed boxes from an annotation's ``result``; ``InvalidAnnotation`` lists every problem."""
    return [r.box for r in read_annotation(result, class_names, width, height).regions]


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
        "box_feedback",
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
        existing.approved_by = existing.approved_at = None  # nor approved
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


def _shown(
    session: Session, settings: Settings, item: LabelingQueueItem
) -> tuple[Prediction | None, list[tuple[int, dict[str, Any]]]]:
    """The prediction the reviewer was shown, and its boxes by their index in it (the region
    ids ``labeling.tasks`` gave them); boxes of classes the project lacks were not shown."""
    prediction = session.get(Prediction, item.prediction_id) if item.prediction_id else None
    boxes = prediction.boxes if prediction else []
    return prediction, [(i, b) for i, b in enumerate(boxes) if b["name"] in settings.class_names]


def _reviewed_label(
    session: Session,
    settings: Settings,
    item: LabelingQueueItem,
    annotation: dict[str, Any],
    content: AnnotationContent,
) -> ReviewedLabel:
    """The reviewed label a usable annotation makes, judged against the shown prediction;
    ``InvalidAnnotation`` when its box verdicts contradict what the champion predicted."""
    prediction, shown = _shown(session, settings, item)
    feedback = box_feedback(shown, content.regions)
    if feedback.problems:
        raise InvalidAnnotation(feedback.problems)
    counts = Counter(b["name"] for b in feedback.boxes)
    return ReviewedLabel(
        image_id=item.image_id,
        image_path=item.image_path,
        label=counts.most_common(1)[0][0] if counts else None,
        boxes=feedback.boxes,
        box_feedback=feedback.verdicts,
        confidence=item.confidence_score,
        verdict=judge([b for _, b in shown], feedback.boxes),
        label_studio_task_id=item.label_studio_task_id,
        label_studio_annotation_id=annotation.get("id"),
        prediction_model_version=prediction.model_version if prediction else None,
    )


def _store_label(
    session: Session,
    item: LabelingQueueItem,
    label: ReviewedLabel,
    annotated_at: datetime,
    notes: str | None,
) -> bool:
    """Write the reviewed label and mark the row labeled (an approved row whose label did not
    change stays approved); True when something changed."""
    changed = _set_label(session, item, label)
    status = QueueStatus.approved if item.status == QueueStatus.approved and not changed else None
    changed |= _set_status(
        item,
        status=status or QueueStatus.labeled,
        sync_error=None,
        human_label=label.label,
        reviewer_notes=notes,
        rejected_annotation=None,
    )
    if changed:
        item.labeled_at = annotated_at
    _image_status(session, item.image_id, ImageStatus.labeled)
    return changed


def sent_back_marker(annotation: Mapping[str, Any]) -> str:
    """How a queue row remembers the annotation sent back: its id and when it was last saved."""
    return f"{annotation.get('id')}@{_when(annotation.get('updated_at')).isoformat()}"


def answered_annotations(
    annotations: list[dict[str, Any]], marker: str | None
) -> list[dict[str, Any]]:
    """The annotations saved after the one sent back (all of them when none was)."""
    if not marker:
        return annotations
    sent_at = datetime.fromisoformat(marker.split("@", 1)[1])
    return [a for a in annotations if _when(a.get("updated_at")) > sent_at]


def _tally(report: SyncReport, changed: bool, bucket: list[int], task_id: int) -> None:
    if changed:
        bucket.append(task_id)
    else:
        report.unchanged += 1


def _rejected(
    session: Session,
    item: LabelingQueueItem,
    task: dict[str, Any],
    error: str,
    report: SyncReport,
    project: ReviewProject,
) -> None:
    """An annotation that cannot be used: the row waits for another, and the reviewer is told
    why in Label Studio (once, when the problem is new)."""
    task_id = item.label_studio_task_id
    assert task_id is not None
    if not _unlabel(session, item, QueueStatus.pending, error):
        report.unchanged += 1
        return
    report.rejected[task_id] = error
    try:
        task["data"] = send_back(project, task_id, task.get("data") or {}, f"Not usable: {error}")
    except ApiError as exc:  # the note is a courtesy; the row already says why
        log.warning("could not show task %s why its annotation was rejected: %s", task_id, exc)


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
    annotations = answered_annotations(task.get("annotations") or [], item.rejected_annotation)
    annotation = decisive_annotation(annotations)
    if annotation is None:
        # Sent back and not answered yet: pending, still saying why it was sent back.
        error = item.sync_error if item.rejected_annotation else None
        changed = _unlabel(session, item, QueueStatus.pending, error)
        _tally(report, changed, report.reopened, task_id)
        return
    if annotation.get("was_cancelled"):
        _tally(report, _unlabel(session, item, QueueStatus.skipped), report.skipped, task_id)
        return
    image = session.get(Image, item.image_id)
    assert image is not None
    result = annotation.get("result") or []
    try:
        content = read_annotation(result, settings.class_names, image.width or 0, image.height or 0)
        label = _reviewed_label(session, settings, item, annotation, content)
    except InvalidAnnotation as exc:
        error = f"annotation {annotation.get('id')}: {exc}"
        _rejected(session, item, task, error, report, project)
        return
    label.reviewer = _reviewer(annotation.get("completed_by"), users, project)
    changed = _store_label(session, item, label, _when(annotation.get("updated_at")), content.notes)
    _tally(report, changed, report.labeled, task_id)
    if changed:
        try:
            clear_note(project, task_id, task.get("data") or {})
        except ApiError as exc:
            log.warning("could not clear task %s's review note: %s", task_id, exc)


# --- whole project / some tasks --------------------------------------------------------------


def _fetch_tasks(
    project: ReviewProject, task_ids: Collection[int] | None
) -> dict[int, dict[str, Any]]:
    """Tasks with their annotations, by id; a deleted task is simply absent."""
    tasks: dict[int, dict[str, Any]] = {}
    if task_ids is None:
        for task in project.ls.tasks.list(project=project.id, fields="all", page_size=100):
            tasks[int(task.id)] = {"annotations": task.annotations or [], "data": task.data or {}}
        return tasks
    for task_id in task_ids:
        try:
            task = project.ls.tasks.get(id=task_id)
        except ApiError as exc:
            if exc.status_code == 404:
                continue
            raise
        if task.project == project.id:
            tasks[int(task.id)] = {"annotations": task.annotations or [], "data": task.data or {}}
    return tasks


def _queued_items(session: Session, task_ids: Collection[int] | None) -> list[LabelingQueueItem]:
    """Rows with a task: those of ``task_ids``, or (None) every one not cancelled."""
    query = select(LabelingQueueItem).where(
        col(LabelingQueueItem.label_studio_task_id).is_not(None),
    )
    if task_ids is None:
        query = query.where(LabelingQueueItem.status != QueueStatus.cancelled)
    else:
        # Held until the caller commits: a webhook's sync and an API action on the same task
        # take turns instead of racing to write one label (PostgreSQL; SQLite has one writer).
        query = query.where(
            col(LabelingQueueItem.label_studio_task_id).in_(list(task_ids))
        ).with_for_update()
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
