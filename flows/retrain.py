"""Retrain flow: export → train → evaluate → promote → notify, one retrain at a time.

    export_flow ─► train_flow ─► evaluate_flow ─► confirm_verdict ─► consume_labels
        ─► promote_challenger (if the verdict says so) ─► record_success ─► announce

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

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict

from flows import server_retries
from flows.evaluate import Evaluation, evaluate_flow
from flows.export import ExportedSnapshot, export_flow
from flows.serving_exports import export_for_serving
from flows.train import TrainedChallenger, train_flow
from training.evaluation import EvalResult
from training.holdout import holdout_status
from training.promotion import promote
from training.retrain_guard import GuardLost, acquire, fail_run, holds, release, update_run
from training.retrain_launcher import RetrainParams
from training.snapshots import get_snapshot, image_hashes, mark_labels_used, read_manifest
from visionloop.db import session_scope
from visionloop.events import EventKind, emit
from visionloop.models import RetrainStatus
from visionloop.notify import notify
from visionloop.registry import CHAMPION, get_alias
from visionloop.settings import get_settings

RETRAIN_CONCURRENCY = "retrain"
LEASE_SECONDS = 60  # Prefect's minimum: a killed run's slot comes back within about a minute


class Verdict(BaseModel):
    """Whether the challenger becomes the champion, with every reason a person reads for it."""

    model_config = ConfigDict(frozen=True)

    promote: bool
    reasons: list[str]


class RetrainMetrics(BaseModel):
    """What a retraining run records as its metrics (``RetrainingRun.metrics``)."""

    model_config = ConfigDict(frozen=True)

    primary_metric: str
    challenger: EvalResult
    champion: EvalResult | None
    champion_version: str | None  # the champion the challenger was compared with
    snapshot_hash: str
    holdout_snapshot_id: int
    holdout_hash: str
    train: dict[str, float]  # the challenger's validation metrics after its last epoch
    holdout_version: int | None = None  # the frozen version both models were judged on
    holdout_pending: int = 0  # test-split images waiting for the next version
    holdout_growth: int | None = None  # how many pending images seal the next version
    by_version: dict[str, dict[str, Any]] = {}  # flows.evaluate.Evaluation.by_version
    interval: dict[str, Any] | None = None  # the bootstrap interval of the mAP50-95 delta
    examples: list[dict[str, Any]] = []  # the images the report draws side by side


class HeldOut(BaseModel):
    """The frozen held-out version an export is judged on (``training.holdout``)."""

    model_config = ConfigDict(frozen=True)

    version: int | None
    previous_id: int | None  # the version before, scored too when this export sealed a new one
    pending: int
    growth: int


class RetrainSummary(BaseModel):
    """What a retrain returns; the notification carries part of it."""

    model_config = ConfigDict(frozen=True)

    retraining_run_id: int
    status: str = RetrainStatus.succeeded.value
    promoted: bool
    challenger_version: str
    champion_version: str | None  # the champion after this run
    reasons: list[str]
    snapshot_id: int
    holdout_hash: str
    mlflow_run_id: str
    metrics: RetrainMetrics

    def verdict(self) -> str:
        if self.promoted:
            return f"version {self.challenger_version} promoted to champion"
        return (
            f"version {self.challenger_version} not promoted; "
            f"champion stays version {self.champion_version}"
        )

    def notification(self) -> dict[str, Any]:
        notified = {
            "retraining_run_id",
            "promoted",
            "challenger_version",
            "champion_version",
            "reasons",
            "holdout_hash",
            "mlflow_run_id",
        }
        return self.model_dump(mode="json", include=notified)


def ensure_concurrency_limit(name: str = RETRAIN_CONCURRENCY, slots: int = 1) -> None:
    """Create (or correct) the Prefect global concurrency limit the retrain flow occupies."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectAlreadyExists

    # ObjectAlreadyExists: a concurrent retrain created it between the read and the create.
    with get_client(sync_client=True) as client, suppress(ObjectAlreadyExists):
        client.upsert_global_concurrency_limit_by_name(name, slots)


@contextmanager
def retrain_slot() -> Iterator[None]:
    """Hold Prefect's one `retrain` slot: a second retrain waits here until the first is done."""
    ensure_concurrency_limit()
    with concurrency(
        RETRAIN_CONCURRENCY,
        occupy=1,
        lease_duration=LEASE_SECONDS,
        strict=True,
        # A renewal hiccup must not kill an hour of training: the database guard still holds.
        raise_on_lease_renewal_failure=False,
    ):
        yield


def _stage(run_id: int, stage: str) -> None:
    get_run_logger().info("retraining run %s: %s", run_id, stage)
    emit(
        EventKind.RETRAIN_STAGE,
        f"retraining run {run_id}: {stage}",
        {"retraining_run_id": run_id, "stage": stage},
    )


def _record(run_id: int, **fields: Any) -> None:
    with session_scope() as session:
        update_run(session, run_id, **fields)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TerminationSignal):
        # Prefect's worker sends SIGTERM to cancel a run (or when its machine shuts down).
        return "the retrain was stopped by SIGTERM (cancelled in Prefect, or its worker shut down)"
    return f"{type(exc).__name__}: {exc}"


def start_run(params: RetrainParams) -> int:
    """Take the database guard for the requested run (or a new one); its id."""
    flow_run_id = flow_run.get_id()
    with session_scope() as session:
        run = acquire(
            session,
            get_settings(),
            trigger=params.trigger,
            reason=params.reason,
            flow_run_id=flow_run_id,
            run_id=params.retraining_run_id,
        )
    assert run.id is not None
    because = f": {params.reason}" if params.reason else ""
    emit(
        EventKind.RETRAIN_STARTED,
        f"retraining run {run.id} started ({params.trigger}{because})",
        {"retraining_run_id": run.id, "trigger": params.trigger, "flow_run_id": flow_run_id},
    )
    return run.id


@contextmanager
def failure_reported(run_id: int, webhook: str | None) -> Iterator[None]:
    """A run that raises (or is cancelled) is failed with its error, lets go of the guard,
    and says so; the exception goes on."""
    try:
        yield
    except BaseException as exc:
        with session_scope() as session:
            failed = fail_run(session, get_settings(), run_id, _describe(exc))
        notify(
            EventKind.RETRAIN_FAILED,
            f"retraining run {run_id} failed: {failed.error}",
            {"retraining_run_id": run_id, "error": failed.error},
            webhook_url=webhook,
            level="error",
        )
        raise


def export_stage(run_id: int, params: RetrainParams) -> tuple[ExportedSnapshot, HeldOut]:
    _stage(run_id, "export")
    exported = export_flow(test_percent=params.test_percent, val_percent=params.val_percent)
    _record(run_id, snapshot_id=exported.snapshot_id)
    return exported, held_out(exported)


@task(cache_policy=NO_CACHE, **server_retries())
def held_out(exported: ExportedSnapshot) -> HeldOut:
    """Where the frozen held-out set stands for this export, read back from its records."""
    with session_scope() as session:
        status = holdout_status(
            session,
            get_settings(),
            get_snapshot(session, exported.snapshot_id),
            get_snapshot(session, exported.holdout_id),
        )
    return HeldOut(**asdict(status))


def train_stage(
    run_id: int, params: RetrainParams, exported: ExportedSnapshot
) -> TrainedChallenger:
    _stage(run_id, "train")
    trained = train_flow(
        snapshot_id=exported.snapshot_id,
        epochs=params.epochs,
        batch=params.batch,
        from_scratch=params.from_scratch,
        trigger=params.trigger,
        retraining_run_id=run_id,
    )
    _record(run_id, model_version=trained.version, mlflow_run_id=trained.run_id)
    return trained


def evaluate_stage(
    run_id: int,
    params: RetrainParams,
    exported: ExportedSnapshot,
    held: HeldOut,
    trained: TrainedChallenger,
) -> Evaluation:
    _stage(run_id, "evaluate")
    return evaluate_flow(
        holdout_snapshot_id=exported.holdout_id,
        challenger_version=trained.version,
        margin=params.margin,
        tolerance=params.tolerance,
        primary_metric=params.primary_metric,
        # A version sealed by this export: the one before keeps the trend comparable.
        earlier_holdout_ids=[held.previous_id] if held.previous_id is not None else None,
    )


@task(cache_policy=NO_CACHE, **server_retries())
def confirm_verdict(run_id: int, evaluation: Evaluation) -> Verdict:
    """The gate's decision, checked again now: a run that lost the guard must not promote,
    and a comparison with a champion someone has moved by hand meanwhile is stale."""
    _stage(run_id, "promote")
    with session_scope() as session:
        if not holds(session, run_id):
            raise GuardLost(f"retraining run {run_id} lost the retrain guard; it must not promote")
    decision = evaluation.decision
    champion = get_alias(get_settings(), CHAMPION)
    current = champion.version if champion else None
    if decision.promote and current != evaluation.champion_version:
        stale = (
            f"Not promoted: the champion changed to version {current} "
            f"while version {evaluation.champion_version} was being compared."
        )
        return Verdict(promote=False, reasons=[*decision.reasons, stale])
    return Verdict(promote=decision.promote, reasons=list(decision.reasons))


@task(cache_policy=NO_CACHE, **server_retries())
def consume_labels(snapshot_id: int) -> None:
    """Consumed labels stop counting as new for the retraining conditions, promoted or not:
    retraining on the same labels would only reach the same verdict."""
    with session_scope() as session:
        manifest = read_manifest(get_settings(), get_snapshot(session, snapshot_id))
        mark_labels_used(session, image_hashes(manifest))


@task(cache_policy=NO_CACHE, **server_retries())
def promote_challenger(run_id: int, version: str) -> None:
    promote(get_settings(), version, reason=f"retraining run {run_id} passed the gate")


@task(cache_policy=NO_CACHE)
def write_retrain_report(run_id: int, snapshot_id: int) -> dict[str, str] | None:
    """The run's report (Markdown and JSON) in the reports bucket and its MLflow run. A run
    that reached its verdict is not failed for want of its report: a failure is logged."""
    from training.retrain_report import write_report

    _stage(run_id, "report")
    settings = get_settings()
    try:
        with session_scope() as session:
            manifest = read_manifest(settings, get_snapshot(session, snapshot_id))
            return write_report(settings, session, run_id, image_hashes(manifest))
    except Exception as exc:  # the report is an account of the run, never a reason to fail it
        get_run_logger().warning(
            "retraining run %s: no report (%s: %s)", run_id, type(exc).__name__, exc
        )
        return None


def record_success(
    run_id: int,
    exported: ExportedSnapshot,
    held: HeldOut,
    trained: TrainedChallenger,
    evaluation: Evaluation,
    verdict: Verdict,
) -> RetrainSummary:
    """Finish the run as succeeded and let go of the guard; what the run returns."""
    metrics = RetrainMetrics(
        primary_metric=evaluation.decision.primary_metric,
        challenger=evaluation.challenger,
        champion=evaluation.champion,
        champion_version=evaluation.champion_version,
        snapshot_hash=exported.snapshot_hash,
        holdout_snapshot_id=exported.holdout_id,
        holdout_hash=exported.holdout_hash,
        train=trained.metrics,
        holdout_version=held.version,
        holdout_pending=held.pending,
        holdout_growth=held.growth,
        by_version=evaluation.by_version,
        interval=evaluation.decision.interval,
        examples=evaluation.examples,
    )
    with session_scope() as session:
        release(
            session,
            run_id,
            status=RetrainStatus.succeeded,
            promoted=verdict.promote,
            decision_reasons=verdict.reasons,
            metrics=metrics.model_dump(mode="json"),
        )
    return RetrainSummary(
        retraining_run_id=run_id,
        promoted=verdict.promote,
        challenger_version=trained.version,
        champion_version=trained.version if verdict.promote else evaluation.champion_version,
        reasons=verdict.reasons,
        snapshot_id=exported.snapshot_id,
        holdout_hash=exported.holdout_hash,
        mlflow_run_id=trained.run_id,
        metrics=metrics,
    )


@task(cache_policy=NO_CACHE, **server_retries())
def announce(summary: RetrainSummary, webhook: str | None) -> None:
    _stage(summary.retraining_run_id, "notify")
    notify(
        EventKind.RETRAIN_FINISHED,
        f"retraining run {summary.retraining_run_id} finished: {summary.verdict()}",
        summary.notification(),
        webhook_url=webhook,
    )


@flow(name="retrain")
def retrain_flow(params: RetrainParams = RetrainParams()) -> RetrainSummary:
    """Export the reviewed labels, train a challenger, judge it against the champion on the
    held-out set, promote it if the gate passes, and notify.

    ``params.retraining_run_id`` picks up a pending run recorded by whoever requested the
    retrain; without it a new run is recorded. Unset training and gate parameters come from
    the settings.
    """
    webhook = params.notify_webhook_url  # None: VISIONLOOP_NOTIFY_WEBHOOK_URL
    with retrain_slot():
        run_id = start_run(params)
        with failure_reported(run_id, webhook):
            exported, held = export_stage(run_id, params)
            trained = train_stage(run_id, params, exported)
            evaluation = evaluate_stage(run_id, params, exported, held, trained)
            verdict = confirm_verdict(run_id, evaluation)
            consume_labels(exported.snapshot_id)
            if verdict.promote:
                promote_challenger(run_id, trained.version)
                export_for_serving(trained.version)
            summary = record_success(run_id, exported, held, trained, evaluation, verdict)
    write_retrain_report(run_id, exported.snapshot_id)
    announce(summary, webhook)
    return summary
