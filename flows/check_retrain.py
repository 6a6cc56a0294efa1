"""Check-and-retrain: evaluate the retraining conditions and start the retrain when they say so.

release_dead_guard ─► decide ─► report ─► record_request ─► start_retrain (if they fire)
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger, task

from flows import server_retries
from training.retrain_guard import create_run, reconcile
from training.retrain_launcher import LaunchedRetrain, launch_retrain
from visionloop.db import session_scope
from visionloop.events import EventKind, emit
from visionloop.settings import get_settings

if TYPE_CHECKING:
    from monitoring.conditions import RetrainDecision


@task(**server_retries())
def release_dead_guard() -> int | None:
    """A retrain whose process died still holds the guard until Prefect is asked about it."""
    with session_scope() as session:
        failed = reconcile(session, get_settings())
    return failed.id if failed else None


@task(**server_retries())
def decide() -> RetrainDecision:
    # Imported here: the conditions reach MLflow for the champion's age, and MLflow's import
    # (seconds) belongs to the task that asks it, not to the start of every run.
    from monitoring.conditions import retraining_conditions

    with session_scope() as session:
        return retraining_conditions(session, get_settings())


@task(**server_retries())
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


@task(**server_retries())
def record_request(decision: RetrainDecision) -> int:
    """The pending retraining run to launch: the manual request, or one recorded now.

    A task of its own so that retrying the launch reuses this run instead of recording
    another one per attempt."""
    if decision.manual_request_id is not None:
        return decision.manual_request_id
    assert decision.trigger is not None  # a decision to retrain names what fired
    with session_scope() as session:
        run_id = create_run(session, decision.trigger, decision.summary).id
    assert run_id is not None
    return run_id


@task(**server_retries())
def start_retrain(decision: RetrainDecision, retraining_run_id: int) -> LaunchedRetrain:
    assert decision.trigger is not None  # a decision to retrain names what fired
    with session_scope() as session:
        return launch_retrain(
            session,
            get_settings(),
            trigger=decision.trigger,
            reason=decision.summary,
            retraining_run_id=retraining_run_id,
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
        launched = start_retrain(decision, record_request(decision))
    return {**decision.as_dict(), "launched": asdict(launched) if launched else None}
