"""Starting a retrain through its Prefect deployment: shared by the conditions flow and the API."""

from __future__ import annotations

from dataclasses import dataclass

from training.retrain_guard import create_run, update_run
from visionloop.settings import Settings

RETRAIN_DEPLOYMENT = "retrain/retrain"


@dataclass(frozen=True)
class LaunchedRetrain:
    retraining_run_id: int
    flow_run_id: str


def launch_retrain(
    settings: Settings, *, trigger: str, reason: str, retraining_run_id: int | None = None
) -> LaunchedRetrain:
    """Record (or pick up) a pending retraining run and hand it to the retrain deployment.

    The deployment's worker runs it; the run row knows its flow run from here on, so the
    guard can be reconciled with Prefect even if the run never starts.
    """
    from prefect.deployments import run_deployment

    run_id = retraining_run_id or create_run(trigger, reason).id
    flow_run = run_deployment(
        RETRAIN_DEPLOYMENT,
        parameters={"trigger": trigger, "reason": reason, "retraining_run_id": run_id},
        timeout=0,  # do not wait: training takes minutes to hours
        tags=[f"retraining-run:{run_id}", f"trigger:{trigger}"],
    )
    update_run(run_id, prefect_flow_run_id=str(flow_run.id))
    return LaunchedRetrain(run_id, str(flow_run.id))
