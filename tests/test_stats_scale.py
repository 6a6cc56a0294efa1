"""The dashboard's statistics rewritten to stay flat at scale give what they gave before.

The implementations they replace are kept here verbatim as oracles, and both run on the same
crafted history (several model versions; no review, accepted, corrected and rejected ones;
skipped and cancelled items; rejected syncs; boxes named by ``label`` or only by ``cls``,
classes the project does not have, identical pairs on several images; interleaved cycles)
on SQLite and on PostgreSQL, the production path; then again after reviews change, since the
new queue statistics remember what they matched.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlmodel import Session, col, func, select

from labeling import ledger, review_queue
from labeling.ledger import recent_cycles
from labeling.review_queue import QueueStats, class_errors, queue_stats
from visionloop.db import make_engine, migrate
from visionloop.models import (
    Image,
    LabelingQueueItem,
    Prediction,
    QueueStatus,
    ReviewedLabel,
    Verdict,
)

CLASSES = ["scratch", "dent", "stain"]
VERSIONS = ["1", "2", "3"]


# --- the oracles: the implementations as they were ------------------------------------------


def old_queue_stats(session: Session, class_names: Sequence[str]) -> QueueStats:
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
    reviewed = sum(verdicts.values())

    compared = session.exec(
        select(Prediction.boxes, ReviewedLabel.boxes).join(
            Prediction,
            (Prediction.image_id == ReviewedLabel.image_id)
            & (Prediction.model_version == ReviewedLabel.prediction_model_version),
        )
    ).all()
    return QueueStats(
        total=sum(by_status.values()),
        by_status=by_status,
        by_reason=by_reason,
        sync_errors=int(sync_errors),
        verdicts=verdicts,
        agreement=round(verdicts[Verdict.accepted.value] / reviewed, 4) if reviewed else None,
        compared_images=len(compared),
        classes=class_errors(((p or [], r or []) for p, r in compared), class_names),
    )


def old_recent_cycles(session: Session, limit: int) -> list[str]:
    first = func.min(LabelingQueueItem.id)
    rows = session.exec(
        select(LabelingQueueItem.cycle, first)
        .where(col(LabelingQueueItem.cycle).is_not(None))
        .group_by(LabelingQueueItem.cycle)
        .order_by(first.desc())
        .limit(limit)
    ).all()
    return [str(cycle) for cycle, _ in reversed(rows)]


def _defined_order(stats: QueueStats, class_names: Sequence[str]) -> QueueStats:
    """The old rows in the order the new ones promise: the old order of classes outside
    ``class_names`` was the database's row order, which SQL leaves undefined."""
    extra = sorted(row.name for row in stats.classes if row.name not in class_names)
    rank = {name: i for i, name in enumerate([*class_names, *extra])}
    return replace(stats, classes=sorted(stats.classes, key=lambda row: rank[row.name]))


# --- a crafted history -----------------------------------------------------------------------


def _predicted(rng: random.Random) -> list[dict[str, Any]]:
    boxes = []
    for _ in range(rng.choice([0, 1, 1, 2, 3, 4])):
        x1, y1 = rng.uniform(0, 0.6), rng.uniform(0, 0.6)
        box: dict[str, Any] = {
            "x1": x1,
            "y1": y1,
            "x2": x1 + rng.uniform(0.05, 0.35),
            "y2": y1 + rng.uniform(0.05, 0.35),
            "conf": round(rng.uniform(0.2, 0.99), 3),
        }
        kind = rng.random()
        cls = rng.randrange(len(CLASSES))
        if kind < 0.7:
            box.update(cls=cls, name=CLASSES[cls])
        elif kind < 0.8:
            box.update(cls=cls)  # named by its class id only
        elif kind < 0.9:
            box.update(cls=7)  # an id the project does not have
        else:
            box.update(cls=3, name="ghost")  # a class the project does not have
        boxes.append(box)
    return boxes


def _reviewed(predicted: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    """The reviewer's boxes: most kept, some moved, dropped, relabelled or added."""
    boxes = []
    for box in predicted:
        roll = rng.random()
        if roll < 0.15:
            continue  # deleted
        name = box.get("name") or CLASSES[box.get("cls", 0) % len(CLASSES)]
        if roll < 0.25:
            name = rng.choice(CLASSES)  # relabelled
        shift = 0.3 if roll > 0.9 else 0.0  # moved off
        key = "label" if rng.random() < 0.2 else "name"
        boxes.append(
            {
                "cls": CLASSES.index(name) if name in CLASSES else 0,
                key: name,
                "cx": (box["x1"] + box["x2"]) / 2 + shift,
                "cy": (box["y1"] + box["y2"]) / 2,
                "w": box["x2"] - box["x1"],
                "h": box["y2"] - box["y1"],
            }
        )
    if rng.random() < 0.3:  # added
        cls = rng.randrange(len(CLASSES))
        boxes.append({"cls": cls, "name": CLASSES[cls], "cx": 0.5, "cy": 0.5, "w": 0.1, "h": 0.1})
    return boxes


def fill(session: Session, images: int = 150, seed: int = 4) -> None:
    rng = random.Random(seed)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    shared = _predicted(random.Random(99)) or [
        {"cls": 0, "name": "scratch", "x1": 0.1, "y1": 0.1, "x2": 0.3, "y2": 0.3}
    ]
    for i in range(images):
        image = Image(content_hash=f"{i:064d}", object_key=f"s/{i}.jpg", created_at=t0)
        session.add(image)
        session.flush()
        assert image.id is not None
        versions = rng.sample(VERSIONS, rng.choice([1, 1, 2, 3]))
        predictions = []
        for version in versions:
            boxes = shared if i % 17 == 0 else _predicted(rng)  # identical pairs on some images
            prediction = Prediction(image_id=image.id, model_version=version, boxes=boxes)
            session.add(prediction)
            predictions.append(prediction)
        session.flush()
        if i % 5 == 4:
            continue  # predicted, never queued
        shown = rng.choice(predictions)
        reviewed = i % 3 != 0
        status = (
            rng.choice([QueueStatus.labeled, QueueStatus.approved])
            if reviewed
            else rng.choice(list(QueueStatus))
        )
        # Cycles interleave: an item of an old cycle can come after a newer cycle started.
        cycle = None if i % 11 == 0 else f"cycle-{(i // 12 + (i % 13 == 0)) % 9}"
        session.add(
            LabelingQueueItem(
                image_id=image.id,
                prediction_id=shown.id if i % 19 else None,
                image_path=f"s3://images/s/{i}.jpg",
                confidence_score=rng.random(),
                status=status,
                flagged_reason=rng.choice(["uncertainty", "diversity", "drift"]),
                arm=rng.choice(["selected", "selected", "control", "audit"]),
                cycle=cycle,
                sync_error="box outside the image" if i % 7 == 0 else None,
                created_at=t0 + timedelta(seconds=i),
            )
        )
        if not reviewed:
            continue
        verdict = rng.choice(list(Verdict))
        boxes = (
            [{"cls": 1, "name": "dent", "cx": 0.5, "cy": 0.5, "w": 0.2, "h": 0.2}]
            if verdict is Verdict.rejected
            else _reviewed(shown.boxes, rng)
        )
        if i % 17 == 0:
            boxes = [dict(b) for b in _reviewed(shared, random.Random(5))]
        judged = rng.random()
        version = shown.model_version if judged < 0.8 else ("9" if judged < 0.9 else None)
        session.add(
            ReviewedLabel(
                image_id=image.id,
                image_path=f"s3://images/s/{i}.jpg",
                boxes=boxes if i % 23 else [],
                verdict=verdict,
                prediction_model_version=version,
            )
        )
    session.commit()


def change_reviews(session: Session) -> None:
    """What syncing labels does between two polls: a review redrawn, one removed, one added."""
    labels = list(session.exec(select(ReviewedLabel).order_by(col(ReviewedLabel.id))))
    labels[0].boxes = [{"cls": 2, "name": "stain", "cx": 0.2, "cy": 0.2, "w": 0.1, "h": 0.1}]
    labels[1].verdict = Verdict.corrected
    session.delete(labels[2])
    item = session.exec(
        select(LabelingQueueItem).where(col(LabelingQueueItem.status) == QueueStatus.pending)
    ).first()
    assert item is not None
    item.status = QueueStatus.labeled
    item.sync_error = None
    prediction = session.exec(
        select(Prediction).where(Prediction.image_id == item.image_id)
    ).first()
    assert prediction is not None
    session.add(
        ReviewedLabel(
            image_id=item.image_id,
            image_path=item.image_path,
            boxes=_reviewed(prediction.boxes, random.Random(8)),
            verdict=Verdict.corrected,
            prediction_model_version=prediction.model_version,
        )
    )
    session.commit()


@pytest.fixture(params=["sqlite", "postgresql"])
def session(request: pytest.FixtureRequest) -> Iterator[Session]:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
    migrate(url)
    engine = make_engine(url)
    with Session(engine) as session:
        fill(session)
        yield session
    engine.dispose()


# --- the comparisons --------------------------------------------------------------------------


def _assert_same_stats(session: Session, class_names: Sequence[str]) -> QueueStats:
    new = queue_stats(session, class_names)
    assert new == _defined_order(old_queue_stats(session, class_names), class_names)
    return new


def test_queue_stats_equal_the_old_ones(session: Session) -> None:
    stats = _assert_same_stats(session, CLASSES)
    # The history has what the comparison is worth making on.
    assert all(stats.by_status[s.value] for s in QueueStatus)
    assert all(stats.verdicts[v.value] for v in Verdict) and stats.sync_errors
    assert 0 < stats.compared_images < sum(stats.verdicts.values())
    assert {"ghost", "cls 7"} <= {row.name for row in stats.classes}
    assert _assert_same_stats(session, CLASSES) == stats  # answered again from the memo
    assert _assert_same_stats(session, ["dent", "scratch"])  # another class list


def test_queue_stats_follow_changed_reviews(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _assert_same_stats(session, CLASSES)
    change_reviews(session)
    after = _assert_same_stats(session, CLASSES)  # few new pairs: read by digest
    assert after != before
    # Not a fault injection: the threshold is tuning; 0 takes the read-everything path.
    review_queue._memo.clear()
    monkeypatch.setattr(review_queue, "_FETCH_MISSING_BY_DIGEST", 0)
    assert _assert_same_stats(session, CLASSES) == after


def test_queue_stats_of_an_empty_queue(sqlite_url: str) -> None:
    migrate(sqlite_url)
    engine = make_engine(sqlite_url)
    with Session(engine) as session:
        assert queue_stats(session, CLASSES) == old_queue_stats(session, CLASSES)
    engine.dispose()


@pytest.mark.parametrize("walk", [2000, 3])
def test_recent_cycles_equal_the_old_ones(
    session: Session, walk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not a fault injection: a short walk step makes the walk take many steps on few rows.
    monkeypatch.setattr(ledger, "_WALK", walk)
    for limit in (0, 1, 2, 5, 8, 9, 20):
        assert recent_cycles(session, limit) == old_recent_cycles(session, limit), limit
    assert len(recent_cycles(session, 20)) == 9
