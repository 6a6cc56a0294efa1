"""Check-and-retrain: evaluate the retraining conditions and start the retrain when they say so.

release_dead_guard ─► decide ─► report ─► start_retrain (if the conditions fire)
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task

from monitoring.conditions import RetrainDecision, retraining_conditions
from training.retrain_guard import reconcile
from training.retrain_launcher import LaunchedRetrain, launch_retrain
from visionloop.db import session_scope
from visionloop.events import EventKind, emit
from visionloop.settings import get_settings


@task
def release_dead_guard() -> int | None:
    """A retrain whose process died still holds the guard until Prefect is asked about it."""
    with session_scope() as session:
        failed = reconcile(session, get_settings())
    return failed.id if failed else None


@task
def decide() -> RetrainDecision:
    with session_scope() as session:
        return retraining_conditions(session, get_settings())


@task
def report(decision: RetrainDecision) -> None:
    logger = get_run_logger()
    logger.info(decision.summary)
    for condition in decision.conditions:
        logger.info(
            "%s %s: %s",
            "FIRED" if condition.fired else "     ",
            condition.name,
            condition.reason,
        )
    emit(
        EventKind.RETRAIN_CONDITIONS,
        decision.summary,
        {"should_retrain": decision.should_retrain, "trigger": decision.trigger},
    )


@task
def start_retrain(decision: RetrainDecision) -> LaunchedRetrain:
    assert decision.trigger is not None  # a decision to retrain names what fired
    with session_scope() as session:
        return launch_retrain(
            session,
            get_settings(),
            trigger=decision.trigger,
            reason=decision.summary,
            retraining_run_id=decision.manual_request_id,
        )


@flow(name="check-and-retrain", log_prints=True)
def check_and_retrain_flow(dry_run: bool = False) -> dict[str, Any]:
    """Evaluate the conditions; unless ``dry_run``, launch the retrain deployment if they fire.

    Returns the decision with the launched run (or None), as JSON for the flow run's result.
    """
    release_dead_guard()
    decision = decide()
    report(decision)
    launched = None
    if decision.should_retrain and not dry_run:
        launched = start_retrain(decision)
    return {**decision.as_dict(), "launched": asdict(launched) if launched else None}
