"""Retraining conditions: should the loop retrain now, and why (or why not)?

One function over the platform's state decides; the check-and-retrain flow and the API both
call it, so the answer a person reads is the one the flow acted on. Every condition reports its
value, its threshold, whether it fired, and a plain sentence. Conditions are plain functions
over a ``LoopState``, registered in ``CONDITIONS`` by name and kind; ``evaluate`` runs them all.

Triggers (any one suffices): drift level red, enough new reviewed labels, a manual request,
a champion past its maximum age (or no champion at all). Blockers (any one stops it): a retrain
already running, too few new labels to learn from (a drifted model can only learn the new
conditions from labels taken under them), the cooldown since the last retrain (a manual request
overrides the last two, never a running retrain).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import func
from sqlmodel import Session, col, select

from visionloop.models import (
    DriftLevel,
    DriftResult,
    RetrainingRun,
    RetrainStatus,
    ReviewedLabel,
)
from visionloop.settings import Settings

ConditionKind = Literal["trigger", "blocker"]


@dataclass(frozen=True)
class Condition:
    name: str
    kind: ConditionKind
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
    champion_stale_s: float | None = None
    """Seconds since MLflow last confirmed the champion, when it did not answer since the
    recheck interval passed; None when the champion facts are fresh."""

    @property
    def has_manual_request(self) -> bool:
        """A pending manual request, which overrides the cooldown and the label minimum."""
        return self.manual_request_id is not None


def _hours(delta: timedelta) -> float:
    return round(delta.total_seconds() / 3600, 2)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass(frozen=True)
class Finding:
    """One condition's verdict on the state; the registry adds its name and kind."""

    value: Any
    threshold: Any
    fired: bool
    reason: str


ConditionCheck = Callable[[LoopState, Settings], Finding]


@dataclass(frozen=True)
class RegisteredCondition:
    name: str
    kind: ConditionKind
    check: ConditionCheck


CONDITIONS: dict[str, RegisteredCondition] = {}
"""Every condition by name, in the order a person reads them: triggers, then blockers. The first
trigger that fired names the retrain, so this order is also the triggers' precedence."""


def condition(name: str, kind: ConditionKind) -> Callable[[ConditionCheck], ConditionCheck]:
    def register(check: ConditionCheck) -> ConditionCheck:
        CONDITIONS[name] = RegisteredCondition(name, kind, check)
        return check

    return register


@condition("drift", "trigger")
def drift_is_red(state: LoopState, settings: Settings) -> Finding:
    level = state.drift_level
    if level is None:
        reason = "Drift has not been measured yet."
    else:
        score = f" (score {state.drift_score:.2f})" if state.drift_score is not None else ""
        reason = (
            f"Drift level is {level}{score}; retraining starts at red "
            f"(score {settings.drift_red:g} or more)."
        )
    red = DriftLevel.red.value
    return Finding(level, red, level == red, reason)


@condition("new_labels", "trigger")
def enough_new_labels(state: LoopState, settings: Settings) -> Finding:
    return Finding(
        state.new_labels,
        settings.min_new_labels,
        state.new_labels >= settings.min_new_labels,
        f"{_plural(state.new_labels, 'new reviewed label')} since the last training; "
        f"{settings.min_new_labels} or more start a retrain.",
    )


@condition("manual_request", "trigger")
def manual_request(state: LoopState, settings: Settings) -> Finding:
    manual = state.has_manual_request
    if manual:
        detail = f": {state.manual_reason}" if state.manual_reason else ""
        reason = f"A retrain was requested by hand (request {state.manual_request_id}{detail})."
    else:
        reason = "Nobody has requested a retrain."
    return Finding(manual, True, manual, reason)


@condition("champion_age", "trigger")
def champion_too_old(state: LoopState, settings: Settings) -> Finding:
    limit = settings.max_champion_age_hours
    if state.champion_created is None:
        return Finding(None, limit, True, "There is no champion model yet, so one must be trained.")
    age = _hours(state.now - state.champion_created)
    reason = (
        f"The champion (version {state.champion_version}) is {age:g} hours old; "
        f"it is retrained after {limit:g} hours."
    )
    if state.champion_stale_s is not None:
        reason += (
            f" MLflow has not answered for {state.champion_stale_s:g} s, so this is its last "
            "answer and may be stale."
        )
    return Finding(age, limit, age >= limit, reason)


@condition("retrain_running", "blocker")
def retrain_running(state: LoopState, settings: Settings) -> Finding:
    running = state.running_run_id is not None
    reason = (
        f"Retraining run {state.running_run_id} is still running; only one runs at a time."
        if running
        else "No retrain is running."
    )
    return Finding(running, False, running, reason)


@condition("too_few_labels", "blocker")
def too_few_labels(state: LoopState, settings: Settings) -> Finding:
    needed = settings.min_labels_to_retrain
    labels = _plural(state.new_labels, "new reviewed label")
    few = state.new_labels < needed
    if not few:
        reason = f"{labels} to learn from; automatic retrains need {needed}."
    else:
        override = ", but a manual request overrides that." if state.has_manual_request else "."
        reason = f"Only {labels} to learn from; automatic retrains wait for {needed}{override}"
    return Finding(state.new_labels, needed, few and not state.has_manual_request, reason)


@condition("cooldown", "blocker")
def cooling_down(state: LoopState, settings: Settings) -> Finding:
    cooldown = settings.retrain_cooldown_hours
    if state.last_retrain_finished is None:
        return Finding(
            None, cooldown, False, "No retrain has finished yet, so there is no cooldown."
        )
    since = _hours(state.now - state.last_retrain_finished)
    cooling = since < cooldown
    reason = (
        f"The last retrain finished {since:g} hours ago; the cooldown is {cooldown:g} hours"
        + (" and has not passed yet." if cooling else " and has passed.")
    )
    if cooling and state.has_manual_request:
        reason += " A manual request overrides it."
    return Finding(since, cooldown, cooling and not state.has_manual_request, reason)


def _summary(triggers: list[Condition], blockers: list[Condition]) -> str:
    if not triggers:
        return "No retrain needed: no trigger condition has fired."
    if not blockers:
        return "Retrain now: " + " ".join(c.reason for c in triggers)
    wanted = ", ".join(c.name for c in triggers)
    return f"Retrain wanted ({wanted}) but blocked: " + " ".join(c.reason for c in blockers)


def evaluate(state: LoopState, settings: Settings) -> RetrainDecision:
    """The decision, from facts alone: no I/O, so every combination is easy to test."""
    conditions = []
    for registered in CONDITIONS.values():
        finding = registered.check(state, settings)
        conditions.append(
            Condition(
                registered.name,
                registered.kind,
                finding.value,
                finding.threshold,
                finding.fired,
                finding.reason,
            )
        )
    triggers = [c for c in conditions if c.kind == "trigger" and c.fired]
    blockers = [c for c in conditions if c.kind == "blocker" and c.fired]
    should = bool(triggers) and not blockers
    return RetrainDecision(
        should_retrain=should,
        trigger=triggers[0].name if should else None,
        summary=_summary(triggers, blockers),
        conditions=conditions,
        manual_request_id=state.manual_request_id,
    )


def _aware(moment: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes for timezone-aware columns; all stored times are UTC.
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


# The conditions are asked on every dashboard poll: each query reads the columns it needs,
# not whole rows (a drift result carries every feature's statistics as JSON).


def _latest_drift(session: Session) -> tuple[str, float | None] | None:
    """The newest drift result's level and score."""
    row = session.exec(
        select(DriftResult.level, DriftResult.drift_score)
        .order_by(col(DriftResult.created_at).desc())
        .limit(1)
    ).first()
    return (row[0], row[1]) if row is not None else None


def _running_retrain(session: Session) -> int | None:
    return session.exec(
        select(RetrainingRun.id).where(col(RetrainingRun.active_lock).is_not(None)).limit(1)
    ).first()


def _last_retrain_finished(session: Session) -> datetime | None:
    finished = (RetrainStatus.succeeded, RetrainStatus.failed)
    return session.exec(
        select(func.max(RetrainingRun.finished_at)).where(RetrainingRun.status.in_(finished))
    ).one()


def _new_label_count(session: Session, approved_only: bool) -> int:
    query = (
        select(func.count())
        .select_from(ReviewedLabel)
        .where(ReviewedLabel.used_for_training.is_(False))
    )
    if approved_only:  # only approved labels train, so only they are new training data
        query = query.where(col(ReviewedLabel.approved_at).is_not(None))
    return int(session.exec(query).one())


def _pending_manual_request(session: Session) -> tuple[int, str] | None:
    row = session.exec(
        select(RetrainingRun.id, RetrainingRun.reason)
        .where(RetrainingRun.trigger == "manual", RetrainingRun.status == RetrainStatus.pending)
        .order_by(col(RetrainingRun.created_at))
        .limit(1)
    ).first()
    return (int(row[0]), str(row[1])) if row is not None else None


def gather_state(
    session: Session,
    now: datetime,
    champion_created: datetime | None = None,
    champion_version: str | None = None,
    champion_stale_s: float | None = None,
    approved_only: bool = False,
) -> LoopState:
    latest_drift = _latest_drift(session)
    running = _running_retrain(session)
    manual = _pending_manual_request(session)
    return LoopState(
        now=now,
        drift_level=DriftLevel(latest_drift[0]).value if latest_drift else None,
        drift_score=latest_drift[1] if latest_drift else None,
        new_labels=_new_label_count(session, approved_only),
        running_run_id=running,
        last_retrain_finished=_aware(_last_retrain_finished(session)),
        manual_request_id=manual[0] if manual else None,
        manual_reason=manual[1] if manual else "",
        champion_created=_aware(champion_created),
        champion_version=champion_version,
        champion_stale_s=champion_stale_s,
    )


def retraining_conditions(
    session: Session, settings: Settings, now: datetime | None = None
) -> RetrainDecision:
    """The decision on the platform's current state (the database's and MLflow's).

    The champion's facts come from this process's short-lived cache of MLflow's answer
    (``monitoring.champion_cache``): fresh within ``champion_recheck_s``, and still answered,
    said to be stale, while MLflow is away.
    """
    # Imported here: the cache reaches MLflow, whose import (seconds) the database-only
    # parts of this module, and the light flows importing them, do not need.
    from monitoring.champion_cache import cached_champion_birth

    now = now or datetime.now(UTC)
    birth = cached_champion_birth(settings)
    state = gather_state(
        session, now, birth.created, birth.version, birth.stale_s, settings.train_approved_only
    )
    return evaluate(state, settings)
