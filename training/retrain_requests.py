"""Retraining as a person sees it: what runs now, what ran before, and asking for a retrain by hand.

A run blocks a new request while it holds the retrain guard, and also while it is launched
but still queued in Prefect (pending, with a flow run): a second click on "retrain" must not
queue a second retrain behind the first. Both are reconciled with Prefect first, so a run
whose flow run died never blocks anyone.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlmodel import Session, col, func, select

from training.retrain_guard import RetrainBusy, create_run, current_holder, reconcile, update_run
from training.retrain_launcher import RETRAIN_DEPLOYMENT, LaunchedRetrain
from visionloop.events import EventKind, emit
from visionloop.models import ActivityEvent, RetrainingRun, RetrainStatus
from visionloop.settings import Settings

log = logging.getLogger(__name__)

MANUAL = "manual"
FINISHED = (RetrainStatus.succeeded, RetrainStatus.failed, RetrainStatus.cancelled)
_request_lock = threading.Lock()  # one check-then-launch at a time per process (double clicks)
STALE_NOTE = (
    "the state is what the platform database last recorded; a run whose Prefect flow run "
    "has ended is reconciled by the next trigger or check-retrain run"
)


class LaunchFailed(RuntimeError):
    """The retrain deployment could not be started; the request was recorded as cancelled."""


@dataclass(frozen=True)
class Progress:
    stage: str | None  # export | train | evaluate | promote | notify
    epoch: int | None
    epochs: int | None
    metrics: dict[str, float]


@dataclass(frozen=True)
class RetrainingStatus:
    state: str  # idle | queued | running
    current: RetrainingRun | None
    progress: Progress | None
    last_finished: RetrainingRun | None
    state_note: str | None  # set while a run is current: its state may lag behind Prefect's

    @property
    def job_status(self) -> str:
        """idle | running | completed | failed: the one-word answer "how is retraining doing",
        where a queued run already counts as running and a cancelled one as failed."""
        if self.current is not None:
            return "running"
        if self.last_finished is None:
            return "idle"
        return "completed" if self.last_finished.status == RetrainStatus.succeeded else "failed"


def _now() -> datetime:
    return datetime.now(UTC)


def launched_pending(session: Session) -> RetrainingRun | None:
    """The oldest request handed to Prefect that has not taken the guard yet."""
    return session.exec(
        select(RetrainingRun)
        .where(
            RetrainingRun.status == RetrainStatus.pending,
            col(RetrainingRun.prefect_flow_run_id).is_not(None),
        )
        .order_by(col(RetrainingRun.id))
        .limit(1)
    ).first()


def blocking_run(session: Session, settings: Settings) -> RetrainingRun | None:
    """The run that keeps a new retrain from starting, after reconciling with Prefect."""
    reconcile(session, settings)
    return current_holder(session) or launched_pending(session)


def request_retrain(
    session: Session, settings: Settings, reason: str, launcher: Callable[..., LaunchedRetrain]
) -> LaunchedRetrain:
    """Record a manual request and start the retrain deployment for it; ``RetrainBusy`` if one
    runs. ``launcher`` is ``launch_retrain`` or a stand-in with its signature."""
    with _request_lock:
        busy = blocking_run(session, settings)
        if busy is not None:
            raise RetrainBusy(busy)
        run = create_run(session, MANUAL, reason)
        assert run.id is not None
        try:
            launched = launcher(
                session, settings, trigger=MANUAL, reason=reason, retraining_run_id=run.id
            )
        except Exception as exc:
            # Cancelled, not failed: a request that never started must not start the cooldown.
            error = (
                f"could not start the Prefect deployment {RETRAIN_DEPLOYMENT}: "
                f"{type(exc).__name__}: {exc}"
            )
            update_run(
                session, run.id, status=RetrainStatus.cancelled, finished_at=_now(), error=error
            )
            raise LaunchFailed(error) from exc
    emit(
        EventKind.RETRAIN_REQUESTED,
        f"retrain requested by hand (run {launched.retraining_run_id})"
        + (f": {reason}" if reason else ""),
        {
            "retraining_run_id": launched.retraining_run_id,
            "flow_run_id": launched.flow_run_id,
            "reason": reason,
        },
    )
    return launched


def _latest_payload(
    session: Session, kind: EventKind, run_id: int, scan: int
) -> dict[str, Any] | None:
    """The payload of the newest ``kind`` event about run ``run_id`` among the newest ``scan``."""
    rows = session.exec(
        select(ActivityEvent)
        .where(ActivityEvent.kind == kind.value)
        .order_by(col(ActivityEvent.id).desc())
        .limit(scan)
    )
    return next((e.payload for e in rows if e.payload.get("retraining_run_id") == run_id), None)


def _progress(session: Session, run_id: int, scan: int = 500) -> Progress:
    """The run's latest stage and epoch, from its activity events."""
    stage = _latest_payload(session, EventKind.RETRAIN_STAGE, run_id, scan)
    epoch = _latest_payload(session, EventKind.TRAINING_EPOCH, run_id, scan)
    not_metrics = ("epoch", "epochs", "retraining_run_id", "snapshot_id")
    metrics = {
        k: float(v)
        for k, v in (epoch or {}).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in not_metrics
    }
    return Progress(
        stage=stage.get("stage") if stage else None,
        epoch=int(epoch["epoch"]) if epoch else None,
        epochs=int(epoch["epochs"]) if epoch else None,
        metrics=metrics,
    )


def _last_finished(session: Session) -> RetrainingRun | None:
    return session.exec(
        select(RetrainingRun)
        .where(col(RetrainingRun.status).in_(FINISHED), col(RetrainingRun.finished_at).is_not(None))
        .order_by(col(RetrainingRun.finished_at).desc(), col(RetrainingRun.id).desc())
        .limit(1)
    ).first()


def retraining_status(session: Session) -> RetrainingStatus:
    """What the database says about retraining, read only.

    Nothing here asks Prefect or writes: anyone may read the status, and reconciling (failing
    a dead run, moving the champion back) is for the trigger and the check-retrain flow. So a
    run whose flow run died still shows as queued or running until one of those runs.
    """
    holder = current_holder(session)
    current = holder or launched_pending(session)
    state = "running" if holder else "queued" if current else "idle"
    progress = (
        _progress(session, current.id) if current is not None and current.id is not None else None
    )
    note = STALE_NOTE if current is not None else None
    return RetrainingStatus(state, current, progress, _last_finished(session), note)


def retraining_history(
    session: Session,
    *,
    limit: int,
    offset: int,
    status: str | None = None,
    trigger: str | None = None,
) -> tuple[int, list[RetrainingRun]]:
    """A page of retraining runs, newest first, and how many match in all."""
    query = select(RetrainingRun)
    if status:
        query = query.where(RetrainingRun.status == status)
    if trigger:
        query = query.where(RetrainingRun.trigger == trigger)
    total = session.exec(select(func.count()).select_from(query.subquery())).one()
    rows = session.exec(
        query.order_by(col(RetrainingRun.id).desc()).offset(offset).limit(limit)
    ).all()
    return int(total), list(rows)
