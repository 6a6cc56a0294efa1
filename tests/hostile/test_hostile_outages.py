"""Outages: every client waits a bounded time, names the service that failed, and the flows
pick up where they stopped once the service is back.

The servers are the real ones the session's stack started; they are killed (SIGKILL) or
frozen (SIGSTOP) by PID and always brought back before a test ends.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from samples import good_jpegs
from stack_faults import service_down, signal_service

from cli.stack import Stack, free_port
from visionloop.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parents[2]

# Every task of the deployed flows, sorted by whether it talks to a server. A new task must be
# added to one of the two, which is the decision whether Prefect retries it.
SERVER_TASKS = {
    "flows.bootstrap": {"snapshot_seed_set", "register_champion"},
    "flows.check_retrain": {
        "release_dead_guard",
        "decide",
        "report",
        "record_request",
        "start_retrain",
    },
    "flows.drift": {"measure"},
    "flows.retrain": {
        "held_out",
        "confirm_verdict",
        "consume_labels",
        "promote_challenger",
        "announce",
    },
    "flows.ingest": {"find_new_files", "ingest_files", "queue_uncertain"},
}
# Local work: generating files, or training (CPU-heavy and deterministic: a retry only
# repeats the same minutes). The serving export and the retrain report also talk to servers
# but never fail their run: each catches its own errors, which leave the champion on PyTorch
# or the run without a report, so Prefect has nothing to retry.
LOCAL_TASKS = {
    "flows.bootstrap": {"generate_seed_set", "train_seed_model", "export_for_serving"},
    "flows.retrain": {"export_for_serving", "write_retrain_report"},
}
# Flows that give their tasks the settings' retries when a run starts (``Task.with_options``),
# not in the decorator: their decorators say nothing, so their runs are what is checked
# (``test_ingest_run_retries_its_server_tasks_from_settings``).
RETRIES_AT_RUN = {"flows.ingest"}


def _within(seconds: float, call: Callable[[], Any]) -> tuple[BaseException | None, float]:
    """Run ``call`` in a thread; fail the test if it is still running after ``seconds``.

    A thread, not a signal: the old clients hang in C-level socket reads."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # the error is the result under test
            outcome["error"] = exc

    start = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    elapsed = time.monotonic() - start
    if worker.is_alive():
        pytest.fail(f"still waiting after {seconds:g} s: the client is not bounded")
    return outcome.get("error"), elapsed


@contextmanager
def _silent_listener() -> Iterator[int]:
    """A port that accepts connections and never answers.

    A hung server is a fault of the shared PostgreSQL that cannot be caused here without
    stopping it for everyone else; a listener that never reads stands in for it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


# --- bounded clients, no stack needed ---------------------------------------------------


def test_object_store_down_is_named_within_the_bound() -> None:
    from visionloop.storage import ObjectStore, StorageError

    port = free_port()
    settings = Settings(
        s3_endpoint=f"127.0.0.1:{port}",
        s3_secret_key="unused",
        service_timeout_s=1.0,
        service_retries=2,
    )
    error, elapsed = _within(20, ObjectStore(settings).ping)
    assert isinstance(error, StorageError)
    assert f"the object store at 127.0.0.1:{port} is unavailable" in str(error)
    assert "VISIONLOOP_S3_ENDPOINT" in str(error)
    # A refused connection costs nothing: only urllib3's backoff (0 s, then 2 x 0.5 s).
    assert elapsed < 3.0


def test_database_that_never_answers_is_named_within_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sqlalchemy import text

    from visionloop.db import DatabaseUnavailable, engine_for

    monkeypatch.setenv("VISIONLOOP_SERVICE_TIMEOUT_S", "2")
    get_settings.cache_clear()
    try:
        with _silent_listener() as port:

            def connect() -> None:
                with engine_for(f"postgresql://postgres@127.0.0.1:{port}/db").connect() as conn:
                    conn.execute(text("SELECT 1"))

            error, elapsed = _within(30, connect)
    finally:
        get_settings.cache_clear()
    assert isinstance(error, DatabaseUnavailable), error
    assert f"the database at 127.0.0.1:{port}/db is unavailable" in str(error)
    assert elapsed < 2 + 2  # libpq's connect_timeout, plus the driver's own start


def test_database_at_a_closed_port_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy import text

    from visionloop.db import DatabaseUnavailable, engine_for

    port = free_port()

    def connect() -> None:
        with engine_for(f"postgresql://postgres@127.0.0.1:{port}/db").connect() as conn:
            conn.execute(text("SELECT 1"))

    error, elapsed = _within(15, connect)
    assert isinstance(error, DatabaseUnavailable), error
    assert "VISIONLOOP_DATABASE_URL" in str(error)
    assert elapsed < 5


def test_tasks_that_talk_to_servers_carry_retries_from_settings() -> None:
    deployed = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    modules = sorted(
        {d["entrypoint"].split(":")[0].removesuffix(".py").replace("/", ".") for d in deployed}
    )
    # A fresh interpreter: the decorators read the environment the worker's run would have.
    # Every task a flow module holds counts, wherever its function lives: ingest's batch task
    # wraps a function of ``ingestion.pipeline``.
    script = (
        "import importlib, json, sys\n"
        "from prefect import Task\n"
        "out = {}\n"
        "for name in sys.argv[1:]:\n"
        "    module = importlib.import_module(name)\n"
        "    out[name] = {t.name: [t.retries, t.retry_delay_seconds] for t in vars(module)"
        ".values() if isinstance(t, Task)}\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "VISIONLOOP_TASK_RETRIES": "7", "VISIONLOOP_TASK_RETRY_DELAY_S": "3.5"}
    done = subprocess.run(
        [sys.executable, "-c", script, *modules],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    for module, tasks in found.items():
        server, local = SERVER_TASKS.get(module, set()), LOCAL_TASKS.get(module, set())
        assert set(tasks) == server | local, f"{module}: sort its tasks into SERVER or LOCAL"
        if module in RETRIES_AT_RUN:
            continue
        for name in server:
            assert tasks[name] == [7, 3.5], f"{module}.{name} retries {tasks[name]}"
        for name in local:
            assert not tasks[name][0], f"{module}.{name} should not retry"


@pytest.mark.stack
def test_ingest_run_retries_its_server_tasks_from_settings(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retries Prefect recorded for a real ingest run's tasks are the run's settings."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.ingest import ingest_flow
    from labeling.selection import SelectionPolicy
    from visionloop.storage import ObjectStore

    monkeypatch.setenv("VISIONLOOP_TASK_RETRIES", "7")
    monkeypatch.setenv("VISIONLOOP_TASK_RETRY_DELAY_S", "3.5")
    get_settings.cache_clear()
    try:
        settings = get_settings()
        # One file, so that a batch task runs; a zero budget and no audit queue nothing.
        prefix = "outage-retries/"
        [(name, data)] = good_jpegs(1, seed=417).items()
        ObjectStore(settings).put_bytes(settings.bucket_incoming, prefix + name, data)
        nothing = SelectionPolicy(low=0.0, high=0.0, budget=0, audit_rate=0.0)
        state = ingest_flow(prefix=prefix, selection=nothing, return_state=True)
    finally:
        # Undone before the cache is cleared, so no later test caches these retries.
        monkeypatch.undo()
        get_settings.cache_clear()
    assert state.is_completed(), state
    flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as prefect:
        task_runs = prefect.read_task_runs(flow_run_filter=flow_run)
    policies = {
        run.name.rsplit("-", 1)[0]: [run.empirical_policy.retries, run.empirical_policy.retry_delay]
        for run in task_runs
    }
    assert set(policies) == SERVER_TASKS["flows.ingest"], policies
    for name, policy in policies.items():
        assert policy == [7, 3.5], f"flows.ingest.{name} ran with retries {policy}"


# --- the stack's servers killed mid-flow --------------------------------------------------


@pytest.mark.stack
def test_object_store_frozen_then_killed(stack: Stack, settings: Settings) -> None:
    from visionloop.storage import ObjectStore, StorageError

    quick = settings.model_copy(update={"service_timeout_s": 1.0, "service_retries": 1})
    store = ObjectStore(settings)
    bucket = settings.bucket_reports
    before = {o.key for o in store.list_objects(bucket, prefix="outage/")}

    frozen = signal_service(stack, "s3", signal.SIGSTOP)  # a hung server: it accepts, never answers
    try:
        error, elapsed = _within(
            20, lambda: ObjectStore(quick).put_bytes(bucket, "outage/frozen", b"x")
        )
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    assert isinstance(error, StorageError)
    assert f"the object store at {settings.s3_host} is unavailable" in str(error)
    assert elapsed < 2 * 1.0 * 2 + 1  # 2 attempts, connect + read each, plus the backoff

    with service_down(stack, "s3"):
        error, elapsed = _within(20, lambda: ObjectStore(quick).put_bytes(bucket, "outage/a", b"a"))
        assert isinstance(error, StorageError)
        assert "is unavailable" in str(error)
        assert elapsed < 5

    store = ObjectStore(settings)
    store.put_bytes(bucket, "outage/a", b"a")
    after = {o.key for o in store.list_objects(bucket, prefix="outage/")}
    assert after - before <= {"outage/a", "outage/frozen"} and "outage/a" in after


@pytest.mark.stack
def test_label_studio_killed_mid_label_sync(stack: Stack, settings: Settings) -> None:
    from labeling.provision import LabelStudioError, client
    from labeling.wiring import review_project

    def projects() -> int:
        ls = client(settings.label_studio, settings.label_studio_token)
        return sum(1 for p in ls.projects.list() if p.title == settings.label_studio_project)

    review_project(settings)
    count = projects()
    with service_down(stack, "label-studio"):
        error, elapsed = _within(60, lambda: review_project(settings))
        assert isinstance(error, LabelStudioError), error
        assert f"cannot reach Label Studio at {settings.label_studio}" in str(error)
        # (retries + 1) refused connections and the SDK's backoff: 1 s, 2 s (+ jitter).
        assert elapsed < 10
    review_project(settings)
    assert projects() == count == 1


@pytest.mark.stack
def test_prefect_killed_then_check_retrain_runs_again(stack: Stack, settings: Settings) -> None:
    from sqlmodel import func, select

    from flows.check_retrain import check_and_retrain_flow
    from visionloop.db import session_scope
    from visionloop.models import RetrainingRun

    def runs() -> int:
        with session_scope() as session:
            return session.exec(select(func.count()).select_from(RetrainingRun)).one()

    # The run without Prefect is a process of its own, as the worker starts for each flow run:
    # Prefect names its API only on a process's first call to it, and this test process has
    # called it before whenever another test ran a flow first (it would see a bare
    # ``ConnectError``).
    script = (
        "from flows.check_retrain import check_and_retrain_flow\n"
        "check_and_retrain_flow(dry_run=True)\n"
    )
    before = runs()
    with service_down(stack, "prefect"):
        start = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        elapsed = time.monotonic() - start
        assert done.returncode != 0, "the flow ran without the Prefect API"
        assert f"Failed to reach API at {settings.prefect_api}" in done.stderr, done.stderr[-3000:]
        assert elapsed < 30
    result = check_and_retrain_flow(dry_run=True)
    assert result["launched"] is None
    assert runs() == before


@pytest.mark.stack
def test_mlflow_killed_mid_drift(stack: Stack, settings: Settings) -> None:
    from flows.drift import drift_flow

    with service_down(stack, "mlflow"):
        error, _ = _within(150, drift_flow)
        assert error is not None
        assert "mlflow" in str(error).lower() or settings.mlflow_uri in str(error)
    error, _ = _within(60, drift_flow)
    # Back up: the flow reaches the registry and finds what is there (no champion in this
    # session's stack unless another test made one).
    assert error is None or "no champion" in str(error)
