"""Starting a retrain through its Prefect deployment: shared by the conditions flow and the API."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict
from sqlmodel import Session

from training.gate import DEFAULT_PRIMARY_METRIC
from training.prefect_calls import bounded_prefect_calls
from training.retrain_guard import create_run, update_run
from visionloop.formats import DEFAULT_TEST_PERCENT, DEFAULT_VAL_PERCENT
from visionloop.settings import Settings

RETRAIN_DEPLOYMENT = "retrain/retrain"


class RetrainParams(BaseModel):
    """The retrain flow's one parameter; unset (None) training and gate values come from the
    settings when the run starts.

    It lives here rather than next to the flow because the launcher below builds it: a
    deployment run is then checked against the same model before it is queued.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    trigger: str = "manual"
    reason: str = ""
    epochs: int | None = None
    batch: int | None = None
    from_scratch: bool = False
    # The pending run recorded by whoever asked for the retrain; without it one is recorded.
    retraining_run_id: int | None = None
    margin: float | None = None
    tolerance: float | None = None
    primary_metric: str = DEFAULT_PRIMARY_METRIC
    test_percent: int = DEFAULT_TEST_PERCENT
    val_percent: int = DEFAULT_VAL_PERCENT
    notify_webhook_url: str | None = None


@dataclass(frozen=True)
class LaunchedRetrain:
    retraining_run_id: int
    flow_run_id: str


def deployment_parameters(params: RetrainParams) -> dict[str, object]:
    """The deployment run's parameters: only what was set, so the flow's defaults apply."""
    return {"params": params.model_dump(mode="json", exclude_unset=True)}


def launch_retrain(
    session: Session,
    settings: Settings,
    *,
    trigger: str,
    reason: str,
    retraining_run_id: int | None = None,
) -> LaunchedRetrain:
    """Record (or pick up) a pending retraining run and hand it to the retrain deployment.

    The deployment's worker runs it; the run row knows its flow run from here on, so the
    guard can be reconciled with Prefect even if the run never starts.
    """
    from prefect.deployments import run_deployment

    if retraining_run_id is None:
        retraining_run_id = create_run(session, trigger, reason).id
    assert retraining_run_id is not None
    params = RetrainParams(trigger=trigger, reason=reason, retraining_run_id=retraining_run_id)
    with bounded_prefect_calls(settings):
        flow_run = run_deployment(
            RETRAIN_DEPLOYMENT,
            parameters=deployment_parameters(params),
            timeout=0,  # do not wait: training takes minutes to hours
            tags=[f"retraining-run:{retraining_run_id}", f"trigger:{trigger}"],
        )
    update_run(session, retraining_run_id, prefect_flow_run_id=str(flow_run.id))
    return LaunchedRetrain(retraining_run_id, str(flow_run.id))
