"""One retrain at a time: a database guard on ``RetrainingRun.active_lock``, kept true by Prefect.

A run holds the guard while its ``active_lock`` is ``LOCK``; the column's unique index makes a
second holder impossible whatever the callers do. A holder that dies without releasing (a
SIGKILL, a lost machine) cannot clean up after itself, so before refusing a new run the guard
asks Prefect about the holder's flow run (Prefect owns that fact): once the flow run is over
(crashed, cancelled, failed, or gone) the holder is marked failed and the guard released.
Prefect's own global concurrency limit (see ``flows/retrain.py``) queues retrains in front of
this guard; the guard is what still holds when that limit is bypassed or its lease lapses.

Each function takes the caller's session but commits its own changes at once: the run rows
are how processes coordinate, so a half-held guard must never wait on a caller's transaction.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from training.prefect_calls import bounded_prefect_calls
from visionloop.models import RetrainingRun, RetrainStatus
from visionloop.settings import Settings, get_settings

LOCK = "retrain"
log = logging.getLogger(__name__)


class RetrainBusy(RuntimeError):
    """Another retrain holds the guard and its flow run is still alive."""

    def __init__(self, holder: RetrainingRun) -> None:
        self.holder = holder
        super().__init__(
            f"retraining run {holder.id} (Prefect flow run {holder.prefect_flow_run_id}) is still "
            "running; only one retrain runs at a time"
        )


class GuardLost(RuntimeError):
    """This run no longer holds the guard (it was reconciled as dead): it must not promote."""


def _now() -> datetime:
    return datetime.now(UTC)


def _commit(session: Session) -> None:
    """Commit at once: a run row is how processes coordinate, so another process must see a
    change now, not when the caller's transaction ends. A refused commit leaves the session
    usable (rolled back) for the caller's next step."""
    try:
        session.commit()
    except BaseException:
        session.rollback()
        raise


def _fresh(session: Session, run_id: int) -> RetrainingRun | None:
    # Read from the database, not the session's identity map: another process may have
    # changed the row (released the guard, failed the run) since this session loaded it.
    return session.get(RetrainingRun, run_id, populate_existing=True)


def create_run(session: Session, trigger: str, reason: str = "") -> RetrainingRun:
    """A pending retraining run: a request the API or the conditions record before launching."""
    run = RetrainingRun(trigger=trigger, reason=reason)
    session.add(run)
    _commit(session)
    return run


def current_holder(session: Session) -> RetrainingRun | None:
    query = select(RetrainingRun).where(RetrainingRun.active_lock == LOCK)
    return session.exec(query.execution_options(populate_existing=True)).first()


def holds(session: Session, run_id: int) -> bool:
    run = _fresh(session, run_id)
    return run is not None and run.active_lock == LOCK


def update_run(session: Session, run_id: int, **fields: Any) -> RetrainingRun:
    """Set ``fields`` on run ``run_id`` and commit them (see ``_commit``)."""
    run = _fresh(session, run_id)
    if run is None:
        raise LookupError(f"no retraining run {run_id}")
    for name, value in fields.items():
        setattr(run, name, value)
    session.add(run)
    _commit(session)
    return run


def _require_pending(session: Session, run_id: int) -> None:
    existing = _fresh(session, run_id)
    if existing is None:
        raise LookupError(f"no retraining run {run_id}")
    if existing.status != RetrainStatus.pending:
        raise ValueError(
            f"retraining run {run_id} is {RetrainStatus(existing.status).value}, not pending"
        )


def acquire(
    session: Session,
    settings: Settings,
    *,
    trigger: str,
    reason: str = "",
    flow_run_id: str | None = None,
    run_id: int | None = None,
) -> RetrainingRun:
    """Take the guard for run ``run_id`` (a pending row) or for a new run; ``RetrainBusy`` if held.

    A refused run is recorded as cancelled, with the holder named in its error. Every step
    commits on its own (see ``_commit``): the guard is only a guard once others can see it.
    """
    if run_id is None:
        run_id = create_run(session, trigger, reason).id
    else:
        _require_pending(session, run_id)
    assert run_id is not None
    for _ in range(3):
        try:
            return update_run(
                session,
                run_id,
                active_lock=LOCK,
                status=RetrainStatus.running,
                started_at=_now(),
                prefect_flow_run_id=flow_run_id,
                error=None,
            )
        except IntegrityError:
            holder = current_holder(session)
            if holder is not None and reconcile(session, settings) is None:
                busy = RetrainBusy(holder)
                update_run(
                    session,
                    run_id,
                    status=RetrainStatus.cancelled,
                    finished_at=_now(),
                    error=str(busy),
                )
                raise busy from None
            # The holder was dead (now released) or finished meanwhile: try again.
    raise RuntimeError(f"could not take the retrain guard for run {run_id}")  # pragma: no cover


def release(
    session: Session,
    run_id: int,
    *,
    status: RetrainStatus,
    error: str | None = None,
    **fields: Any,
) -> RetrainingRun:
    """Finish run ``run_id`` with ``status`` and free the guard in one committed update."""
    return update_run(
        session, run_id, status=status, error=error, finished_at=_now(), active_lock=None, **fields
    )


def flow_run_outcome(flow_run_id: str) -> str | None:
    """None while the Prefect flow run can still finish; else a sentence saying how it ended."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    # Reconciling runs inside requests and flows: an unreachable Prefect must fail it quickly,
    # by name, not hang them on Prefect's own 60 s x 5 retries.
    with bounded_prefect_calls(get_settings()), get_client(sync_client=True) as client:
        try:
            flow_run = client.read_flow_run(UUID(flow_run_id))
        except ObjectNotFound:
            return f"its Prefect flow run {flow_run_id} no longer exists"
    state = flow_run.state
    if state is None or not state.is_final():
        return None
    message = f": {state.message}" if state.message else ""
    return f"its Prefect flow run {flow_run_id} ended {state.name}{message}"


def reconcile(session: Session, settings: Settings) -> RetrainingRun | None:
    """Make the guard agree with Prefect; returns the holder it failed, if any.

    The guard's holder is failed and released once its flow run is over. A holder without a
    flow run id is left alone: nothing says whether it is alive. Pending runs whose flow run
    ended before taking the guard (it crashed at start, or was cancelled while queued) are
    failed as well, so a request never waits forever.
    """
    _fail_pending_that_never_started(session)
    holder = current_holder(session)
    if holder is None or not holder.prefect_flow_run_id:
        return None
    outcome = flow_run_outcome(holder.prefect_flow_run_id)
    if outcome is None:
        return None
    log.warning("retraining run %s held the retrain guard but %s; releasing it", holder.id, outcome)
    return fail_run(
        session, settings, holder.id, f"the retrain stopped without finishing: {outcome}"
    )


def _fail_pending_that_never_started(session: Session) -> None:
    pending = session.exec(
        select(RetrainingRun).where(
            RetrainingRun.status == RetrainStatus.pending,
            RetrainingRun.prefect_flow_run_id.is_not(None),
        )
    ).all()
    for run in pending:
        outcome = flow_run_outcome(run.prefect_flow_run_id)
        if outcome is None:
            continue
        # Only if it is still pending: it may have taken the guard since we looked.
        session.exec(  # type: ignore[call-overload]
            update(RetrainingRun)
            .where(RetrainingRun.id == run.id, RetrainingRun.status == RetrainStatus.pending)
            .values(
                status=RetrainStatus.failed,
                error=f"the retrain never started: {outcome}",
                finished_at=_now(),
            )
        )
        _commit(session)


def fail_run(session: Session, settings: Settings, run_id: int, error: str) -> RetrainingRun:
    """Mark a run failed and release the guard; undo what it left half done.

    A failed run never promotes: if the champion alias already points at this run's model
    version (it died between promoting and recording success), the champion goes back.
    Its MLflow run, if still RUNNING (a killed process cannot end it), is ended FAILED.
    Cleanup failures are added to the error, never raised: the guard is released regardless.
    """
    run = _fresh(session, run_id)
    if run is None:
        raise LookupError(f"no retraining run {run_id}")
    notes = _undo_half_done(settings, run, error)
    full_error = error + (f" ({'; '.join(notes)})" if notes else "")
    return release(session, run_id, status=RetrainStatus.failed, error=full_error, promoted=False)


def _undo_half_done(settings: Settings, run: RetrainingRun, error: str) -> list[str]:
    """Move the champion back from ``run``'s version and end its MLflow run; returns notes on
    what was done or could not be."""
    from visionloop.registry import CHAMPION, PREVIOUS, client, get_alias, set_alias

    notes: list[str] = []
    try:
        champion = get_alias(settings, CHAMPION) if run.model_version else None
        if champion is not None and champion.version == run.model_version:
            previous = get_alias(settings, PREVIOUS)
            if previous is not None and previous.version != run.model_version:
                set_alias(settings, CHAMPION, previous.version)
                notes.append(f"champion moved back to version {previous.version}")
        if run.mlflow_run_id:
            mlflow = client(settings)
            if mlflow.get_run(run.mlflow_run_id).info.status == "RUNNING":
                mlflow.set_tag(run.mlflow_run_id, "visionloop.error", error[:5000])
                mlflow.set_terminated(run.mlflow_run_id, status="FAILED")
    except Exception as exc:
        notes.append(f"cleanup incomplete: {type(exc).__name__}: {exc}")
    return notes
