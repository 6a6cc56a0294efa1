"""The review queue as people look at it: filtered pages, and what the reviews say about the model.

Reviewer agreement is the share of reviewed pre-annotations the reviewer accepted unchanged
(``Verdict.accepted``). Per-class error rates come from the corrections themselves: the boxes
the model predicted for a reviewed image are matched one-to-one against the reviewed boxes
of the same class (``visionloop.boxes.match_count``: IoU at least ``MATCH_IOU``, best overlaps
first); an unmatched predicted box is a false positive, an unmatched reviewed box a miss.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Text, cast
from sqlmodel import Session, col, func, select

from visionloop.boxes import corners, match_count
from visionloop.models import LabelingQueueItem, Prediction, QueueStatus, ReviewedLabel, Verdict


@dataclass(frozen=True)
class QueueFilter:
    status: QueueStatus | None = None
    flagged_reason: str | None = None
    min_confidence: float | None = None
    max_confidence: float | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


def queue_page(
    session: Session, where: QueueFilter, *, limit: int, offset: int, newest_first: bool = True
) -> tuple[int, list[LabelingQueueItem]]:
    """One page of queue items matching ``where``, and how many match in all."""
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


def _class_name(box: Mapping[str, Any], class_names: Sequence[str]) -> str:
    name = box.get("name") or box.get("label")
    if name:
        return str(name)
    cls = int(box.get("cls", -1))
    return class_names[cls] if 0 <= cls < len(class_names) else f"cls {cls}"


def _matched_by_class(
    predicted: Sequence[Mapping[str, Any]],
    reviewed: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
) -> Iterator[tuple[str, int, int, int]]:
    """Per class on one image: (name, predicted boxes, reviewed boxes, matched pairs)."""
    names = {_class_name(b, class_names) for b in (*predicted, *reviewed)}
    for name in sorted(names):
        p = corners(b for b in predicted if _class_name(b, class_names) == name)
        r = corners(b for b in reviewed if _class_name(b, class_names) == name)
        yield name, len(p), len(r), match_count(p, r)


def class_errors(
    pairs: Iterable[tuple[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]]]],
    class_names: Sequence[str],
) -> list[ClassErrors]:
    """Per-class box errors over (predicted boxes, reviewed boxes) of each reviewed image."""
    table = {name: ClassErrors(name) for name in class_names}
    for predicted, reviewed in pairs:
        for name, n_predicted, n_reviewed, matched in _matched_by_class(
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
    for _, p, r, m in _matched_by_class(predicted, reviewed, class_names):
        n_predicted, n_reviewed, matched = n_predicted + p, n_reviewed + r, matched + m
    # Where the champion put a box of another class, the reviewer relabelled, not added.
    placed = match_count(corners(predicted), corners(reviewed)) if predicted and reviewed else 0
    return ImageErrors(n_predicted, n_reviewed, matched, n_reviewed - max(matched, placed))


def _queue_counts(
    session: Session,
) -> tuple[dict[str, int], dict[str, dict[str, int]], int, dict[str, int]]:
    """Items per status and per (reason, status), rejected syncs and verdicts: counted in the
    database (``ix_labeling_queue_reason_status``, the partial ``ix_labeling_queue_sync_error``
    and ``ix_reviewed_labels_verdict`` answer them from the indexes alone)."""
    by_status = {status.value: 0 for status in QueueStatus}
    by_reason: dict[str, dict[str, int]] = {}
    rows = session.exec(
        select(LabelingQueueItem.flagged_reason, LabelingQueueItem.status, func.count()).group_by(
            LabelingQueueItem.flagged_reason, LabelingQueueItem.status
        )
    )
    for reason, status, count in rows:
        status = QueueStatus(status).value
        by_status[status] = by_status.get(status, 0) + count
        by_reason.setdefault(reason, {})[status] = count
    sync_errors = session.exec(
        select(func.count())
        .select_from(LabelingQueueItem)
        .where(col(LabelingQueueItem.sync_error).is_not(None))
    ).one()
    verdicts = {verdict.value: 0 for verdict in Verdict}
    for verdict, count in session.exec(
        select(ReviewedLabel.verdict, func.count()).group_by(ReviewedLabel.verdict)
    ):
        verdicts[Verdict(verdict).value] = count
    return by_status, by_reason, int(sync_errors), verdicts


# --- per-class errors, remembered per (prediction, review) content --------------------------
#
# Matching boxes is the costly part of the statistics, and its answer for one reviewed image
# depends on nothing but the two box lists. So each distinct pair is matched once per process
# and remembered under a digest of its JSON text: a request matches only the pairs that are new
# or changed since the last one, and reads digests (computed by PostgreSQL itself) instead of
# box lists. Keyed by content, a cached answer cannot go stale: an edited review or prediction
# is a new digest.

_PairErrors = tuple[tuple[str, int, int, int], ...]
_MEMO_LIMIT = 500_000
"""Remembered pairs per class list before the memo starts over (a few hundred bytes each)."""
_FETCH_MISSING_BY_DIGEST = 500
"""Fewer unknown pairs than this are read by digest; more, and every pair is read in one go."""
_memo: dict[tuple[str, ...], dict[str, _PairErrors]] = {}


def _pair_text(boxes: Any) -> Any:
    return func.coalesce(cast(boxes, Text), "null")


def _digest_sql(predicted: Any, reviewed: Any) -> Any:
    # The length prefix keeps the split between the two texts unambiguous.
    return func.md5(
        cast(func.length(predicted), Text).concat(":").concat(predicted).concat(reviewed)
    )


def _digest(predicted: str, reviewed: str) -> str:
    """What ``_digest_sql`` computes, for databases without ``md5`` (SQLite)."""
    return hashlib.md5(f"{len(predicted)}:{predicted}{reviewed}".encode()).hexdigest()


def _compared_pairs() -> Any:
    """The (predicted, reviewed) box texts of each reviewed image whose judged prediction is
    known: the prediction of the model version recorded on the label."""
    predicted, reviewed = _pair_text(Prediction.boxes), _pair_text(ReviewedLabel.boxes)
    return (
        select(predicted.label("predicted"), reviewed.label("reviewed"))
        .select_from(ReviewedLabel)
        .join(
            Prediction,
            (col(Prediction.image_id) == col(ReviewedLabel.image_id))
            & (col(Prediction.model_version) == col(ReviewedLabel.prediction_model_version)),
        )
        .subquery()
    )


def _pair_errors(predicted: str, reviewed: str, class_names: Sequence[str]) -> _PairErrors:
    return tuple(
        _matched_by_class(json.loads(predicted) or [], json.loads(reviewed) or [], class_names)
    )


def _digest_counts(
    session: Session, memo: dict[str, _PairErrors], class_names: Sequence[str]
) -> dict[str, int]:
    """How many reviewed images have each pair digest; pairs not yet in ``memo`` are matched
    and remembered on the way."""
    pairs = _compared_pairs()
    if session.get_bind().dialect.name != "postgresql":
        counts: dict[str, int] = {}
        for predicted, reviewed in session.execute(select(pairs.c.predicted, pairs.c.reviewed)):
            key = _digest(predicted, reviewed)
            counts[key] = counts.get(key, 0) + 1
            if key not in memo:
                memo[key] = _pair_errors(predicted, reviewed, class_names)
        return counts
    digest = _digest_sql(pairs.c.predicted, pairs.c.reviewed).label("digest")
    counts = dict(session.execute(select(digest, func.count()).group_by(digest)).tuples().all())
    missing = [key for key in counts if key not in memo]
    if missing:
        query = select(digest, pairs.c.predicted, pairs.c.reviewed)
        if len(missing) < _FETCH_MISSING_BY_DIGEST:
            query = query.where(digest.in_(missing))
        for key, predicted, reviewed in session.execute(query):
            if key not in memo:
                memo[key] = _pair_errors(predicted, reviewed, class_names)
    return counts


def compared_class_errors(
    session: Session, class_names: Sequence[str]
) -> tuple[int, list[ClassErrors]]:
    """Reviewed images compared with their prediction, and the per-class errors over them (as
    ``class_errors`` over every such pair)."""
    # Starting over replaces the memo instead of emptying it: requests run in threads, and one
    # still reading the old memo keeps every pair it counted on.
    memo = _memo.setdefault(tuple(class_names), {})
    if len(memo) > _MEMO_LIMIT:
        memo = _memo[tuple(class_names)] = {}
    counts = _digest_counts(session, memo, class_names)
    table = {name: ClassErrors(name) for name in class_names}
    for key, n in counts.items():
        for name, n_predicted, n_reviewed, matched in memo[key]:
            row = table.setdefault(name, ClassErrors(name))
            row.predicted += n_predicted * n
            row.reviewed += n_reviewed * n
            row.matched += matched * n
    # The project's classes in their order, then any other name a box carried by name: the
    # order of those used to be whatever order the database returned the rows in.
    known = set(class_names)
    extra = sorted(name for name in table if name not in known)
    return sum(counts.values()), [table[name] for name in (*class_names, *extra)]


def queue_stats(session: Session, class_names: Sequence[str]) -> QueueStats:
    by_status, by_reason, sync_errors, verdicts = _queue_counts(session)
    reviewed = sum(verdicts.values())
    compared, classes = compared_class_errors(session, class_names)
    return QueueStats(
        total=sum(by_status.values()),
        by_status=by_status,
        by_reason=by_reason,
        sync_errors=sync_errors,
        verdicts=verdicts,
        agreement=round(verdicts[Verdict.accepted.value] / reviewed, 4) if reviewed else None,
        compared_images=compared,
        classes=classes,
    )
