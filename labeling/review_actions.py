"""What a person does to one queued image through the API: label it, approve a label, send
one back.

Label Studio stays the source of truth: a label submitted here is an annotation created in
Label Studio and then synced like any other (``labeling.sync``), and a label sent back is
said there, on the task (``labeling.task_notes``). Approval is the platform's own step: a
second reviewer confirms a synced label, which is what ``train_approved_only`` trains on.

Each action holds the queue row while it works, so parallel callers take turns: by
``SELECT ... FOR UPDATE`` across processes on PostgreSQL, and by a lock per row within the
process (SQLite has no row locks; one API process serves a SQLite platform). The same label
submitted twice is one annotation, and approving or sending back twice changes nothing the
second time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from label_studio_sdk.core.api_error import ApiError
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Session, select

from labeling.label_config import NOTES_NAME, VERDICT_NAME
from labeling.provision import LabelStudioError, unreachable
from labeling.sync import (
    AnnotationContent,
    InvalidAnnotation,
    answered_annotations,
    decisive_annotation,
    read_annotation,
    sent_back_marker,
    sync_labels,
)
from labeling.task_notes import send_back
from labeling.verdicts import PREDICTION_REGION, box_feedback
from labeling.wiring import ReviewProject, review_project
from visionloop.boxes import ls_rectangle
from visionloop.events import EventKind, emit
from visionloop.models import (
    BoxVerdict,
    Image,
    LabelingQueueItem,
    Prediction,
    QueueStatus,
    ReviewedLabel,
    utcnow,
)
from visionloop.settings import Settings

SYNC_ATTEMPTS = 3
"""Label Studio's webhook syncs the same task in the background: a sync that loses the race
for the label row is run again (it then finds the label written)."""


_row_locks: dict[int, threading.Lock] = {}
_row_locks_guard = threading.Lock()


@contextmanager
def _row_lock(item_id: int) -> Iterator[None]:
    with _row_locks_guard:
        lock = _row_locks.setdefault(item_id, threading.Lock())
    with lock:
        yield


class QueueItemNotFound(LookupError):
    def __init__(self, item_id: int) -> None:
        super().__init__(f"queue item {item_id} does not exist")


class ReviewConflict(RuntimeError):
    """The item's state does not allow the action now (→ 409)."""


@dataclass(frozen=True)
class LabelBox:
    """One box of a submitted label: class name, YOLO centre and size (0..1 of the image),
    the champion's box it is (its index in the prediction) and the reviewer's verdict."""

    name: str
    cx: float
    cy: float
    w: float
    h: float
    prediction: int | None = None
    verdict: BoxVerdict | None = None


@dataclass(frozen=True)
class Reviewed:
    """An item after an action, its reviewed label (None: none), and whether anything
    changed (False: the same action had already been done)."""

    item: LabelingQueueItem
    label: ReviewedLabel | None
    changed: bool


def _held(session: Session, item_id: int) -> LabelingQueueItem:
    item = session.exec(
        select(LabelingQueueItem).where(LabelingQueueItem.id == item_id).with_for_update()
    ).first()
    if item is None:
        raise QueueItemNotFound(item_id)
    return item


def _label_of(session: Session, item: LabelingQueueItem) -> ReviewedLabel | None:
    return session.exec(
        select(ReviewedLabel).where(ReviewedLabel.image_id == item.image_id)
    ).first()


def _task_id(item: LabelingQueueItem) -> int:
    if item.label_studio_task_id is None:
        raise ReviewConflict(
            f"queue item {item.id} is not in Label Studio yet; try again once it is queued there"
        )
    return item.label_studio_task_id


def _result(
    boxes: Sequence[LabelBox], notes: str | None, size: tuple[int, int], prediction_boxes: int
) -> list[dict[str, Any]]:
    """The boxes, verdicts and note as an annotation result of the review config."""
    problems = [
        f"box {k}: prediction {b.prediction} does not exist (the champion predicted "
        f"{prediction_boxes} boxes)"
        for k, b in enumerate(boxes, start=1)
        if b.prediction is not None and not 0 <= b.prediction < prediction_boxes
    ]
    if problems:
        raise InvalidAnnotation(problems)
    result: list[dict[str, Any]] = []
    for k, box in enumerate(boxes):
        region_id = (
            PREDICTION_REGION.format(index=box.prediction)
            if box.prediction is not None
            else f"r{k}"
        )
        top_left = (box.cx - box.w / 2, box.cy - box.h / 2, box.w, box.h)
        region = ls_rectangle(box.name, top_left, *size)
        result.append({"id": region_id, **region})
        if box.verdict is not None:
            result.append(
                {
                    "id": region_id,
                    "from_name": VERDICT_NAME,
                    "to_name": region["to_name"],
                    "type": "choices",
                    "value": {**region["value"], "choices": [box.verdict.value]},
                }
            )
    if notes:
        result.append(
            {
                "id": "notes",
                "from_name": NOTES_NAME,
                "to_name": result[0]["to_name"] if result else "image",
                "type": "textarea",
                "value": {"text": [notes]},
            }
        )
    return result


def _content(
    result: Sequence[dict[str, Any]], settings: Settings, size: tuple[int, int]
) -> AnnotationContent | None:
    try:
        return read_annotation(result, settings.class_names, *size)
    except InvalidAnnotation:
        return None


def _sync_and_commit(
    session: Session, settings: Settings, task_id: int, project: ReviewProject
) -> None:
    for attempt in range(1, SYNC_ATTEMPTS + 1):
        try:
            sync_labels(session, settings, [task_id], project)
            session.commit()
            return
        except (IntegrityError, OperationalError):
            session.rollback()
            if attempt == SYNC_ATTEMPTS:
                raise


def submit_label(
    session: Session,
    settings: Settings,
    item_id: int,
    boxes: Sequence[LabelBox],
    notes: str | None = None,
    project: ReviewProject | None = None,
) -> Reviewed:
    """Label a queued image: one annotation in Label Studio, synced into its reviewed label.

    ``InvalidAnnotation`` (nothing sent) lists every problem with the boxes and verdicts; the
    same label as the task's current annotation creates nothing new.
    """
    with _row_lock(item_id):
        item = _held(session, item_id)
        task_id = _task_id(item)
        image = session.get(Image, item.image_id)
        assert image is not None
        size = (image.width or 0, image.height or 0)
        prediction = session.get(Prediction, item.prediction_id) if item.prediction_id else None
        result = _result(boxes, notes, size, len(prediction.boxes) if prediction else 0)
        content = read_annotation(result, settings.class_names, *size)
        shown = [
            (i, b)
            for i, b in enumerate(prediction.boxes if prediction else [])
            if b["name"] in settings.class_names
        ]
        problems = box_feedback(shown, content.regions).problems
        if problems:
            raise InvalidAnnotation(problems)
        project = project or review_project(settings)
        try:
            task = project.ls.tasks.get(id=task_id)
            current = decisive_annotation(
                answered_annotations(task.annotations or [], item.rejected_annotation)
            )
            same = (
                current is not None
                and not current.get("was_cancelled")
                and _content(current.get("result") or [], settings, size) == content
            )
            if not same:
                project.ls.annotations.create(id=task_id, result=result)
        except ApiError as exc:
            raise LabelStudioError(f"Label Studio refused the annotation: {exc.body}") from exc
        except httpx.TransportError as exc:
            raise unreachable(settings.label_studio, exc) from exc
        _sync_and_commit(session, settings, task_id, project)
        session.refresh(item)
        return Reviewed(item, _label_of(session, item), not same)


def approve_label(session: Session, item_id: int, approver: str) -> Reviewed:
    """A second reviewer confirms the item's reviewed label.

    ``ReviewConflict`` when there is no label to approve, when the approver made the label,
    or when someone else approved it already.
    """
    with _row_lock(item_id):
        item = _held(session, item_id)
        label = _label_of(session, item)
        if item.status == QueueStatus.approved and label is not None:
            if (label.approved_by or "").casefold() == approver.casefold():
                return Reviewed(item, label, False)
            raise ReviewConflict(
                f"queue item {item_id} was approved by {label.approved_by} already"
            )
        if item.status != QueueStatus.labeled or label is None:
            raise ReviewConflict(
                f"queue item {item_id} is {QueueStatus(item.status).value}: "
                "only a labelled item can be approved"
            )
        if label.reviewer and label.reviewer.casefold() == approver.casefold():
            raise ReviewConflict(
                f"{approver} labelled queue item {item_id}: a second reviewer approves it"
            )
        item.status = QueueStatus.approved
        label.approved_by, label.approved_at = approver, utcnow()
        session.commit()
        emit(
            EventKind.LABEL_APPROVED,
            f"{approver} approved the label of queue item {item_id}",
            {"item_id": item_id, "image_id": item.image_id, "approver": approver},
        )
        return Reviewed(item, label, True)


def reject_label(
    session: Session,
    settings: Settings,
    item_id: int,
    reviewer: str,
    reason: str,
    project: ReviewProject | None = None,
) -> Reviewed:
    """Send the item's label back: its annotation goes back to the reviewer in Label Studio
    with the reason, and the item waits, pending, for an updated or new one."""
    with _row_lock(item_id):
        item = _held(session, item_id)
        task_id = _task_id(item)
        note = f"Sent back by {reviewer}: {reason}"
        if item.rejected_annotation and item.sync_error == note:
            return Reviewed(item, None, False)
        if item.status not in (QueueStatus.labeled, QueueStatus.approved):
            raise ReviewConflict(
                f"queue item {item_id} is {QueueStatus(item.status).value}: "
                "only a labelled item can be sent back"
            )
        project = project or review_project(settings)
        try:
            task = project.ls.tasks.get(id=task_id)
            annotation = decisive_annotation(
                answered_annotations(task.annotations or [], item.rejected_annotation)
            )
            if annotation is None or annotation.get("was_cancelled"):
                raise ReviewConflict(
                    f"Label Studio has no submitted annotation for queue item {item_id} any more"
                )
            send_back(project, task_id, task.data or {}, note)
        except ApiError as exc:
            raise LabelStudioError(f"Label Studio refused the change: {exc.body}") from exc
        except httpx.TransportError as exc:
            raise unreachable(settings.label_studio, exc) from exc
        item.rejected_annotation = sent_back_marker(annotation)
        item.sync_error = note
        # Committed before the sync: a sync that fails later still finds the annotation sent back.
        session.commit()
        _sync_and_commit(session, settings, task_id, project)
        emit(
            EventKind.LABEL_SENT_BACK,
            f"{reviewer} sent queue item {item_id} back: {reason}",
            {"item_id": item_id, "task_id": task_id, "reviewer": reviewer, "reason": reason},
            level="warning",
        )
        session.refresh(item)
        return Reviewed(item, None, True)
