"""Reviewer feedback as data: filtered exports (CSV, JSON) and day-by-day trends.

Each reviewed label is one reviewer's verdict on the champion's pre-annotation of one image
(accepted unchanged, corrected, rejected), and on each of its boxes (correct, incorrect,
adjusted, missed: ``labeling.verdicts``). Exports stream in pages by id, so their memory
stays flat however long the history; the trend is one grouped query over the window asked for.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from labeling.verdicts import verdict_counts
from visionloop.models import ReviewedLabel, Verdict

PAGE = 1000
"""Rows read per query while exporting."""
EXPORT_FIELDS = (
    "id",
    "image_id",
    "image_path",
    "verdict",
    "reviewer",
    "label",
    "classes",
    "boxes",
    "box_feedback",
    "confidence",
    "model_version",
    "label_studio_task_id",
    "label_studio_annotation_id",
    "used_for_training",
    "approved_by",
    "approved_at",
    "created_at",
)
"""Columns of an export, in order; in CSV ``classes`` is joined with ``|``, ``boxes`` is the
count and ``box_feedback`` the count per box verdict (``correct=2|incorrect=1|...``); the JSON
export carries the boxes and each box's verdict themselves."""


@dataclass(frozen=True)
class FeedbackFilter:
    since: datetime | None = None
    until: datetime | None = None
    verdict: Verdict | None = None
    reviewer: str | None = None
    class_name: str | None = None
    """Labels with at least one reviewed box of this class (or this dominant class)."""


def _classes(label: ReviewedLabel) -> list[str]:
    names = {str(b.get("name")) for b in label.boxes if b.get("name") is not None}
    return sorted(names | ({label.label} if label.label else set()))


def _record(label: ReviewedLabel) -> dict[str, Any]:
    return {
        "id": label.id,
        "image_id": label.image_id,
        "image_path": label.image_path,
        "verdict": Verdict(label.verdict).value,
        "reviewer": label.reviewer,
        "label": label.label,
        "classes": _classes(label),
        "boxes": label.boxes,
        "confidence": label.confidence,
        "model_version": label.prediction_model_version,
        "label_studio_task_id": label.label_studio_task_id,
        "label_studio_annotation_id": label.label_studio_annotation_id,
        "box_feedback": label.box_feedback or [],
        "used_for_training": label.used_for_training,
        "approved_by": label.approved_by,
        "approved_at": _utc(label.approved_at).isoformat() if label.approved_at else None,
        "created_at": _utc(label.created_at).isoformat(),
    }


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def feedback_records(engine: Engine, where: FeedbackFilter) -> Iterator[dict[str, Any]]:
    """Every reviewed label matching ``where``, oldest first, a page at a time (a session per
    page, so a slow reader holds no connection between pages)."""
    after = 0
    while True:
        query = select(ReviewedLabel).where(col(ReviewedLabel.id) > after)
        if where.since is not None:
            query = query.where(col(ReviewedLabel.created_at) >= _utc(where.since))
        if where.until is not None:
            query = query.where(col(ReviewedLabel.created_at) < _utc(where.until))
        if where.verdict is not None:
            query = query.where(ReviewedLabel.verdict == where.verdict)
        if where.reviewer is not None:
            query = query.where(ReviewedLabel.reviewer == where.reviewer)
        with Session(engine) as session:
            rows = list(session.exec(query.order_by(col(ReviewedLabel.id)).limit(PAGE)))
        if not rows:
            return
        for row in rows:
            # Box classes live in a JSON column, whose queries differ between SQLite and
            # PostgreSQL: checked here, on a page already bounded in size.
            if where.class_name is None or where.class_name in _classes(row):
                yield _record(row)
        after = rows[-1].id or after


def as_csv(records: Iterator[dict[str, Any]]) -> Iterator[str]:
    """CSV text in chunks: a header, then one line per record."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=EXPORT_FIELDS, lineterminator="\n")
    writer.writeheader()
    for n, record in enumerate(records, 1):
        counts = verdict_counts(record["box_feedback"])
        writer.writerow(
            {
                **record,
                "classes": "|".join(record["classes"]),
                "boxes": len(record["boxes"]),
                "box_feedback": "|".join(f"{k}={n}" for k, n in counts.items()),
            }
        )
        if n % PAGE == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def as_json(records: Iterator[dict[str, Any]]) -> Iterator[str]:
    """A JSON array in chunks, one record per line."""
    yield "["
    for n, record in enumerate(records):
        yield ("," if n else "") + "\n" + json.dumps(record)
    yield "\n]\n"


@dataclass(frozen=True)
class FeedbackDay:
    day: date
    reviewed: int
    accepted: int
    corrected: int
    rejected: int
    error_rate: float | None
    """Share of the day's reviews that changed the champion's answer (corrected or rejected);
    None on a day without reviews."""


def _day_of(session: Session) -> Any:
    created = col(ReviewedLabel.created_at)
    if session.get_bind().dialect.name == "postgresql":
        # The calendar day in UTC, whatever the server's time zone.
        return func.date(func.timezone("UTC", created))
    return func.date(created)  # SQLite stores UTC text, whose date() is the UTC day


def feedback_trend(session: Session, days: int, *, today: date | None = None) -> list[FeedbackDay]:
    """Reviews per UTC day over the last ``days`` days (today included), oldest first; days
    without a review are there with zeros, so a chart's gaps are real."""
    last = today or datetime.now(UTC).date()
    first = last - timedelta(days=days - 1)
    day = _day_of(session)
    start = datetime.combine(first, datetime.min.time(), tzinfo=UTC)
    rows = session.exec(
        select(day, ReviewedLabel.verdict, func.count())
        .where(col(ReviewedLabel.created_at) >= start)
        .group_by(day, ReviewedLabel.verdict)
    ).all()
    counts: dict[date, dict[str, int]] = {}
    for when, verdict, n in rows:
        key = when if isinstance(when, date) else date.fromisoformat(str(when))
        counts.setdefault(key, {})[Verdict(verdict).value] = int(n)
    trend = []
    for offset in range(days):
        current = first + timedelta(days=offset)
        seen = counts.get(current, {})
        accepted = seen.get(Verdict.accepted.value, 0)
        corrected = seen.get(Verdict.corrected.value, 0)
        rejected = seen.get(Verdict.rejected.value, 0)
        total = accepted + corrected + rejected
        trend.append(
            FeedbackDay(
                day=current,
                reviewed=total,
                accepted=accepted,
                corrected=corrected,
                rejected=rejected,
                error_rate=round((corrected + rejected) / total, 4) if total else None,
            )
        )
    return trend
