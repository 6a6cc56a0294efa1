"""ADWIN on the champion's confidence stream, on SQLite and PostgreSQL: quiet while the stream
is stable, one drift result (at least yellow) when it shifts, and only for the champion's own
predictions."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from monitoring.confidence_stream import STAT_TEST, watch_confidence
from visionloop.events import EventKind
from visionloop.models import ActivityEvent, DriftLevel, DriftResult, Image, Prediction
from visionloop.settings import load_settings

BATCH = 50


def _ingest(engine: Engine, confidences: np.ndarray, version: str = "4") -> list[DriftResult]:
    """Write predictions a batch at a time, as ingest does, watching after each batch; the drift
    results the watch recorded."""
    settings = load_settings()
    found = []
    for start in range(0, len(confidences), BATCH):
        with Session(engine) as session:
            ids = []
            for conf in confidences[start : start + BATCH]:
                image = Image(content_hash=uuid.uuid4().hex * 2, object_key="x.jpg")
                session.add(image)
                session.flush()
                assert image.id is not None
                ids.append(image.id)
                # An image without a box has no mean confidence: the stream reads it as 0.
                mean = None if conf <= 0 else float(conf)
                session.add(
                    Prediction(image_id=image.id, model_version=version, mean_confidence=mean)
                )
            session.commit()
            result = watch_confidence(session, settings, version, ids)
            if result is not None:
                found.append(result)
    return found


def _stream(seed: int, *parts: tuple[float, int]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([np.clip(rng.normal(mean, 0.15, n), 0, 1) for mean, n in parts])


def test_a_stable_stream_stays_quiet(engine: Engine) -> None:
    assert _ingest(engine, _stream(1, (0.6, 1500))) == []
    with Session(engine) as session:
        assert session.exec(select(DriftResult)).all() == []


def test_a_shift_in_confidence_raises_the_level_to_yellow_once(engine: Engine) -> None:
    found = _ingest(engine, _stream(2, (0.6, 1000), (0.4, 400)))
    assert len(found) == 1, [f.features for f in found]
    change = found[0]
    assert change.stat_test == STAT_TEST and change.level == DriftLevel.yellow
    detail = change.features["confidence"]
    assert detail["mean_before"] == pytest.approx(0.6, abs=0.03)
    # ADWIN cuts where the two halves of its window differ most: what it keeps as the new
    # regime can still hold some of the old, so its mean lies between the two.
    assert 0.35 < detail["mean_after"] < detail["mean_before"] - 0.05
    with Session(engine) as session:
        first_shifted = session.exec(
            select(Prediction.id).order_by(col(Prediction.id)).offset(1000)
        ).first()
        kinds = [
            e.kind for e in session.exec(select(ActivityEvent).order_by(col(ActivityEvent.id)))
        ]
    assert detail["prediction_id"] >= first_shifted  # found after the shift, not before
    assert kinds == [EventKind.DRIFT_STREAM_CHANGE.value, EventKind.DRIFT_LEVEL_CHANGED.value]


def test_a_red_level_stays_red_and_other_versions_are_another_stream(engine: Engine) -> None:
    with Session(engine) as session:
        session.add(
            DriftResult(stat_test="psi", drift_score=0.9, drift_share=0.8, level=DriftLevel.red)
        )
        session.commit()
    # A new champion starts lower than the old one: a change of model, not of the world.
    _ingest(engine, _stream(3, (0.6, 800)), version="4")
    assert _ingest(engine, _stream(4, (0.4, 300)), version="5") == []
    found = _ingest(engine, _stream(5, (0.4, 800)), version="4")
    assert len(found) == 1 and found[0].level == DriftLevel.red
