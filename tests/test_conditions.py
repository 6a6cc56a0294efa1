"""Retraining conditions: every condition alone and in combination, reasons as plain sentences."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from monitoring.conditions import LoopState, evaluate, gather_state
from visionloop.db import make_engine, migrate
from visionloop.models import DriftResult, Image, RetrainingRun, RetrainStatus, ReviewedLabel
from visionloop.settings import Settings

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
SETTINGS = Settings(
    min_new_labels=100,
    min_labels_to_retrain=20,
    retrain_cooldown_hours=6,
    max_champion_age_hours=168,
    drift_red=0.7,
)

# A quiet loop: a fresh champion, green drift, some labels, nothing running, cooldown long past.
QUIET = LoopState(
    now=NOW,
    drift_level="green",
    drift_score=0.1,
    new_labels=40,
    last_retrain_finished=NOW - timedelta(hours=48),
    champion_created=NOW - timedelta(hours=48),
    champion_version="4",
)

CASES = {
    # name: (state changes, should retrain, trigger, conditions that fired)
    "quiet": ({}, False, None, set()),
    "drift red": ({"drift_level": "red", "drift_score": 0.9}, True, "drift", {"drift"}),
    "drift yellow is not enough": (
        {"drift_level": "yellow", "drift_score": 0.5},
        False,
        None,
        set(),
    ),
    "drift never measured": ({"drift_level": None, "drift_score": None}, False, None, set()),
    "labels at threshold": ({"new_labels": 100}, True, "new_labels", {"new_labels"}),
    "labels one short": ({"new_labels": 99}, False, None, set()),
    "manual": (
        {"manual_request_id": 7, "manual_reason": "new camera"},
        True,
        "manual_request",
        {"manual_request"},
    ),
    "old champion": (
        {"champion_created": NOW - timedelta(hours=200)},
        True,
        "champion_age",
        {"champion_age"},
    ),
    "no champion": (
        {"champion_created": None, "champion_version": None},
        True,
        "champion_age",
        {"champion_age"},
    ),
    "running blocks drift": (
        {"drift_level": "red", "running_run_id": 3},
        False,
        None,
        {"drift", "retrain_running"},
    ),
    "running blocks manual too": (
        {"manual_request_id": 7, "running_run_id": 3},
        False,
        None,
        {"manual_request", "retrain_running"},
    ),
    "cooldown blocks labels": (
        {"new_labels": 500, "last_retrain_finished": NOW - timedelta(hours=2)},
        False,
        None,
        {"new_labels", "cooldown"},
    ),
    "cooldown passed": (
        {"new_labels": 500, "last_retrain_finished": NOW - timedelta(hours=6)},
        True,
        "new_labels",
        {"new_labels"},
    ),
    "manual overrides cooldown": (
        {"manual_request_id": 7, "last_retrain_finished": NOW - timedelta(hours=1)},
        True,
        "manual_request",
        {"manual_request"},
    ),
    "first retrain has no cooldown": (
        {"new_labels": 100, "last_retrain_finished": None},
        True,
        "new_labels",
        {"new_labels"},
    ),
    "drift red, too few labels to learn from": (
        {"drift_level": "red", "new_labels": 19},
        False,
        None,
        {"drift", "too_few_labels"},
    ),
    "drift red, just enough labels": (
        {"drift_level": "red", "new_labels": 20},
        True,
        "drift",
        {"drift"},
    ),
    "old champion, no new labels": (
        {"champion_created": NOW - timedelta(hours=200), "new_labels": 0},
        False,
        None,
        {"champion_age", "too_few_labels"},
    ),
    "manual overrides too few labels": (
        {"manual_request_id": 7, "new_labels": 0},
        True,
        "manual_request",
        {"manual_request"},
    ),
    "several triggers": (
        {"drift_level": "red", "new_labels": 150, "manual_request_id": 1},
        True,
        "drift",
        {"drift", "new_labels", "manual_request"},
    ),
    "several triggers, several blockers": (
        {
            "drift_level": "red",
            "new_labels": 150,
            "running_run_id": 2,
            "last_retrain_finished": NOW - timedelta(hours=1),
        },
        False,
        None,
        {"drift", "new_labels", "retrain_running", "cooldown"},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_conditions_table(name: str) -> None:
    changes, should, trigger, fired = CASES[name]
    decision = evaluate(replace(QUIET, **changes), SETTINGS)
    assert decision.should_retrain is should
    assert decision.trigger == trigger
    assert {c.name for c in decision.conditions if c.fired} == fired
    assert [c.name for c in decision.conditions] == [
        "drift",
        "new_labels",
        "manual_request",
        "champion_age",
        "retrain_running",
        "too_few_labels",
        "cooldown",
    ]
    for condition in decision.conditions:
        # Plain sentences: a capital letter or a number first, a full stop, no Python reprs.
        assert condition.reason[0].isupper() or condition.reason[0].isdigit(), condition.reason
        assert condition.reason.endswith("."), condition.reason
        assert "None" not in condition.reason and "True" not in condition.reason
    assert decision.summary.endswith(".")


def test_reasons_carry_values_and_thresholds() -> None:
    decision = evaluate(
        replace(
            QUIET,
            new_labels=42,
            last_retrain_finished=NOW - timedelta(hours=2),
            drift_level="red",
            drift_score=0.82,
        ),
        SETTINGS,
    )
    by_name = {c.name: c for c in decision.conditions}
    assert (
        by_name["new_labels"].reason
        == "42 new reviewed labels since the last training; 100 or more start a retrain."
    )
    assert (by_name["new_labels"].value, by_name["new_labels"].threshold) == (42, 100)
    assert (
        by_name["drift"].reason
        == "Drift level is red (score 0.82); retraining starts at red (score 0.7 or more)."
    )
    assert by_name["cooldown"].reason == (
        "The last retrain finished 2 hours ago; the cooldown is 6 hours and has not passed yet."
    )
    assert (
        by_name["cooldown"].value,
        by_name["cooldown"].threshold,
        by_name["cooldown"].fired,
    ) == (2.0, 6, True)
    assert decision.summary == (
        "Retrain wanted (drift) but blocked: The last retrain finished 2 hours ago; "
        "the cooldown is 6 hours and has not passed yet."
    )
    one = evaluate(replace(QUIET, new_labels=1), SETTINGS)
    assert one.conditions[1].reason.startswith("1 new reviewed label since")
    few = {
        c.name: c
        for c in evaluate(replace(QUIET, new_labels=7, drift_level="red"), SETTINGS).conditions
    }
    assert few["too_few_labels"].reason == (
        "Only 7 new reviewed labels to learn from; automatic retrains wait for 20."
    )
    assert (few["too_few_labels"].value, few["too_few_labels"].threshold) == (7, 20)


def test_state_is_gathered_from_the_database(sqlite_url: str) -> None:
    from sqlmodel import Session

    migrate(sqlite_url)
    engine = make_engine(sqlite_url)
    with Session(engine) as session:
        images = [Image(content_hash=f"{i:064d}", object_key=f"k{i}") for i in range(4)]
        session.add_all(images)
        session.flush()
        session.add_all(
            [
                ReviewedLabel(
                    image_id=img.id, image_path="p", verdict="accepted", used_for_training=i < 1
                )
                for i, img in enumerate(images)
            ]
        )
        session.add(
            DriftResult(
                stat_test="ks",
                drift_score=0.2,
                drift_share=0.1,
                level="green",
                created_at=NOW - timedelta(hours=3),
            )
        )
        session.add(
            DriftResult(
                stat_test="ks",
                drift_score=0.9,
                drift_share=0.6,
                level="red",
                created_at=NOW - timedelta(hours=1),
            )
        )
        session.add(
            RetrainingRun(
                trigger="drift",
                status=RetrainStatus.succeeded,
                finished_at=NOW - timedelta(hours=10),
            )
        )
        session.add(
            RetrainingRun(
                trigger="labels", status=RetrainStatus.failed, finished_at=NOW - timedelta(hours=4)
            )
        )
        session.add(
            RetrainingRun(trigger="manual", status=RetrainStatus.pending, reason="new lens")
        )
        session.commit()
        state = gather_state(session, NOW, NOW - timedelta(hours=30), "2")
    assert state.drift_level == "red" and state.drift_score == 0.9
    assert state.new_labels == 3
    assert state.running_run_id is None
    assert state.last_retrain_finished == NOW - timedelta(hours=4)
    assert state.manual_request_id is not None and state.manual_reason == "new lens"
    decision = evaluate(state, SETTINGS)
    # Red drift and a manual request; the cooldown (4 h < 6 h) is overridden by the request.
    assert decision.should_retrain and decision.trigger == "drift"

    with Session(engine) as session:
        session.add(
            RetrainingRun(trigger="drift", status=RetrainStatus.running, active_lock="retrain")
        )
        session.commit()
        blocked = evaluate(gather_state(session, NOW, NOW - timedelta(hours=30), "2"), SETTINGS)
    assert not blocked.should_retrain
    assert "still running" in blocked.summary
    engine.dispose()


def test_every_condition_is_registered_once_in_reading_order() -> None:
    from monitoring.conditions import CONDITIONS

    assert [(c.name, c.kind) for c in CONDITIONS.values()] == [
        ("drift", "trigger"),
        ("new_labels", "trigger"),
        ("manual_request", "trigger"),
        ("champion_age", "trigger"),
        ("retrain_running", "blocker"),
        ("too_few_labels", "blocker"),
        ("cooldown", "blocker"),
    ]
