"""One retrain at a time: the database guard on SQLite and PostgreSQL, and webhook notifications."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session

from cli.stack import free_port
from training import retrain_guard
from training.retrain_guard import RetrainBusy, acquire, create_run, current_holder, release
from visionloop.db import session_scope
from visionloop.models import RetrainingRun, RetrainStatus
from visionloop.settings import Settings, get_settings, load_settings


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with session_scope(engine) as session:
        yield session


@pytest.fixture
def outcomes(monkeypatch: pytest.MonkeyPatch) -> dict[str, str | None]:
    """What Prefect says about each flow run: None while alive, else how it ended."""
    answers: dict[str, str | None] = {}
    monkeypatch.setattr(
        retrain_guard, "flow_run_outcome", lambda flow_run_id: answers.get(flow_run_id)
    )
    return answers


def _get(engine: Engine, run_id: int) -> RetrainingRun:
    """The row as another process sees it (a session of its own)."""
    with session_scope(engine) as session:
        return session.get(RetrainingRun, run_id)


def test_a_second_retrain_is_refused_while_the_first_lives(
    session: Session, engine: Engine, outcomes: dict
) -> None:
    settings = load_settings()
    first = acquire(session, settings, trigger="manual", flow_run_id="flow-a")
    assert first.status == RetrainStatus.running and first.active_lock == retrain_guard.LOCK

    with pytest.raises(RetrainBusy, match=f"retraining run {first.id}"):
        acquire(session, settings, trigger="drift", flow_run_id="flow-b")
    refused = _get(engine, first.id + 1)
    assert refused.status == RetrainStatus.cancelled and f"run {first.id}" in refused.error
    assert current_holder(session).id == first.id

    release(session, first.id, status=RetrainStatus.succeeded, promoted=False)
    third = acquire(session, settings, trigger="labels", flow_run_id="flow-c")
    assert third.active_lock == retrain_guard.LOCK and _get(engine, first.id).active_lock is None


def test_a_dead_holder_is_failed_and_its_guard_released(
    session: Session, engine: Engine, outcomes: dict
) -> None:
    settings = load_settings()
    dead = acquire(session, settings, trigger="manual", flow_run_id="flow-dead")
    outcomes["flow-dead"] = "its Prefect flow run flow-dead ended Crashed: SIGKILL"
    assert retrain_guard.reconcile(session, settings).id == dead.id
    failed = _get(engine, dead.id)
    assert failed.status == RetrainStatus.failed and failed.active_lock is None
    assert "Crashed: SIGKILL" in failed.error and failed.promoted is False and failed.finished_at

    # The same happens on the way in: a new run takes over from a dead holder by itself.
    stale = acquire(session, settings, trigger="manual", flow_run_id="flow-stale")
    outcomes["flow-stale"] = "its Prefect flow run flow-stale no longer exists"
    fresh = acquire(session, settings, trigger="drift", flow_run_id="flow-fresh")
    assert (
        current_holder(session).id == fresh.id
        and _get(engine, stale.id).status == RetrainStatus.failed
    )


def test_a_request_whose_flow_run_never_started_is_failed(
    session: Session, engine: Engine, outcomes: dict
) -> None:
    settings = load_settings()
    queued = create_run(session, "drift", "drift is red")
    retrain_guard.update_run(session, queued.id, prefect_flow_run_id="flow-queued")
    waiting = create_run(session, "manual", "")
    retrain_guard.update_run(session, waiting.id, prefect_flow_run_id="flow-waiting")
    outcomes["flow-queued"] = "its Prefect flow run flow-queued ended Cancelled"
    assert retrain_guard.reconcile(session, settings) is None  # nobody held the guard
    assert _get(engine, queued.id).status == RetrainStatus.failed
    assert "never started" in _get(engine, queued.id).error
    assert _get(engine, waiting.id).status == RetrainStatus.pending  # still queued in Prefect


def test_a_requested_run_is_picked_up_once(session: Session, outcomes: dict) -> None:
    settings = load_settings()
    requested = create_run(session, "manual", "operator asked")
    assert requested.status == RetrainStatus.pending and requested.active_lock is None
    taken = acquire(session, settings, trigger="manual", flow_run_id="flow-x", run_id=requested.id)
    assert taken.id == requested.id and taken.prefect_flow_run_id == "flow-x"
    with pytest.raises(ValueError, match="not pending"):
        acquire(session, settings, trigger="manual", run_id=requested.id)


class _Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.stack
def test_notifications_reach_the_webhook_and_never_raise(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from visionloop.events import recent
    from visionloop.notify import notify

    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hooks/secret-token"
        # Without a URL of its own, the notification goes to VISIONLOOP_NOTIFY_WEBHOOK_URL.
        monkeypatch.setenv("VISIONLOOP_NOTIFY_WEBHOOK_URL", url)
        get_settings.cache_clear()
        assert notify("retrain.failed", "run 3 failed", {"retraining_run_id": 3}, level="error")
        assert _Hook.received[-1]["kind"] == "retrain.failed"
        assert _Hook.received[-1]["level"] == "error"
        monkeypatch.delenv("VISIONLOOP_NOTIFY_WEBHOOK_URL")
        get_settings.cache_clear()
        assert notify("retrain.finished", "version 7 promoted", {"version": "7"}, webhook_url=url)
    finally:
        server.shutdown()
    assert _Hook.received[-1]["kind"] == "retrain.finished"
    assert _Hook.received[-1]["payload"] == {"version": "7"}

    dead = f"http://127.0.0.1:{free_port()}/hooks/secret-token"
    assert (
        notify("retrain.finished", "version 8 promoted", {}, webhook_url=dead, timeout=2) is False
    )
    warning = recent(kind_prefix="notification.failed")[0]
    assert warning.level == "warning" and "secret-token" not in warning.message
    assert "after 4 attempts" in warning.message and warning.payload["attempts"] == 4
    assert recent(kind_prefix="retrain.finished")[0].message == "version 8 promoted"
