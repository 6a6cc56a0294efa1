"""The dashboard's statistics rewritten to stay flat at scale give what they gave before.

The implementations they replace are kept here verbatim as oracles, and both run on the same
crafted history (several model versions; no review, accepted, corrected and rejected ones;
skipped and cancelled items; rejected syncs; boxes named by ``label`` or only by ``cls``,
classes the project does not have, identical pairs on several images; interleaved cycles)
on SQLite and on PostgreSQL, the production path; then again after reviews change, since the
new queue statistics are running totals kept as rows are written
(``visionloop.stats_counters``): after a random mix of writes through every path that touches
a counted row, and after eight writers at once on PostgreSQL, the totals are exactly what
counting the rows again (``rebuild``) gives.
"""

from __future__ import annotations

import operator
import random
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, delete, insert, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm.exc import StaleDataError
from sqlmodel import Session, col, func, select

from labeling import ledger, tasks
from labeling.ledger import recent_cycles
from labeling.review_queue import QueueStats, class_errors, queue_stats
from visionloop.db import downgrade, make_engine, migrate
from visionloop.models import (
    Image,
    LabelingQueueItem,
    Prediction,
    QueueStatus,
    ReviewedLabel,
    Verdict,
)
from visionloop.settings import get_settings
from visionloop.stats_counters import (
    Counts,
    UncountedWrite,
    class_map,
    read_counters,
    rebuild,
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


def test_queue_stats_follow_changed_reviews(session: Session) -> None:
    before = _assert_same_stats(session, CLASSES)
    change_reviews(session)
    after = _assert_same_stats(session, CLASSES)
    assert after != before
    assert _assert_same_stats(session, ["dent", "scratch"]) != after  # counted again, once
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


# --- the running totals: exactly what counting the rows again gives -------------------------


def _counters_against_rebuild(engine: Engine) -> tuple[Counts, Counts]:
    """The counters as kept, and as ``rebuild`` counts them from the rows (rolled back). The
    labels' stored box counts must be what matching them again gives, too."""
    labels = ReviewedLabel.__table__  # type: ignore[attr-defined]
    parts = select(labels.c.id, labels.c.stats_parts).order_by(labels.c.id)
    with engine.connect() as conn:
        kept = {key: n for key, n in read_counters(conn).items() if n}
        stored = conn.execute(parts).all()
        rebuilt = rebuild(conn, CLASSES)
        assert conn.execute(parts).all() == stored
        conn.rollback()
    return kept, rebuilt


def _new_image(session: Session, rng: random.Random, tag: str) -> tuple[Image, list[Prediction]]:
    image = Image(content_hash=f"{tag:0>64}"[-64:], object_key=f"mix/{tag}.jpg")
    session.add(image)
    session.flush()
    assert image.id is not None
    predictions = [
        Prediction(image_id=image.id, model_version=version, boxes=_predicted(rng))
        for version in rng.sample(VERSIONS, rng.choice([1, 2]))
    ]
    session.add_all(predictions)
    session.flush()
    return image, predictions


def _queue_item(image: Image, prediction: Prediction, rng: random.Random) -> LabelingQueueItem:
    return LabelingQueueItem(
        image_id=image.id,
        prediction_id=prediction.id,
        image_path=f"s3://images/{image.object_key}",
        status=rng.choice(list(QueueStatus)),
        flagged_reason=rng.choice(["uncertainty", "diversity", "drift"]),
        sync_error=rng.choice([None, None, "box outside the image"]),
    )


def _label(image: Image, prediction: Prediction, rng: random.Random) -> ReviewedLabel:
    return ReviewedLabel(
        image_id=image.id,
        image_path=f"s3://images/{image.object_key}",
        boxes=_reviewed(prediction.boxes, rng),
        verdict=rng.choice(list(Verdict)),
        prediction_model_version=rng.choice([prediction.model_version] * 3 + ["9", None]),
    )


def _pick(session: Session, model: type[Any], rng: random.Random) -> Any:
    rows = list(session.exec(select(model).order_by(col(model.id))))
    return rng.choice(rows) if rows else None


def _write_something(session: Session, rng: random.Random, step: int) -> None:
    """One of the writes the platform makes, through each path that can touch a counted row."""
    op = rng.randrange(14)
    if op == 0:  # queued and reviewed in one flush
        image, predictions = _new_image(session, rng, f"new-{step}")
        session.add(_queue_item(image, predictions[0], rng))
        session.add(_label(image, rng.choice(predictions), rng))
    elif op == 1:  # the queueing flow's Core insert, a conflicting row included
        image, predictions = _new_image(session, rng, f"core-{step}")
        taken = _pick(session, LabelingQueueItem, rng)
        rows = [_queue_item(image, predictions[0], rng)]
        if taken is not None:
            rows.append(replace_item(taken, rng))
        tasks._insert_rows(session, rows)
    elif op == 2 and (item := _pick(session, LabelingQueueItem, rng)):
        item.status = rng.choice(list(QueueStatus))
        item.sync_error = rng.choice([None, "rejected"])
    elif op == 3 and (item := _pick(session, LabelingQueueItem, rng)):
        item.flagged_reason = rng.choice(["uncertainty", "novelty"])
    elif op == 4 and (label := _pick(session, ReviewedLabel, rng)):
        label.boxes = _reviewed(_predicted(rng), rng)
    elif op == 5 and (label := _pick(session, ReviewedLabel, rng)):
        label.verdict = rng.choice(list(Verdict))
        label.prediction_model_version = rng.choice([*VERSIONS, "9", None])
    elif op == 6 and (label := _pick(session, ReviewedLabel, rng)):
        session.delete(label)
    elif op == 7 and (item := _pick(session, LabelingQueueItem, rng)):
        session.delete(item)
    elif op == 8:  # bulk delete, as the tests' clean-ups do
        ids = [rng.randrange(1, 200) for _ in range(3)]
        session.exec(delete(ReviewedLabel).where(col(ReviewedLabel.image_id).in_(ids)))  # type: ignore[call-overload]
    elif op == 9:  # bulk update of a counted column
        session.exec(  # type: ignore[call-overload]
            update(LabelingQueueItem)
            .where(col(LabelingQueueItem.id) % 5 == rng.randrange(5))
            .values(status=rng.choice(list(QueueStatus)).value)
        )
    elif op == 10:  # bulk update of a counted label column, and of one that is not counted
        ids = [rng.randrange(1, 200) for _ in range(5)]
        session.exec(  # type: ignore[call-overload]
            update(ReviewedLabel)
            .where(col(ReviewedLabel.image_id).in_(ids))
            .values(verdict=rng.choice(list(Verdict)).value, prediction_model_version="2")
        )
        session.exec(update(ReviewedLabel).values(used_for_training=True))  # type: ignore[call-overload]
    elif op == 11 and (label := _pick(session, ReviewedLabel, rng)):
        _predict_under(session, label, rng)
    elif op == 12 and (prediction := _unqueued_prediction(session, rng)):
        if rng.random() < 0.5:
            prediction.boxes = _predicted(rng)
        else:
            session.delete(prediction)
    elif op == 13:  # a prediction's boxes rewritten in bulk
        session.exec(  # type: ignore[call-overload]
            update(Prediction)
            .where(col(Prediction.image_id) == rng.randrange(1, 200))
            .values(boxes=_predicted(rng))
        )


def replace_item(taken: LabelingQueueItem, rng: random.Random) -> LabelingQueueItem:
    """A row for an already queued image: the Core insert must skip and not count it."""
    return LabelingQueueItem(
        image_id=taken.image_id,
        image_path=taken.image_path,
        flagged_reason="duplicate",
        status=rng.choice(list(QueueStatus)),
    )


def _predict_under(session: Session, label: ReviewedLabel, rng: random.Random) -> None:
    """A prediction arriving after the label judged against it (a version it did not have)."""
    version = label.prediction_model_version
    if version is None:
        return
    existing = session.exec(
        select(Prediction).where(
            Prediction.image_id == label.image_id, Prediction.model_version == version
        )
    ).first()
    if existing is None:
        session.add(
            Prediction(image_id=label.image_id, model_version=version, boxes=_predicted(rng))
        )


def _unqueued_prediction(session: Session, rng: random.Random) -> Prediction | None:
    shown = select(LabelingQueueItem.prediction_id).where(
        col(LabelingQueueItem.prediction_id).is_not(None)
    )
    rows = list(
        session.exec(
            select(Prediction).where(col(Prediction.id).not_in(shown)).order_by(col(Prediction.id))
        )
    )
    return rng.choice(rows) if rows else None


def test_counters_follow_every_write_path(engine: Engine) -> None:
    with Session(engine) as session:
        fill(session, images=80)
    rng = random.Random(11)
    for step in range(160):
        with Session(engine) as session:
            for sub in range(rng.choice([1, 1, 3])):
                _write_something(session, rng, step * 10 + sub)
            if rng.random() < 0.1:
                session.rollback()  # flushed, never committed: counts nothing
            else:
                session.commit()
    kept, rebuilt = _counters_against_rebuild(engine)
    assert kept == rebuilt
    assert kept[("compared", "", "")] and kept[("matched", "scratch", "")]
    with Session(engine) as session:
        _assert_same_stats(session, CLASSES)


def test_counters_see_what_another_writer_changed(engine: Engine) -> None:
    """A session's loaded row went stale (another writer changed and committed it): its own
    change still subtracts what the row counted in the database, not what it had loaded."""
    with Session(engine) as session:
        fill(session, images=20)
    with Session(engine) as stale, Session(engine) as other:
        item = stale.exec(select(LabelingQueueItem).order_by(col(LabelingQueueItem.id))).first()
        label = stale.exec(select(ReviewedLabel).order_by(col(ReviewedLabel.id))).first()
        assert item is not None and label is not None
        fresh_item = other.get(LabelingQueueItem, item.id)
        fresh_label = other.get(ReviewedLabel, label.id)
        assert fresh_item is not None and fresh_label is not None
        fresh_item.flagged_reason, fresh_item.sync_error = "novelty", "rejected"
        fresh_label.verdict = Verdict.rejected
        fresh_label.boxes = []
        other.commit()
        item.status = QueueStatus.cancelled
        label.prediction_model_version = "3"
        stale.commit()
    assert operator.eq(*_counters_against_rebuild(engine))


def test_a_label_gets_its_share_written_even_as_the_session_had_it(engine: Engine) -> None:
    """Judged against no prediction when a session loaded it, matched by another writer since
    (its prediction arrived), then judged against no prediction again by that session: the
    row must say so, though the session's copy already did."""
    with Session(engine) as session:
        fill(session, images=20)
    with Session(engine) as stale, Session(engine) as other:
        label = stale.exec(select(ReviewedLabel).order_by(col(ReviewedLabel.id))).first()
        assert label is not None
        label.prediction_model_version = "8"  # no prediction of that version
        stale.commit()
        assert label.stats_parts is None
        other.add(
            Prediction(
                image_id=label.image_id,
                model_version="8",
                boxes=[{"cls": 0, "name": "scratch", "x1": 0, "y1": 0, "x2": 0.5, "y2": 0.5}],
            )
        )
        other.commit()
        label.prediction_model_version = "7"  # none of this one either
        stale.commit()
    assert operator.eq(*_counters_against_rebuild(engine))


def test_a_savepoint_rolled_back_takes_its_counts_with_it(engine: Engine) -> None:
    with Session(engine) as session:
        fill(session, images=20)
    with Session(engine) as session:
        labels = list(session.exec(select(ReviewedLabel).order_by(col(ReviewedLabel.id))))
        items = list(session.exec(select(LabelingQueueItem).order_by(col(LabelingQueueItem.id))))
        labels[0].verdict = Verdict.rejected  # kept: counted before the savepoint
        with session.begin_nested():
            labels[1].boxes = []  # kept: the savepoint is released
        try:
            with session.begin_nested():
                session.delete(labels[2])
                items[0].status = QueueStatus.cancelled
                session.flush()
                raise RuntimeError("rolled back")
        except RuntimeError:
            pass
        items[1].sync_error = "rejected"  # kept: after the savepoint
        kept_id = labels[2].id
        session.commit()
    with Session(engine) as session:
        assert session.get(ReviewedLabel, kept_id) is not None
    assert operator.eq(*_counters_against_rebuild(engine))


@pytest.mark.parametrize("database", ["sqlite_url", "postgres_url"])
def test_the_migration_counts_the_history_it_finds(
    database: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(database)
    names = get_settings().class_names  # what the migration counts under
    migrate(url)
    engine = make_engine(url)
    with Session(engine) as session:
        fill(session)
        expected = _defined_order(old_queue_stats(session, names), names)
    engine.dispose()
    downgrade(url, "0005")  # the history as it was before the counters
    migrate(url)
    engine = make_engine(url)
    with Session(engine) as session:
        assert class_map(session.connection()) == names
        assert queue_stats(session, names) == expected
    engine.dispose()


def test_bulk_writes_the_counters_cannot_follow_are_refused(sqlite_url: str) -> None:
    migrate(sqlite_url)
    engine = make_engine(sqlite_url)
    with Session(engine) as session, pytest.raises(UncountedWrite):
        session.exec(  # type: ignore[call-overload]
            insert(LabelingQueueItem).values(image_id=1, image_path="x", flagged_reason="r")
        )
    engine.dispose()


WRITERS = 8


def _writer(url: str, seed: int, rounds: int, failures: list[str]) -> None:
    """Random writes on rows the other writers change too, each round its own transaction;
    one the database refuses (a deadlock on the rows, a unique clash) or that finds its row
    deleted by another writer is rolled back whole."""
    engine = make_engine(url)
    rng = random.Random(seed)
    try:
        for step in range(rounds):
            with Session(engine) as session:
                try:
                    for sub in range(rng.choice([1, 2])):
                        _write_something(session, rng, seed * 100_000 + step * 10 + sub)
                    session.commit()
                except (DBAPIError, StaleDataError) as exc:
                    session.rollback()
                    failures.append(type(getattr(exc, "orig", exc)).__name__)
    finally:
        engine.dispose()


def test_parallel_writers_lose_no_update(postgres_url: str) -> None:
    migrate(postgres_url)
    engine = make_engine(postgres_url)
    with Session(engine) as session:
        fill(session, images=60)
    failures: list[str] = []
    with ThreadPoolExecutor(WRITERS) as pool:
        runs = [pool.submit(_writer, postgres_url, seed, 25, failures) for seed in range(WRITERS)]
        for run in runs:
            run.result()  # a writer's unexpected error fails the test
    kept, rebuilt = _counters_against_rebuild(engine)
    assert kept == rebuilt
    assert len(failures) < WRITERS * 25 / 2, failures  # most rounds did write
    engine.dispose()
