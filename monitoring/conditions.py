"""Retraining conditions: should the loop retrain now, and why (or why not)?

One function over the platform's state decides; the check-and-retrain flow and the API both
call it, so the answer a person reads is the one the flow acted on. Every condition reports its
value, its threshold, whether it fired, and a plain sentence.

Triggers (any one suffices): drift level red, enough new reviewed labels, a manual request,
a champion past its maximum age (or no champion at all). Blockers (any one stops it): a retrain
already running, too few new labels to learn from (a drifted model can only learn the new
conditions from labels taken under them), the cooldown since the last retrain (a manual request
overrides the last two, never a running retrain).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, select

from visionloop.models import (
    DriftLevel,
    DriftResult,
    RetrainingRun,
    RetrainStatus,
    ReviewedLabel,
)
from visionloop.settings import Settings


@dataclass(frozen=True)
class Condition:
    name: str
    kind: str  # "trigger" | "blocker"
    value: Any
    threshold: Any
    fired: bool
    reason: str


@dataclass(frozen=True)
class RetrainDecision:
    should_retrain: bool
    trigger: str | None  # the first trigger that fired, recorded on the retraining run
    summary: str
    conditions: list[Condition] = field(default_factory=list)
    manual_request_id: int | None = None  # the pending request a retrain should pick up

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LoopState:
    """The facts the decision needs, gathered from the database and MLflow."""

    now: datetime
    drift_level: str | None = None  # latest drift result's level; None when never measured
    drift_score: float | None = None
    new_labels: int = 0
    running_run_id: int | None = None
    last_retrain_finished: datetime | None = None
    manual_request_id: int | None = None
    manual_reason: str = ""
    champion_created: datetime | None = None
    champion_version: str | None = None


def _hours(delta: timedelta) -> float:
    return round(delta.total_seconds() / 3600, 2)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def evaluate(state: LoopState, settings: Settings) -> RetrainDecision:
    """The decision, from facts alone: no I/O, so every combination is easy to test."""
    conditions: list[Condition] = []

    level = state.drift_level
    drift_fired = level == DriftLevel.red.value
    if level is None:
        drift_reason = "Drift has not been measured yet."
    else:
        score = f" (score {state.drift_score:.2f})" if state.drift_score is not None else ""
        drift_reason = f"Drift level is {level}{score}; retraining starts at red (score {settings.drift_red:g} or more)."
    conditions.append(
        Condition("drift", "trigger", level, DriftLevel.red.value, drift_fired, drift_reason)
    )

    labels_fired = state.new_labels >= settings.min_new_labels
    conditions.append(
        Condition(
            "new_labels",
            "trigger",
            state.new_labels,
            settings.min_new_labels,
            labels_fired,
            f"{_plural(state.new_labels, 'new reviewed label')} since the last training; "
            f"{settings.min_new_labels} or more start a retrain.",
        )
    )

    manual = state.manual_request_id is not None
    conditions.append(
        Condition(
            "manual_request",
            "trigger",
            manual,
            True,
            manual,
            f"A retrain was requested by hand (request {state.manual_request_id}"
            f"{': ' + state.manual_reason if state.manual_reason else ''})."
            if manual
            else "Nobody has requested a retrain.",
        )
    )

    if state.champion_created is None:
        age, age_fired = None, True
        age_reason = "There is no champion model yet, so one must be trained."
    else:
        age = _hours(state.now - state.champion_created)
        age_fired = age >= settings.max_champion_age_hours
        age_reason = (
            f"The champion (version {state.champion_version}) is {age:g} hours old; "
            f"it is retrained after {settings.max_champion_age_hours:g} hours."
        )
    conditions.append(
        Condition(
            "champion_age", "trigger", age, settings.max_champion_age_hours, age_fired, age_reason
        )
    )

    running = state.running_run_id is not None
    conditions.append(
        Condition(
            "retrain_running",
            "blocker",
            running,
            False,
            running,
            f"Retraining run {state.running_run_id} is still running; only one runs at a time."
            if running
            else "No retrain is running.",
        )
    )

    few = state.new_labels < settings.min_labels_to_retrain
    if not few:
        few_reason = (
            f"{_plural(state.new_labels, 'new reviewed label')} to learn from; automatic "
            f"retrains need {settings.min_labels_to_retrain}."
        )
    else:
        few_reason = (
            f"Only {_plural(state.new_labels, 'new reviewed label')} to learn from; automatic "
            f"retrains wait for {settings.min_labels_to_retrain}"
            + (", but a manual request overrides that." if manual else ".")
        )
    conditions.append(
        Condition(
            "too_few_labels",
            "blocker",
            state.new_labels,
            settings.min_labels_to_retrain,
            few and not manual,
            few_reason,
        )
    )

    if state.last_retrain_finished is None:
        since, cooling = None, False
        cooldown_reason = "No retrain has finished yet, so there is no cooldown."
    else:
        since = _hours(state.now - state.last_retrain_finished)
        cooling = since < settings.retrain_cooldown_hours
        cooldown_reason = (
            f"The last retrain finished {since:g} hours ago; the cooldown is "
            f"{settings.retrain_cooldown_hours:g} hours"
            + (" and has not passed yet." if cooling else " and has passed.")
        )
        if cooling and manual:
            cooldown_reason += " A manual request overrides it."
    conditions.append(
        Condition(
            "cooldown",
            "blocker",
            since,
            settings.retrain_cooldown_hours,
            cooling and not manual,
            cooldown_reason,
        )
    )

    triggers = [c for c in conditions if c.kind == "trigger" and c.fired]
    blockers = [c for c in conditions if c.kind == "blocker" and c.fired]
    should = bool(triggers) and not blockers
    if should:
        summary = "Retrain now: " + " ".join(c.reason for c in triggers)
    elif not triggers:
        summary = "No retrain needed: no trigger condition has fired."
    else:
        summary = (
            "Retrain wanted ("
            + ", ".join(c.name for c in triggers)
            + ") but blocked: "
            + " ".join(c.reason for c in blockers)
        )
    return RetrainDecision(
        should, triggers[0].name if should else None, summary, conditions, state.manual_request_id
    )


def _aware(moment: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes for timezone-aware columns; all stored times are UTC.
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


def gather_state(
    session: Session,
    now: datetime,
    champion_created: datetime | None = None,
    champion_version: str | None = None,
) -> LoopState:
    latest_drift = session.exec(
        select(DriftResult).order_by(DriftResult.created_at.desc()).limit(1)
    ).first()
    running = session.exec(
        select(RetrainingRun).where(RetrainingRun.active_lock.is_not(None)).limit(1)
    ).first()
    last_finished = session.exec(
        select(func.max(RetrainingRun.finished_at)).where(
            RetrainingRun.status.in_([RetrainStatus.succeeded, RetrainStatus.failed])
        )
    ).one()
    new_labels = session.exec(
        select(func.count())
        .select_from(ReviewedLabel)
        .where(ReviewedLabel.used_for_training.is_(False))
    ).one()
    manual = session.exec(
        select(RetrainingRun)
        .where(RetrainingRun.trigger == "manual", RetrainingRun.status == RetrainStatus.pending)
        .order_by(RetrainingRun.created_at)
        .limit(1)
    ).first()
    return LoopState(
        now=now,
        drift_level=DriftLevel(latest_drift.level).value if latest_drift else None,
        drift_score=latest_drift.drift_score if latest_drift else None,
        new_labels=int(new_labels),
        running_run_id=running.id if running else None,
        last_retrain_finished=_aware(last_finished),
        manual_request_id=manual.id if manual else None,
        manual_reason=manual.reason if manual else "",
        champion_created=_aware(champion_created),
        champion_version=champion_version,
    )


def champion_birth(settings: Settings) -> tuple[datetime | None, str | None]:
    """When the current champion was registered (MLflow owns that fact)."""
    from mlflow.exceptions import RestException

    from visionloop.registry import CHAMPION, client

    try:
        version = client(settings).get_model_version_by_alias(settings.model_name, CHAMPION)
    except RestException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None, None  # no registered model or no alias yet: there is no champion
        raise
    return datetime.fromtimestamp(version.creation_timestamp / 1000, tz=UTC), str(version.version)


def retraining_conditions(settings: Settings, now: datetime | None = None) -> RetrainDecision:
    from visionloop.db import session_scope

    now = now or datetime.now(UTC)
    created, version = champion_birth(settings)
    with session_scope() as session:
        state = gather_state(session, now, created, version)
    return evaluate(state, settings)
