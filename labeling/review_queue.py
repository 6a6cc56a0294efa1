"""The review queue as people look at it: filtered pages, and what the reviews say about the model.

Reviewer agreement is the share of reviewed pre-annotations the reviewer accepted unchanged
(``Verdict.accepted``). Per-class error rates come from the corrections themselves: the boxes
the model predicted for a reviewed image are matched one-to-one against the reviewed boxes
of the same class (``visionloop.boxes.match_count``: IoU at least ``MATCH_IOU``, best overlaps
first); an unmatched predicted box is a false positive, an unmatched reviewed box a miss.

The statistics and the queue's totals are read from running totals kept as rows are written
(``visionloop.stats_counters``), never by counting or matching the history: their cost is the
same at any history size.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, func, select

from visionloop.boxes import corners, match_count, matched_by_class
from visionloop.models import LabelingQueueItem, QueueStatus, StatsCounter, Verdict
from visionloop.stats_counters import COMPARED, SYNC_ERRORS, Counts, read_counters, use_class_map


@dataclass(frozen=True)
class QueueFilter:
    status: QueueStatus | None = None
    flagged_reason: str | None = None
    min_confidence: float | None = None
    max_confidence: float | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


def _counted_total(session: Session, where: QueueFilter) -> int | None:
    """How many items match ``where`` by the running totals, when it filters on status and
    flagged reason only (None otherwise: confidence and time filters are counted by rows)."""
    if (
        where.min_confidence is not None
        or where.max_confidence is not None
        or where.created_after is not None
        or where.created_before is not None
    ):
        return None
    query = select(func.coalesce(func.sum(StatsCounter.n), 0)).where(StatsCounter.kind == "queue")
    if where.status is not None:
        query = query.where(StatsCounter.part == QueueStatus(where.status).value)
    if where.flagged_reason:
        query = query.where(StatsCounter.key == where.flagged_reason)
    return int(session.exec(query).one())


def queue_page(
    session: Session, where: QueueFilter, *, limit: int, offset: int, newest_first: bool = True
) -> tuple[int, list[LabelingQueueItem]]:
    """One page of queue items matching ``where``, and how many match in all.

    The total comes from the running totals when ``where`` filters on status and flagged
    reason only (the dashboard's views); a confidence or time filter is counted over the rows
    (``count(*)``, as cheap as its indexes make it)."""
    query = select(LabelingQueueItem)
    if where.status is not None:
        query = query.where(LabelingQueueItem.status == where.status)
    if where.flagged_reason:
        query = query.where(LabelingQueueItem.flagged_reason == where.flagged_reason)
    if where.min_confidence is not None:
        query = query.where(col(LabelingQueueItem.confidence_score) >= where.min_confidence)
    if where.max_confidence is not None:
        query = query.where(col(LabelingQueueItem.confidence_score) <= where.max_confidence)
    if where.created_after is not None:
        query = query.where(col(LabelingQueueItem.created_at) >= where.created_after)
    if where.created_before is not None:
        query = query.where(col(LabelingQueueItem.created_at) < where.created_before)
    total = _counted_total(session, where)
    if total is None:
        total = session.exec(select(func.count()).select_from(query.subquery())).one()
    order = col(LabelingQueueItem.id).desc() if newest_first else col(LabelingQueueItem.id)
    return int(total), list(session.exec(query.order_by(order).offset(offset).limit(limit)))


@dataclass
class ClassErrors:
    name: str
    predicted: int = 0
    reviewed: int = 0
    matched: int = 0

    @property
    def false_positives(self) -> int:
        return self.predicted - self.matched

    @property
    def missed(self) -> int:
        return self.reviewed - self.matched

    @property
    def error_rate(self) -> float | None:
        """Wrong boxes (false positives and misses) per box involved; None without any box."""
        involved = self.matched + self.false_positives + self.missed
        return round((self.false_positives + self.missed) / involved, 4) if involved else None


@dataclass(frozen=True)
class QueueStats:
    total: int
    by_status: dict[str, int]
    by_reason: dict[str, dict[str, int]]  # flagged reason -> status -> count
    sync_errors: int  # items whose last annotation was rejected
    verdicts: dict[str, int]
    agreement: float | None  # accepted / reviewed
    compared_images: int  # reviewed images whose prediction is known (the class rates' basis)
    classes: list[ClassErrors] = field(default_factory=list)


def class_errors(
    pairs: Iterable[tuple[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]]]],
    class_names: Sequence[str],
) -> list[ClassErrors]:
    """Per-class box errors over (predicted boxes, reviewed boxes) of each reviewed image."""
    table = {name: ClassErrors(name) for name in class_names}
    for predicted, reviewed in pairs:
        for name, n_predicted, n_reviewed, matched in matched_by_class(
            predicted, reviewed, class_names
        ):
            row = table.setdefault(name, ClassErrors(name))
            row.predicted += n_predicted
            row.reviewed += n_reviewed
            row.matched += matched
    return list(table.values())


@dataclass(frozen=True)
class ImageErrors:
    """What a reviewer's answer says about the champion's boxes on one image.

    ``corrected``: shown boxes the reviewer did not keep as they were (deleted, moved off, or
    given another class); ``missed``: reviewed boxes where the champion showed no box of any
    class (added by the reviewer). A box whose class was changed is corrected, not also missed,
    so every fix the reviewer made counts once.
    """

    predicted: int
    reviewed: int
    matched: int  # same-class pairs, as in ``class_errors``
    missed: int

    @property
    def corrected(self) -> int:
        return self.predicted - self.matched

    @property
    def errors(self) -> int:
        return self.corrected + self.missed


def image_errors(
    predicted: Sequence[Mapping[str, Any]],
    reviewed: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
) -> ImageErrors:
    """The champion's errors on one reviewed image, by the same matching as ``class_errors``."""
    n_predicted = n_reviewed = matched = 0
    for _, p, r, m in matched_by_class(predicted, reviewed, class_names):
        n_predicted, n_reviewed, matched = n_predicted + p, n_reviewed + r, matched + m
    # Where the champion put a box of another class, the reviewer relabelled, not added.
    placed = match_count(corners(predicted), corners(reviewed)) if predicted and reviewed else 0
    return ImageErrors(n_predicted, n_reviewed, matched, n_reviewed - max(matched, placed))


def _queue_counts(counters: Counts) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Items per status and per (flagged reason, status)."""
    by_status = {status.value: 0 for status in QueueStatus}
    by_reason: dict[str, dict[str, int]] = {}
    for (kind, reason, status), n in sorted(counters.items()):
        if kind == "queue" and n:
            by_status[status] = by_status.get(status, 0) + n
            by_reason.setdefault(reason, {})[status] = n
    return by_status, by_reason


def _class_rows(counters: Counts, class_names: Sequence[str]) -> list[ClassErrors]:
    """The project's classes in their order, then any other class a compared box carried by
    name, by name."""
    table = {name: ClassErrors(name) for name in class_names}
    for (kind, name, _), n in counters.items():
        if kind in ("predicted", "reviewed", "matched") and n:
            row = table.setdefault(name, ClassErrors(name))
            setattr(row, kind, n)
    known = set(class_names)
    extra = sorted(name for name in table if name not in known)
    return [table[name] for name in (*class_names, *extra)]


def queue_stats(session: Session, class_names: Sequence[str]) -> QueueStats:
    """The queue and its reviews in numbers, read from the running totals (a few dozen rows).

    The box counts are kept under one class list (a box named only by ``cls`` takes its class
    from it): asking for another one counts them again under it once, and commits."""
    use_class_map(session, class_names)
    counters = read_counters(session.connection())
    by_status, by_reason = _queue_counts(counters)
    verdicts = {verdict.value: 0 for verdict in Verdict}
    for (kind, verdict, _), n in counters.items():
        if kind == "verdict" and n:
            verdicts[verdict] = n
    reviewed = sum(verdicts.values())
    return QueueStats(
        total=sum(by_status.values()),
        by_status=by_status,
        by_reason=by_reason,
        sync_errors=counters.get(SYNC_ERRORS, 0),
        verdicts=verdicts,
        agreement=round(verdicts[Verdict.accepted.value] / reviewed, 4) if reviewed else None,
        compared_images=counters.get(COMPARED, 0),
        classes=_class_rows(counters, class_names),
    )
