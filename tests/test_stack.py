"""`visionloop up | status | down`: the service definitions, then the real servers."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import psutil
import pytest

from cli.stack import SERVICE_ORDER, ServiceSpec, Stack, StackError, free_port, prefect_call
from monitoring.health import PROBES
from visionloop.settings import load_settings


def _specs(tmp_path: Path, **overrides: object) -> dict[str, ServiceSpec]:
    stack = Stack(load_settings(data_dir=tmp_path / "state", **overrides))
    return {spec.name: spec for spec in stack.specs()}


def test_specs_come_in_start_up_order_each_with_its_probe(tmp_path: Path) -> None:
    specs = _specs(tmp_path)
    assert list(specs) == SERVICE_ORDER
    assert SERVICE_ORDER == ["s3", "prefect", "mlflow", "label-studio", "api", "worker"]
    assert all(name in PROBES for name in specs)
    # Only Label Studio installs itself before its first start.
    assert [name for name, spec in specs.items() if spec.install] == ["label-studio"]


def test_seaweedfs_components_avoid_configured_ports_and_their_grpc_ports(tmp_path: Path) -> None:
    s3 = _specs(tmp_path)["s3"]
    settings = load_settings(data_dir=tmp_path / "state")
    configured = {
        settings.s3_port,
        settings.prefect_port,
        settings.mlflow_port,
        settings.label_studio_port,
        settings.api_port,
    }
    internal = [
        int(arg.split("=")[1])
        for arg in s3.command
        for component in ("master", "volume", "filer", "admin")
        if arg.startswith(f"-{component}.port=")
    ]
    assert len(internal) == 4
    grpc = {port + 10000 for port in internal}
    assert len(set(internal) | grpc) == 8
    assert not (set(internal) | grpc) & (configured | {p + 10000 for p in configured})
    assert f"-s3.port={settings.s3_port}" in s3.command


def test_a_url_setting_makes_its_service_external(tmp_path: Path) -> None:
    specs = _specs(tmp_path, mlflow_tracking_uri="http://127.0.0.1:1")
    assert specs["mlflow"].external_setting == "VISIONLOOP_MLFLOW_TRACKING_URI"
    assert specs["prefect"].external_setting == ""


@pytest.mark.stack
def test_status_reports_every_service_healthy_with_latency(stack: Stack) -> None:
    states = stack.status()
    assert {s.name for s in states} == {
        "database",
        "s3",
        "prefect",
        "mlflow",
        "label-studio",
        "api",
        "worker",
    }
    for state in states:
        assert state.health is not None and state.health.ok, f"{state.name}: {state.health}"
        assert state.health.latency_ms > 0


@pytest.mark.stack
def test_status_cli_prints_each_service(stack: Stack) -> None:
    env = {**os.environ, **stack.platform_env()}
    done = subprocess.run(
        [sys.executable, "-m", "cli.app", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("database", "s3", "prefect", "mlflow", "label-studio", "api", "worker"):
        assert name in done.stdout
    assert " ms " in done.stdout


@pytest.mark.stack
def test_second_up_reuses_running_services(stack: Stack) -> None:
    before = {name: stack.running_pid(name) for name in SERVICE_ORDER}
    assert all(before.values()), before
    states = Stack(load_settings()).up()
    assert {s.name: s.action for s in states} == {name: "reused" for name in SERVICE_ORDER}
    assert {name: stack.running_pid(name) for name in SERVICE_ORDER} == before


@pytest.mark.stack
def test_second_up_rewrites_the_one_webhook_in_place_with_the_webhook_secret(
    stack: Stack,
) -> None:
    from labeling.wiring import ensure_webhook, review_project, webhook_url

    s = stack.settings
    project = review_project(s)
    hook_id = ensure_webhook(s, project)
    # An install from before the webhook had its own secret: the API token in its headers.
    stale = {"Authorization": f"Bearer {s.api_token.get_secret_value()}"}
    project.ls.webhooks.update(id=hook_id, url=webhook_url(s), headers=stale)
    token = s.label_studio_token.get_secret_value()
    with httpx.Client(
        base_url=s.label_studio, headers={"Authorization": f"Token {token}"}, timeout=30
    ) as ls:

        def hooks() -> list[dict]:
            return ls.get("/api/webhooks/", params={"project": project.id}).json()

        before = hooks()
        Stack(load_settings()).up()
        after = hooks()
    # Rewritten where it was, not added beside it: Label Studio would call both.
    assert sorted(h["id"] for h in after) == sorted(h["id"] for h in before)
    ours = [h for h in after if h["url"] == webhook_url(s)]
    assert [h["id"] for h in ours] == [hook_id]
    assert ours[0]["headers"] == {"Authorization": f"Bearer {s.webhook_secret.get_secret_value()}"}


@pytest.mark.stack
def test_registering_deployments_waits_out_a_busy_prefect_database(stack: Stack) -> None:
    """Prefect answers 503 while its SQLite database is locked, as it is when its scheduler
    writes a burst of runs right after a deploy; `up` waits that out instead of failing."""
    settings = stack.settings
    deployment = prefect_call(settings, "POST", "deployments/filter", body={"limit": 1}).json()[0]
    path = f"deployments/{deployment['id']}"
    prefect_call(settings, "PATCH", path, body={"paused": False}).raise_for_status()

    lock = sqlite3.connect(stack.root / "prefect" / "prefect.db", check_same_thread=False)
    lock.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(15.0, lock.rollback)
    release.start()
    try:
        # A plain call, without prefect_call's patience.
        busy = httpx.patch(f"{settings.prefect_api}/{path}", json={"paused": True}, timeout=60)
        assert busy.status_code == 503, busy.text  # the fault is real, not assumed
        stack._match_pauses_to_schedules()
    finally:
        release.join()
        lock.close()
    assert prefect_call(settings, "GET", path).json()["paused"] is True


@pytest.mark.stack
def test_api_reports_dependency_health(stack: Stack) -> None:
    body = httpx.get(f"{stack.settings.api_url}/api/system/health", timeout=30).json()
    assert body["healthy"] is True, body
    assert {s["name"] for s in body["services"]} == {
        "database",
        "s3",
        "prefect",
        "mlflow",
        "label-studio",
    }


def _isolated(tmp_path: Path, **env: str) -> Stack:
    """A second stack in its own data dir and ports, for tests that start or break things."""
    overrides = {
        "data_dir": tmp_path / "state",
        "s3_port": free_port(),
        "prefect_port": free_port(),
        "mlflow_port": free_port(),
        "label_studio_port": free_port(),
        "api_port": free_port(),
        "s3_secret_key": "",
        "api_token": "",
        "label_studio_password": "",
        "label_studio_token": "",
    }
    overrides.update(env)
    return Stack(load_settings(**overrides))


@pytest.mark.stack
def test_port_in_use_names_port_and_setting(stack: Stack, tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        isolated = _isolated(tmp_path, prefect_port=port)
        with pytest.raises(
            StackError, match=rf"port {port} for prefect .* VISIONLOOP_PREFECT_PORT"
        ):
            isolated.up(only=["prefect"])
    assert isolated.running_pid("prefect") is None


@pytest.mark.stack
def test_unreachable_external_server_names_the_setting(stack: Stack, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    isolated = _isolated(tmp_path, mlflow_tracking_uri=dead)
    with pytest.raises(StackError, match=rf"mlflow at {dead} .*VISIONLOOP_MLFLOW_TRACKING_URI"):
        isolated.up(only=["mlflow"])


@pytest.mark.stack
def test_wrong_label_studio_token_names_the_setting(stack: Stack, tmp_path: Path) -> None:
    s = stack.settings
    isolated = _isolated(
        tmp_path, label_studio_url=s.label_studio, label_studio_token="not-a-token"
    )
    with pytest.raises(Exception, match="VISIONLOOP_LABEL_STUDIO_TOKEN"):
        isolated.up(only=["label-studio"])


@pytest.mark.stack
def test_down_stops_only_what_up_started(stack: Stack, tmp_path: Path) -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    isolated = _isolated(tmp_path)
    try:
        isolated.up(only=["s3", "prefect"])
        pids = {name: isolated.running_pid(name) for name in ("s3", "prefect")}
        assert all(pids.values())
        family = [
            p
            for pid in pids.values()
            for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        ]
        states = isolated.down()
        assert {s.name: s.action for s in states if s.name in pids} == {
            "s3": "stopped",
            "prefect": "stopped",
        }
        assert not [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not list((isolated.root / "run").glob("*.json"))
        # The session's own stack and unrelated processes are untouched.
        assert bystander.poll() is None
        assert all(stack.running_pid(name) for name in SERVICE_ORDER)
    finally:
        isolated.down()
        bystander.kill()
