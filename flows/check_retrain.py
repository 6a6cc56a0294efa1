"""Check-and-retrain: evaluate the retraining conditions and start the retrain when they say so."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from monitoring.conditions import retraining_conditions
from training.retrain_guard import reconcile
from training.retrain_launcher import launch_retrain
from visionloop.db import session_scope
from visionloop.events import EventKind, emit
from visionloop.settings import get_settings


@task
def release_dead_guard() -> int | None:
    """A retrain whose process died still holds the guard until Prefect is asked about it."""
    failed = reconcile(get_settings())
    return failed.id if failed else None


@task
def decide() -> dict[str, Any]:
    with session_scope() as session:
        return retraining_conditions(session, get_settings()).as_dict()


@task
def start_retrain(trigger: str, reason: str, manual_request_id: int | None) -> dict[str, Any]:
    launched = launch_retrain(
        get_settings(), trigger=trigger, reason=reason, retraining_run_id=manual_request_id
    )
    return {"retraining_run_id": launched.retraining_run_id, "flow_run_id": launched.flow_run_id}


@flow(name="check-and-retrain", log_prints=True)
def check_and_retrain_flow(dry_run: bool = False) -> dict[str, Any]:
    """Evaluate the conditions; unless ``dry_run``, launch the retrain deployment if they fire."""
    release_dead_guard()
    decision = decide()
    logger = get_run_logger()
    logger.info(decision["summary"])
    for condition in decision["conditions"]:
        logger.info(
            "%s %s: %s",
            "FIRED" if condition["fired"] else "     ",
            condition["name"],
            condition["reason"],
        )
    emit(
        EventKind.RETRAIN_CONDITIONS,
        decision["summary"],
        {"should_retrain": decision["should_retrain"], "trigger": decision["trigger"]},
    )
    launched = None
    if decision["should_retrain"] and not dry_run:
        launched = start_retrain(
            decision["trigger"], decision["summary"], decision["manual_request_id"]
        )
    return {**decision, "launched": launched}
