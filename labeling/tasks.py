"""The review queue: selected images become Label Studio tasks pre-annotated by the champion.

An image is queued at most once (``labeling_queue.image_id`` is unique) and gets one Label
Studio task. Queueing is two steps: first the queue rows (``pending``, no task yet), then one
task per row. Who imports a row's task is decided in the database, never by looking at Label
Studio: the caller whose insert created the row, or, once a row has waited ``ORPHAN_AFTER_S``
without a task (its importer died), the one run that claims it. A claimed orphan's task may
have landed before the crash, so tasks carry the image id and the claimant links such a task
instead of importing a second one.

Each task carries the champion's boxes as a prediction (with scores and the model version),
so a reviewer corrects rather than draws, and a readable ``why`` (the strategy and its score
parts, shown above the image). Images drawn at random, the ledger's control arm and the
audit alike, say only ``sample``: a reviewer who knew an image was a control could review it
differently, and the comparison would measure that instead of the selection.

The functions work in the caller's session but commit it themselves at the two boundaries
above: the rows before Label Studio is contacted, and each chunk's task links right after
Label Studio created the chunk. A crash in between then loses nothing, and the next run finds
what was done.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, col, select

from labeling.selection import Selected
from labeling.wiring import (
    ReviewProject,
    ensure_image_storage,
    ensure_webhook,
    image_uri,
    review_project,
)
from visionloop.boxes import ls_rectangle
from visionloop.models import Image, ImageStatus, LabelingQueueItem, Prediction, utcnow
from visionloop.settings import Settings
from visionloop.stats_counters import count_queue_inserts

log = logging.getLogger(__name__)

IMPORT_CHUNK = 100
"""Tasks per import request."""
IMAGE_ID_KEY = "visionloop_image_id"
"""Task data key holding the platform's image id (finds the task of an image again)."""
ORPHAN_AFTER_S = 300.0
"""A queue row still without a task this long after it was added has lost its importer (a
crash, or Label Studio was down): the next run claims it and finds or creates its task."""
WHY_KEY = "why"
"""Task data key of why the image was chosen, as the review screen shows it."""
SAMPLE = "sample"
"""What a reviewer is told of an image drawn at random (control and audit arms alike)."""
RANDOM_ARMS = frozenset({"control", "audit"})


@dataclass
class QueueReport:
    added: list[int] = field(default_factory=list)
    """Image ids queued by this call."""
    already_queued: list[int] = field(default_factory=list)
    task_ids: dict[int, int] = field(default_factory=dict)
    """Image id -> Label Studio task id, for the rows linked by this call."""


def prediction_regions(
    boxes: Sequence[dict[str, Any]], width: int, height: int, class_names: Sequence[str]
) -> list[dict[str, Any]]:
    """The champion's boxes (normalised ``x1..y2``) as Label Studio rectangle regions (percent)."""
    regions = []
    for index, box in enumerate(boxes):
        if box["name"] not in class_names:
            # The champion knows a class the project does not: Label Studio would reject the
            # whole task, so the box is left out (and the mismatch shows in the logs).
            log.warning(
                "box class %r is not a project label %s; left out", box["name"], class_names
            )
            continue
        top_left_size = (box["x1"], box["y1"], box["x2"] - box["x1"], box["y2"] - box["y1"])
        regions.append(
            ls_rectangle(
                box["name"], top_left_size, width, height, region_id=f"p{index}", score=box["conf"]
            )
        )
    return regions


def why(arm: str, reason: str, parts: Mapping[str, float] | None) -> str:
    """Why an image is in the queue, for its reviewer: ``"hybrid: uncertainty 0.62, novelty
    0.31"``; ``"sample"`` for a random draw."""
    if arm in RANDOM_ARMS:
        return SAMPLE
    shown = ", ".join(f"{name.replace('_', ' ')} {v:.2f}" for name, v in (parts or {}).items())
    return f"{reason}: {shown}" if shown else reason


def build_task(
    settings: Settings, image: Image, item: LabelingQueueItem, prediction: Prediction | None
) -> dict[str, Any]:
    random_draw = item.arm in RANDOM_ARMS
    task: dict[str, Any] = {
        "data": {
            "image": image_uri(settings, image.object_key),
            IMAGE_ID_KEY: image.id,
            "content_hash": image.content_hash,
            # Label Studio lists every data field: a random draw names no arm there either.
            "flagged_reason": SAMPLE if random_draw else item.flagged_reason,
            WHY_KEY: why(item.arm, item.flagged_reason, item.score_parts),
            "confidence_score": item.confidence_score,
            "source": image.source_key,
        }
    }
    if prediction is not None:
        task["predictions"] = [
            {
                "model_version": prediction.model_version,
                # Label Studio sorts tasks by this score: the deciding box's confidence.
                "score": item.confidence_score if item.confidence_score is not None else 0.0,
                "result": prediction_regions(
                    prediction.boxes, image.width or 0, image.height or 0, settings.class_names
                ),
            }
        ]
    return task


def _latest_predictions(session: Session, image_ids: Sequence[int]) -> dict[int, Prediction]:
    rows = session.exec(
        select(Prediction)
        .where(col(Prediction.image_id).in_(image_ids))
        .order_by(col(Prediction.id))
    )
    return {row.image_id: row for row in rows}  # later rows win


def _insert_rows(session: Session, rows: Sequence[LabelingQueueItem]) -> set[int]:
    """Insert the rows whose image has none yet; the image ids this call inserted.

    The unique ``image_id`` is the claim: a concurrent caller queueing the same image loses the
    insert, so exactly one caller owns each row and imports its task.
    """
    insert = postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    statement = (
        insert(LabelingQueueItem)
        .values([row.model_dump(exclude={"id"}) for row in rows])
        .on_conflict_do_nothing(index_elements=["image_id"])
        .returning(
            col(LabelingQueueItem.image_id),
            col(LabelingQueueItem.flagged_reason),
            col(LabelingQueueItem.status),
            col(LabelingQueueItem.sync_error),
        )
    )
    inserted = session.connection().execute(statement).all()
    # A Core insert passes the unit of work by: the queue counters hear of it here.
    count_queue_inserts(session, [(row[1], row[2], row[3]) for row in inserted])
    return {row[0] for row in inserted}


def _add_rows(
    session: Session,
    settings: Settings,
    selected: Sequence[Selected],
    report: QueueReport,
    cycle: str | None,
) -> None:
    ids = [s.image_id for s in selected]
    queued = set(
        session.exec(
            select(LabelingQueueItem.image_id).where(col(LabelingQueueItem.image_id).in_(ids))
        )
    )
    fresh = {s.image_id: s for s in selected if s.image_id not in queued}
    images = {i.id: i for i in session.exec(select(Image).where(col(Image.id).in_(list(fresh))))}
    predictions = _latest_predictions(session, list(fresh))
    rows = [
        LabelingQueueItem(
            image_id=image_id,
            prediction_id=predictions[image_id].id if image_id in predictions else None,
            image_path=image_uri(settings, images[image_id].object_key),
            confidence_score=choice.confidence,
            flagged_reason=choice.reason,
            arm=choice.arm,
            cycle=cycle,
            score_parts={str(name): float(value) for name, value in choice.parts.items()},
        )
        for image_id, choice in fresh.items()
    ]
    inserted = _insert_rows(session, rows) if rows else set()
    for choice in selected:
        if choice.image_id in inserted and choice.image_id not in report.added:
            images[choice.image_id].status = ImageStatus.queued
            session.add(images[choice.image_id])
            report.added.append(choice.image_id)
        elif choice.image_id not in report.added:
            report.already_queued.append(choice.image_id)


def _tasks_by_image(project: ReviewProject, wanted: set[int]) -> dict[int, int]:
    """Existing tasks of the project for the images in ``wanted`` (image id -> oldest task id)."""
    found: dict[int, int] = {}
    for task in project.ls.tasks.list(project=project.id, fields="task_only", page_size=500):
        image_id = (task.data or {}).get(IMAGE_ID_KEY)
        if image_id in wanted:
            found[int(image_id)] = min(int(task.id), found.get(int(image_id), int(task.id)))
    return found


def _claim_orphans(session: Session) -> list[int]:
    """Claim the rows whose importer is gone: unlinked for ``ORPHAN_AFTER_S`` (row ids).

    Each claim is a compare-and-set on ``created_at`` that restarts the row's wait, so of
    several runs looking at once only one wins a row, and it has the same time to finish.
    """
    cutoff = utcnow() - timedelta(seconds=ORPHAN_AFTER_S)
    stale = session.exec(
        select(LabelingQueueItem.id, LabelingQueueItem.created_at).where(
            col(LabelingQueueItem.label_studio_task_id).is_(None),
            col(LabelingQueueItem.created_at) < cutoff,
        )
    ).all()
    claimed = []
    for row_id, created_at in stale:
        result = session.connection().execute(
            update(LabelingQueueItem)
            .where(
                col(LabelingQueueItem.id) == row_id,
                col(LabelingQueueItem.created_at) == created_at,
                col(LabelingQueueItem.label_studio_task_id).is_(None),
            )
            .values(created_at=utcnow())
        )
        if result.rowcount == 1:
            claimed.append(row_id)
    session.commit()
    return claimed


def _unlinked_tasks(
    session: Session, settings: Settings, row_ids: Sequence[int] | None = None
) -> list[tuple[LabelingQueueItem, dict[str, Any]]]:
    """The queue rows without a task (those of ``row_ids``), oldest first, with their tasks."""
    query = select(LabelingQueueItem).where(col(LabelingQueueItem.label_studio_task_id).is_(None))
    if row_ids is not None:
        query = query.where(col(LabelingQueueItem.id).in_(row_ids))
    items = list(session.exec(query.order_by(col(LabelingQueueItem.id))))
    ids = [item.image_id for item in items]
    images = {i.id: i for i in session.exec(select(Image).where(col(Image.id).in_(ids)))}
    prediction_ids = [i.prediction_id for i in items if i.prediction_id is not None]
    predictions = {
        p.id: p
        for p in session.exec(select(Prediction).where(col(Prediction.id).in_(prediction_ids)))
    }
    return [
        (
            item,
            build_task(settings, images[item.image_id], item, predictions.get(item.prediction_id)),
        )
        for item in items
    ]


def _own_rows(session: Session, image_ids: Sequence[int]) -> list[int]:
    return list(
        session.exec(
            select(LabelingQueueItem.id).where(col(LabelingQueueItem.image_id).in_(image_ids))
        )
    )


def _import_chunk(
    project: ReviewProject, chunk: Sequence[tuple[LabelingQueueItem, dict[str, Any]]]
) -> dict[int, int]:
    """Create the chunk's tasks in Label Studio (image id -> new task id)."""
    response = project.ls.projects.import_tasks(
        id=project.id, request=[task for _, task in chunk], return_task_ids=True
    )
    task_ids = list(response.task_ids or [])
    if len(task_ids) != len(chunk):
        raise RuntimeError(
            f"Label Studio created {len(task_ids)} tasks for {len(chunk)} queued images"
        )
    # Label Studio creates a bulk import in order and returns the ids in that order.
    return {item.image_id: task_id for (item, _), task_id in zip(chunk, task_ids)}


def link_tasks(
    session: Session,
    settings: Settings,
    report: QueueReport,
    project: ReviewProject | None = None,
    *,
    wired: bool = False,
) -> None:
    """Create the Label Studio task of every queue row this call owns.

    It owns the rows it inserted (``report.added``) and the orphans it claims
    (``_claim_orphans``); a row another caller is still importing is left to it. An orphan's
    task may exist already (its importer died after Label Studio created it): it is found by
    the image id it carries and linked instead of imported again.

    Label Studio is only contacted when there is such a row; its image storage and webhook
    are ensured first (unless ``wired``: the caller's ``project`` comes from
    ``wired_project``), so every task it gets can be displayed and reports back. ``session``
    is committed after each batch of links (module docstring).
    """
    own = _own_rows(session, report.added) if report.added else []
    orphans = _claim_orphans(session)
    pending = _unlinked_tasks(session, settings, [*own, *orphans])
    if not pending:
        return
    project = project or review_project(settings)
    if not wired:
        ensure_image_storage(settings, project)
        ensure_webhook(settings, project)

    claimed = set(orphans)
    found = [item for item, _ in pending if item.id in claimed]
    linked = _tasks_by_image(project, {item.image_id for item in found}) if found else {}
    _store_links(session, [item for item in found if item.image_id in linked], linked)

    to_import = [(item, task) for item, task in pending if item.image_id not in linked]
    for start in range(0, len(to_import), IMPORT_CHUNK):
        chunk = to_import[start : start + IMPORT_CHUNK]
        linked.update(_import_chunk(project, chunk))
        _store_links(session, [item for item, _ in chunk], linked)
    report.task_ids.update(linked)


def _store_links(
    session: Session, items: Sequence[LabelingQueueItem], linked: dict[int, int]
) -> None:
    """Record the items' task ids and commit: a task Label Studio made is never forgotten."""
    for item in items:
        # Read again: another run may have linked or removed the row meanwhile.
        row = session.get(LabelingQueueItem, item.id, populate_existing=True)
        if row is not None and row.label_studio_task_id is None:
            row.label_studio_task_id = linked[item.image_id]
            session.add(row)
    session.commit()


def queue_for_review(
    session: Session,
    settings: Settings,
    selected: Sequence[Selected],
    project: ReviewProject | None = None,
    *,
    cycle: str | None = None,
    wired: bool = False,
) -> QueueReport:
    """Queue ``selected`` images (those not queued before) as pre-annotated review tasks, each
    row keeping its arm, score parts and the selection ``cycle`` (None: chosen one at a time,
    outside a cycle).

    Commits ``session`` once the rows are added, then while linking (``link_tasks``).
    """
    report = QueueReport()
    if selected:
        _add_rows(session, settings, selected, report, cycle)
        session.commit()  # the rows stand before Label Studio is contacted
    link_tasks(session, settings, report, project, wired=wired)
    return report
