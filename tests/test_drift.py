"""Drift detection on synthetic defect images: shifts are red and named; no shift stays green."""

from __future__ import annotations

import pandas as pd
import pytest

from monitoring.drift import DISTANCE_TESTS, P_VALUE_TESTS, DriftError, compute_drift, level_for
from monitoring.features import extract_features
from visionloop.models import DriftLevel
from visionloop.synthetic import DriftParams, encode_jpeg, iter_samples

SIZE = 160


def _features(n: int, seed: int, drift: DriftParams | None = None) -> pd.DataFrame:
    rows = [
        extract_features(encode_jpeg(s.image))
        for s in iter_samples(n, seed=seed, size=SIZE, drift=drift)
    ]
    return pd.DataFrame(rows)


# Windows of a few hundred images: the binned tests (psi, jensenshannon) compare histograms
# whose sampling noise alone reaches Evidently's 0.1 threshold on windows of ~150 images.
@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return _features(600, seed=1)


@pytest.fixture(scope="module")
def same_distribution() -> pd.DataFrame:
    return _features(400, seed=2)


@pytest.mark.parametrize(
    ("drift", "feature"),
    [
        (DriftParams(brightness=0.15), "brightness"),
        (DriftParams(blur=1.5), "blur"),
        (DriftParams(noise=0.06), "noise"),
    ],
    ids=["brightness", "blur", "noise"],
)
def test_shift_is_red_and_names_the_feature(
    reference: pd.DataFrame, drift: DriftParams, feature: str
) -> None:
    current = _features(150, seed=3, drift=drift)
    outcome = compute_drift(reference, current)
    assert outcome.level == DriftLevel.red, outcome.features_dict()
    shifted = outcome.features[feature]
    assert shifted.drifted and shifted.severity >= 0.7
    assert feature in outcome.drifted_features
    assert outcome.p_value is not None and outcome.p_value < 1e-6
    assert outcome.drift_share > 0


def test_same_distribution_stays_green(
    reference: pd.DataFrame, same_distribution: pd.DataFrame
) -> None:
    outcome = compute_drift(reference, same_distribution)
    assert outcome.level == DriftLevel.green, outcome.features_dict()
    assert outcome.drifted_features == []
    assert outcome.drift_score < 0.3


@pytest.mark.parametrize("stat_test", ["psi", "wasserstein", "jensenshannon", "mannw"])
def test_other_stat_tests_see_a_brightness_shift(
    reference: pd.DataFrame, same_distribution: pd.DataFrame, stat_test: str
) -> None:
    shifted = compute_drift(
        reference, _features(150, seed=3, drift=DriftParams(brightness=0.2)), stat_test=stat_test
    )
    assert shifted.level == DriftLevel.red
    assert shifted.features["brightness"].drifted
    calm = compute_drift(reference, same_distribution, stat_test=stat_test)
    assert calm.drift_score < shifted.drift_score
    assert calm.level != DriftLevel.red
    assert (calm.p_value is None) == (stat_test in DISTANCE_TESTS)


def test_html_report_and_constant_columns(
    reference: pd.DataFrame, same_distribution: pd.DataFrame
) -> None:
    outcome = compute_drift(reference, same_distribution, with_html=True)
    assert "<html" in outcome.html.lower()
    # width and height are constant in both windows: no verdict on them, and no error.
    assert "width" not in outcome.features and "height" not in outcome.features
    assert set(outcome.features) == {
        "brightness",
        "contrast",
        "blur",
        "colorfulness",
        "saturation",
        "noise",
        "entropy",
    }


def test_bad_inputs_are_explained(reference: pd.DataFrame) -> None:
    with pytest.raises(DriftError, match="unknown drift test 'nope'.*VISIONLOOP_DRIFT_STAT_TEST"):
        compute_drift(reference, reference, stat_test="nope")
    with pytest.raises(DriftError, match="share no varying numeric feature"):
        compute_drift(reference, pd.DataFrame({"other": [1.0, 2.0]}))
    with pytest.raises(DriftError, match="at least 2 rows"):
        compute_drift(reference, reference.head(1))


def test_levels_follow_thresholds() -> None:
    assert level_for(0.29, 0.3, 0.7) == DriftLevel.green
    assert level_for(0.3, 0.3, 0.7) == DriftLevel.yellow
    assert level_for(0.7, 0.3, 0.7) == DriftLevel.red
    assert level_for(0.5, 0.2, 0.4) == DriftLevel.red
    assert P_VALUE_TESTS.isdisjoint(DISTANCE_TESTS)


def test_current_window_and_latest_level_come_from_the_session(sqlite_url: str) -> None:
    from datetime import UTC, datetime, timedelta

    from sqlmodel import Session

    from monitoring.drift_data import current_frame
    from monitoring.drift_state import latest_drift_level
    from visionloop.db import make_engine, migrate
    from visionloop.models import DriftResult, Image, ImageStatus, Prediction
    from visionloop.settings import Settings

    now = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    settings = Settings(class_names=["scratch", "dent"], drift_window_hours=24)
    features = {"brightness": 0.5, "blur": 10.0}
    migrate(sqlite_url)
    engine = make_engine(sqlite_url)
    with Session(engine) as session:
        assert latest_drift_level(session) is None
        recent, old, quarantined = (
            Image(content_hash=f"{i:064d}", object_key=f"k{i}", features=features, created_at=at)
            for i, at in enumerate([now - timedelta(hours=1), now - timedelta(hours=30), now])
        )
        quarantined.status = ImageStatus.quarantined
        session.add_all([recent, old, quarantined])
        session.flush()
        boxes = [{"cls": 0, "conf": 0.9}, {"cls": 1, "conf": 0.5}]
        session.add(Prediction(image_id=recent.id, model_version="3", boxes=boxes))
        session.add(DriftResult(stat_test="ks", drift_score=0.9, drift_share=0.5, level="red"))
        session.commit()

        frame = current_frame(session, settings, "3", now)
        other_version = current_frame(session, settings, "4", now)
        level = latest_drift_level(session)
    engine.dispose()
    assert len(frame) == 1  # the old and the quarantined image are outside the window
    row = frame.iloc[0]
    assert row["brightness"] == 0.5 and row["pred_boxes"] == 2
    assert row["pred_share_scratch"] == 0.5 and row["pred_max_conf"] == 0.9
    assert "pred_boxes" not in other_version.columns  # no prediction of that model version
    assert level == "red"
