"""Retrain flow: export → train → evaluate → promote → notify, one retrain at a time.

Two guards keep retrains apart. Prefect's global concurrency limit ``retrain`` (one slot)
queues a second retrain until the first is done; its lease is renewed while the run lives
and lapses about a minute after the process dies. Inside it, the database guard
(``training.retrain_guard``) is what makes two holders impossible even when the Prefect
limit is bypassed, and what a crashed or cancelled run's record is reconciled through.

A run that raises (or is cancelled: Prefect turns SIGTERM into an exception) is marked failed
with its error and releases the guard on the way out; a run killed outright is failed and
released by the next ``retrain_guard.reconcile`` once Prefect reports its flow run over.
Either way a failed run never promotes: the promote step re-checks that it still holds the
guard, and failing a run moves `champion` back if it had already moved.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.concurrency.sync import concurrency
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run

from flows.evaluate import evaluate_flow
from flows.export import export_flow
from flows.train import train_flow
from monitoring.notify import notify
from training.gate import DEFAULT_PRIMARY_METRIC
from training.promotion import promote
from training.retrain_guard import GuardLost, acquire, fail_run, holds, release, update_run
from training.snapshots import get_snapshot, image_hashes, mark_labels_used, read_manifest
from visionloop.db import get_engine
from visionloop.events import EventKind, emit
from visionloop.formats import DEFAULT_TEST_PERCENT, DEFAULT_VAL_PERCENT
from visionloop.models import RetrainingRun, RetrainStatus
from visionloop.registry import CHAMPION, get_alias
from visionloop.settings import Settings, get_settings

RETRAIN_CONCURRENCY = "retrain"
LEASE_SECONDS = 60  # Prefect's minimum: a killed run's slot comes back within about a minute
DEFAULT_WEBHOOK_URL = ""  # until settings carry VISIONLOOP_NOTIFY_WEBHOOK_URL


def ensure_concurrency_limit(name: str = RETRAIN_CONCURRENCY, slots: int = 1) -> None:
    """Create (or correct) the Prefect global concurrency limit the retrain flow occupies."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(name, slots)
        except ObjectAlreadyExists:
            pass  # created by a concurrent retrain between the read and the create


def _stage(run: RetrainingRun, stage: str) -> None:
    get_run_logger().info("retraining run %s: %s", run.id, stage)
    emit(
        EventKind.RETRAIN_STAGE,
        f"retraining run {run.id}: {stage}",
        {"retraining_run_id": run.id, "stage": stage},
    )


def _retrain(
    settings: Settings,
    run: RetrainingRun,
    *,
    epochs: int | None,
    batch: int | None,
    from_scratch: bool,
    margin: float | None,
    tolerance: float | None,
    primary_metric: str,
    test_percent: int,
    val_percent: int,
) -> dict[str, Any]:
    _stage(run, "export")
    exported = export_flow(test_percent=test_percent, val_percent=val_percent)
    update_run(run.id, snapshot_id=exported["snapshot_id"])

    _stage(run, "train")
    trained = train_flow(
        snapshot_id=exported["snapshot_id"],
        epochs=epochs,
        batch=batch,
        from_scratch=from_scratch,
        trigger=run.trigger,
        retraining_run_id=run.id,
    )
    update_run(run.id, model_version=trained["version"], mlflow_run_id=trained["run_id"])

    _stage(run, "evaluate")
    evaluation = evaluate_flow(
        holdout_snapshot_id=exported["holdout_id"],
        challenger_version=trained["version"],
        margin=margin,
        tolerance=tolerance,
        primary_metric=primary_metric,
    )
    decision = evaluation["decision"]
    reasons = list(decision["reasons"])

    _stage(run, "promote")
    if not holds(run.id):
        raise GuardLost(f"retraining run {run.id} lost the retrain guard; it must not promote")
    promote_it = decision["promote"]
    champion = get_alias(settings, CHAMPION)
    if promote_it and (champion.version if champion else None) != evaluation["champion_version"]:
        promote_it = False  # someone moved the champion by hand: the comparison is stale
        reasons.append(
            "Not promoted: the champion changed to version "
            f"{champion.version if champion else None} "
            f"while version {evaluation['champion_version']} was being compared."
        )
    # Consumed labels stop counting as new for the retraining conditions, promoted or not:
    # retraining on the same labels would only reach the same verdict.
    mark_labels_used(
        get_engine(), image_hashes(read_manifest(settings, get_snapshot(exported["snapshot_id"])))
    )
    if promote_it:
        promote(settings, trained["version"], reason=f"retraining run {run.id} passed the gate")
    metrics = {
        "primary_metric": primary_metric,
        "challenger": evaluation["challenger"],
        "champion": evaluation["champion"],
        "champion_version": evaluation["champion_version"],
        "snapshot_hash": exported["snapshot_hash"],
        "holdout_snapshot_id": exported["holdout_id"],
        "holdout_hash": exported["holdout_hash"],
        "train": trained["metrics"],
    }
    release(
        run.id,
        status=RetrainStatus.succeeded,
        promoted=promote_it,
        decision_reasons=reasons,
        metrics=metrics,
    )
    return {
        "retraining_run_id": run.id,
        "status": RetrainStatus.succeeded.value,
        "promoted": promote_it,
        "challenger_version": trained["version"],
        "champion_version": trained["version"] if promote_it else evaluation["champion_version"],
        "reasons": reasons,
        "snapshot_id": exported["snapshot_id"],
        "holdout_hash": exported["holdout_hash"],
        "mlflow_run_id": trained["run_id"],
        "metrics": metrics,
    }


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TerminationSignal):
        # Prefect's worker sends SIGTERM to cancel a run (or when its machine shuts down).
        return "the retrain was stopped by SIGTERM (cancelled in Prefect, or its worker shut down)"
    return f"{type(exc).__name__}: {exc}"


@flow(name="retrain")
def retrain_flow(
    trigger: str = "manual",
    reason: str = "",
    epochs: int | None = None,
    batch: int | None = None,
    from_scratch: bool = False,
    retraining_run_id: int | None = None,
    margin: float | None = None,
    tolerance: float | None = None,
    primary_metric: str = DEFAULT_PRIMARY_METRIC,
    test_percent: int = DEFAULT_TEST_PERCENT,
    val_percent: int = DEFAULT_VAL_PERCENT,
    notify_webhook_url: str | None = None,
) -> dict[str, Any]:
    """Export the reviewed labels, train a challenger, judge it against the champion on the
    held-out set, promote it if the gate passes, and notify.

    ``retraining_run_id`` picks up a pending run recorded by whoever requested the retrain;
    without it a new run is recorded. Unset training and gate parameters come from settings.
    """
    settings = get_settings()
    webhook = DEFAULT_WEBHOOK_URL if notify_webhook_url is None else notify_webhook_url
    ensure_concurrency_limit()
    flow_run_id = flow_run.get_id()
    with concurrency(
        RETRAIN_CONCURRENCY,
        occupy=1,
        lease_duration=LEASE_SECONDS,
        strict=True,
        # A renewal hiccup must not kill an hour of training: the database guard still holds.
        raise_on_lease_renewal_failure=False,
    ):
        run = acquire(
            settings,
            trigger=trigger,
            reason=reason,
            flow_run_id=flow_run_id,
            run_id=retraining_run_id,
        )
        emit(
            EventKind.RETRAIN_STARTED,
            f"retraining run {run.id} started ({trigger}{': ' + reason if reason else ''})",
            {"retraining_run_id": run.id, "trigger": trigger, "flow_run_id": flow_run_id},
        )
        try:
            summary = _retrain(
                settings,
                run,
                epochs=epochs,
                batch=batch,
                from_scratch=from_scratch,
                margin=margin,
                tolerance=tolerance,
                primary_metric=primary_metric,
                test_percent=test_percent,
                val_percent=val_percent,
            )
        except BaseException as exc:
            failed = fail_run(settings, run.id, _describe(exc))
            notify(
                EventKind.RETRAIN_FAILED,
                f"retraining run {run.id} failed: {failed.error}",
                {"retraining_run_id": run.id, "error": failed.error},
                webhook_url=webhook,
                level="error",
            )
            raise

    _stage(run, "notify")
    verdict = (
        f"version {summary['challenger_version']} promoted to champion"
        if summary["promoted"]
        else f"version {summary['challenger_version']} not promoted; "
        f"champion stays version {summary['champion_version']}"
    )
    notify(
        EventKind.RETRAIN_FINISHED,
        f"retraining run {run.id} finished: {verdict}",
        {
            k: summary[k]
            for k in (
                "retraining_run_id",
                "promoted",
                "challenger_version",
                "champion_version",
                "reasons",
                "holdout_hash",
                "mlflow_run_id",
            )
        },
        webhook_url=webhook,
    )
    return summary
