"""Every API endpoint in process (``TestClient``) against the real stack: answers, 401s, 404s,
409s, 422s, and the side effects each promises (Prefect runs, logged predictions, aliases).

Rows a test seeds are removed again: the session's database is shared with every other test.
"""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from uuid import UUID

import pytest
import yaml
from fastapi.testclient import TestClient
from sqlmodel import Session, col, delete, select

from api import deps
from api.main import create_app
from api.routes import serving as serving_routes
from cli.stack import Stack
from ingestion import upload as serving
from labeling.selection import Selected
from monitoring.flow_runs import FlowRunFinished, cancel_flow_run, flow_run_state
from serving.predictor import ChampionPredictor
from training.retrain_guard import create_run, update_run
from training.retrain_requests import blocking_run
from visionloop.db import engine_for, migrate, session_scope
from visionloop.events import emit
from visionloop.models import (
    DriftResult,
    Image,
    LabelingQueueItem,
    Prediction,
    QueueStatus,
    RetrainingRun,
    RetrainStatus,
    ReviewedLabel,
    Verdict,
)
from visionloop.registry import CHAMPION, PREVIOUS, get_alias, register_weights, set_alias
from visionloop.registry import client as mlflow_client
from visionloop.settings import Settings, get_settings
from visionloop.storage import ObjectStore
from visionloop.synthetic import encode_jpeg, generate_sample

pytestmark = [pytest.mark.stack]


@pytest.fixture(scope="module")
def champion(stack: Stack) -> str:
    from flows.bootstrap import bootstrap_flow

    return bootstrap_flow(epochs=1, images=8)["version"]


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[TestClient]:
    with TestClient(create_app(), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def overrides(client: TestClient) -> Iterator[dict[Any, Any]]:
    """``app.dependency_overrides`` for one test."""
    yield client.app.dependency_overrides  # type: ignore[attr-defined]
    client.app.dependency_overrides.clear()  # type: ignore[attr-defined]


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {get_settings().api_token.get_secret_value()}"}


def jpeg(seed: int) -> bytes:
    return encode_jpeg(generate_sample(0, seed=seed, size=get_settings().image_size).image)


def upload(data: bytes, name: str = "frame.jpg") -> dict[str, Any]:
    return {"file": (name, data, "image/jpeg")}


def assert_error(response: Any, status: int, kind: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body["detail"], str) and body["detail"]
    if kind:
        assert body["error"] == kind, body
    return body


# --- the app as a whole -----------------------------------------------------------------------


def test_docs_spec_and_dashboard_are_served(client: TestClient) -> None:
    assert "swagger" in client.get("/docs").text.lower()
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/api/retraining/status",
        "/api/retraining/trigger",
        "/api/retraining/history",
        "/api/retraining/conditions",
        "/api/labeling/queue",
        "/api/labeling/stats",
        "/api/labeling/webhook",
        "/api/labeling/export",
        "/api/metrics/drift",
        "/api/metrics/drift/history",
        "/api/metrics/drift/report",
        "/api/models",
        "/api/models/{version}/promote",
        "/api/models/rollback",
        "/api/predict",
        "/api/images",
        "/api/system/health",
        "/api/system/resources",
        "/api/events/stream",
    ):
        assert path in paths, path
    page = client.get("/dashboard")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert client.get("/", follow_redirects=False).headers["location"] == "/dashboard"
    assert "EventSource" in client.get("/static/dashboard.js").text


def test_the_token_guards_every_mutating_operation(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    mutating = [
        path.replace("{version}", "1")
        for path, ops in spec["paths"].items()
        for method in ops
        if method != "get"
    ]
    assert len(mutating) >= 6
    for path in mutating:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
            body = assert_error(client.post(path, headers=headers), 401, "unauthorized")
            assert "VISIONLOOP_API_TOKEN" in body["detail"]


def test_the_webhook_answers_in_the_same_json(client: TestClient) -> None:
    # The webhook belongs to the label-sync tests; here only its place in this app's error scheme.
    ignored = client.post(
        "/api/labeling/webhook", headers=auth(), json={"action": "PROJECT_UPDATED"}
    )
    assert ignored.status_code == 202 and ignored.json() == {
        "action": "PROJECT_UPDATED",
        "tasks": [],
    }
    assert_error(
        client.post("/api/labeling/webhook", headers=auth(), json=[1, 2]), 422, "validation_error"
    )
    broken = client.post(
        "/api/labeling/webhook",
        headers={**auth(), "Content-Type": "application/json"},
        content=b"\xff{",
    )
    assert_error(broken, 400, "bad_request")


def test_unknown_paths_and_methods_answer_json(client: TestClient) -> None:
    assert_error(client.get("/api/nothing-here"), 404, "not_found")
    # A method that may change something is refused before routing unless it has the token,
    # so the unauthenticated get no map of which paths take which methods.
    assert_error(client.delete("/api/models"), 401, "unauthorized")
    assert_error(client.delete("/api/models", headers=auth()), 405, "method_not_allowed")


def test_cors_origins_come_from_the_settings(monkeypatch: pytest.MonkeyPatch, stack: Stack) -> None:
    monkeypatch.setenv("VISIONLOOP_CORS_ORIGINS", "http://dash.example")
    get_settings.cache_clear()
    try:
        app = create_app()
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    preflight = TestClient(app).options(
        "/api/retraining/trigger",
        headers={"Origin": "http://dash.example", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.headers["access-control-allow-origin"] == "http://dash.example"
    other = TestClient(app).get("/api/health", headers={"Origin": "http://elsewhere.example"})
    assert "access-control-allow-origin" not in other.headers


# --- system ------------------------------------------------------------------------------------


def test_system_health_names_every_service_with_its_latency(client: TestClient) -> None:
    body = client.get("/api/system/health").json()
    services = {s["name"]: s for s in body["services"]}
    assert set(services) == {"database", "s3", "mlflow", "prefect", "label-studio"}
    assert body["healthy"] is True, body
    assert all(s["ok"] and s["latency_ms"] >= 0 and s["setting"] for s in services.values())


def test_resources_report_the_machine_and_the_api_itself(stack: Stack) -> None:
    client = TestClient(create_app())  # a fresh app: its request log holds only these requests
    for _ in range(3):
        client.get("/api/health")
    client.get("/api/retraining/runs/0")  # a 404 is a client error, not an error of the API
    body = client.get("/api/system/resources").json()
    assert 0 <= body["cpu_percent"] <= 100 and body["cpu_count"] >= 1
    assert 0 < body["memory_used_bytes"] <= body["memory_total_bytes"]
    assert 0 < body["disk_used_bytes"] <= body["disk_total_bytes"]
    assert body["network_sent_bytes"] >= 0 and body["process_memory_bytes"] > 0
    api = body["api"]
    assert api["requests"] == 4 and api["latency_p50_ms"] <= api["latency_p95_ms"]
    assert api["client_error_rate"] == 0.25 and api["error_rate"] == 0
    second = client.get("/api/system/resources").json()
    assert second["network_received_per_s"] is not None  # a rate needs two samples


def test_info_links_to_the_other_user_interfaces(client: TestClient) -> None:
    settings = get_settings()
    links = client.get("/api/system/info").json()["links"]
    assert links == {
        "prefect_ui": settings.prefect_api.removesuffix("/api"),
        "label_studio": settings.label_studio,
        "mlflow": settings.mlflow_uri,
        "api_docs": "/docs",
    }


# --- retraining --------------------------------------------------------------------------------


def test_conditions_explain_every_condition(client: TestClient, champion: str) -> None:
    body = client.get("/api/retraining/conditions").json()
    names = [c["name"] for c in body["conditions"]]
    assert names == [
        "drift",
        "new_labels",
        "manual_request",
        "champion_age",
        "retrain_running",
        "too_few_labels",
        "cooldown",
    ]
    assert all(c["reason"] and c["kind"] in ("trigger", "blocker") for c in body["conditions"])
    age = next(c for c in body["conditions"] if c["name"] == "champion_age")
    assert f"version {champion}" in age["reason"]
    assert body["summary"]


def test_status_and_history_show_runs(client: TestClient, champion: str) -> None:
    tag = f"api-{uuid.uuid4().hex[:6]}"
    with session_scope() as session:
        runs = [create_run(session, tag, f"history {i}") for i in range(3)]
    try:
        with session_scope() as session:
            update_run(
                session,
                runs[0].id,
                status=RetrainStatus.cancelled,
                error="refused in a test",
                finished_at=datetime.now(UTC),
            )
        page = client.get(f"/api/retraining/history?trigger={tag}&limit=2").json()
        assert page["total"] == 3 and [r["id"] for r in page["items"]] == [runs[2].id, runs[1].id]
        rest = client.get(f"/api/retraining/history?trigger={tag}&limit=2&offset=2").json()
        assert [r["id"] for r in rest["items"]] == [runs[0].id]
        cancelled = client.get(f"/api/retraining/history?trigger={tag}&status=cancelled").json()
        assert [r["id"] for r in cancelled["items"]] == [runs[0].id]

        one = client.get(f"/api/retraining/runs/{runs[1].id}").json()
        assert one["reason"] == "history 1" and one["status"] == "pending"
        assert one["created_at"].endswith("Z") or one["created_at"].endswith("+00:00")
        assert_error(client.get("/api/retraining/runs/987654321"), 404, "not_found")
        assert_error(client.get("/api/retraining/runs/x"), 422, "validation_error")
        assert_error(client.get("/api/retraining/history?limit=0"), 422, "validation_error")
        assert_error(client.get("/api/retraining/history?status=sleeping"), 422, "validation_error")

        assert client.get("/api/retraining/history").json()["limit"] == 10

        status = client.get("/api/retraining/status").json()
        assert status["state"] in ("idle", "queued", "running")
        assert status["champion_version"] == champion
        assert [c["name"] for c in status["conditions"]["conditions"]][0] == "drift"
        # The specified fields: a cancelled last run reads as failed, with its finishing time.
        assert status["status"] == "failed", status
        assert status["last_retrain_time"].startswith(
            client.get(f"/api/retraining/runs/{runs[0].id}").json()["finished_at"][:19]
        )
        finding = {c["name"]: c for c in status["conditions"]["conditions"]}
        assert status["should_retrain"] is status["conditions"]["should_retrain"]
        assert status["new_labels_count"] == finding["new_labels"]["value"]
        assert status["drift_detected"] is (finding["drift"]["value"] in ("yellow", "red"))
        with session_scope() as session:
            update_run(
                session,
                runs[1].id,
                status=RetrainStatus.succeeded,
                finished_at=datetime.now(UTC) + timedelta(seconds=1),
            )
        assert client.get("/api/retraining/status").json()["status"] == "completed"
    finally:
        with session_scope() as session:
            session.exec(
                delete(RetrainingRun).where(col(RetrainingRun.id).in_([r.id for r in runs]))
            )


def _cancel_and_wait(flow_run_id: str, timeout: float = 180.0) -> str:
    """Cancel a flow run the way the runs API does and wait until Prefect calls it over.

    A run the worker has picked up but not started is cancelled outright: set to Cancelling,
    its process could miss the event (the worker's observer drops it for a run whose process
    has not registered yet) and then train to the end.
    """
    settings = get_settings()
    deadline = time.monotonic() + timeout
    with suppress(FlowRunFinished):
        cancel_flow_run(settings, flow_run_id)
    while time.monotonic() < deadline:
        state, final = flow_run_state(settings, flow_run_id)
        if final:
            return state
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} did not stop within {timeout} s")


@pytest.mark.timeout(600)
def test_trigger_starts_the_retrain_deployment_and_refuses_a_second(
    client: TestClient, champion: str
) -> None:
    assert_error(client.post("/api/retraining/trigger", json={"reason": "x"}), 401, "unauthorized")
    assert_error(
        client.post("/api/retraining/trigger", headers=auth(), json={"reason": 5}),
        422,
        "validation_error",
    )
    assert_error(
        client.post("/api/retraining/trigger", headers=auth(), json={"why": "x"}),
        422,
        "validation_error",
    )

    started = client.post("/api/retraining/trigger", headers=auth(), json={"reason": "api test"})
    assert started.status_code == 202, started.text
    launched = started.json()
    assert launched["job_id"] == launched["retraining_run_id"]
    try:
        run = client.get(launched["status_url"]).json()
        assert run["trigger"] == "manual" and run["reason"] == "api test"
        assert run["prefect_flow_run_id"] == launched["flow_run_id"]

        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as prefect:
            flow_run = prefect.read_flow_run(UUID(launched["flow_run_id"]))
            deployment = prefect.read_deployment(flow_run.deployment_id)
        assert deployment.name == "retrain"
        assert flow_run.parameters["params"]["retraining_run_id"] == launched["retraining_run_id"]

        busy = assert_error(
            client.post("/api/retraining/trigger", headers=auth()), 409, "retrain_running"
        )
        assert busy["retraining_run_id"] == launched["retraining_run_id"]
        assert busy["flow_run_id"] == launched["flow_run_id"]
        during = client.get("/api/retraining/status").json()
        assert during["state"] in ("queued", "running") and during["status"] == "running"
    finally:
        _cancel_and_wait(launched["flow_run_id"])

    # Once Prefect says the run is over, the trigger's reconciliation lets the next one through;
    # the status only reads what the database recorded.
    with session_scope() as session:
        assert blocking_run(session, get_settings()) is None
    status = client.get("/api/retraining/status").json()
    assert status["state"] == "idle" and status["status"] == "failed", status
    finished = client.get(launched["status_url"]).json()
    assert finished["status"] in ("failed", "cancelled") and finished["error"]


def test_a_launch_that_fails_is_a_503_and_leaves_no_pending_request(
    client: TestClient, overrides: dict[Any, Any]
) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise ConnectionError("Prefect is down")

    overrides[deps.retrain_launcher] = lambda: broken
    body = assert_error(
        client.post("/api/retraining/trigger", headers=auth()), 503, "service_unavailable"
    )
    assert "Prefect is down" in body["detail"]
    with session_scope() as session:
        run = session.exec(select(RetrainingRun).order_by(col(RetrainingRun.id).desc())).first()
    assert (
        run is not None
        and run.status == RetrainStatus.cancelled
        and "Prefect is down" in (run.error or "")
    )


# --- models and serving ------------------------------------------------------------------------


@contextmanager
def second_version(settings: Settings) -> Iterator[str]:
    """A new registry version with the champion's weights; deleted afterwards, aliases restored."""
    champion, previous = get_alias(settings, CHAMPION), get_alias(settings, PREVIOUS)
    assert champion is not None and champion.run_id
    other = register_weights(settings, champion.run_id)
    try:
        yield other.version
    finally:
        set_alias(settings, CHAMPION, champion.version)
        mlflow_client(settings).delete_model_version(settings.model_name, other.version)
        if previous is not None:
            set_alias(settings, PREVIOUS, previous.version)
        elif get_alias(settings, PREVIOUS) is not None:
            mlflow_client(settings).delete_registered_model_alias(settings.model_name, PREVIOUS)


def test_predict_serves_the_champion_logs_it_and_follows_the_alias(
    client: TestClient, overrides: dict[Any, Any], champion: str
) -> None:
    settings = get_settings()
    # A predictor that asks MLflow on every batch: the hot swap needs no waiting here.
    predictor = ChampionPredictor(settings, recheck_s=0.0)
    overrides[deps.predictor] = lambda: predictor
    image = jpeg(seed=9001 + uuid.uuid4().int % 1000)

    first = client.post("/api/predict", headers=auth(), files=upload(image))
    assert first.status_code == 200, first.text
    served = first.json()
    assert served["model_version"] == champion and served["new_image"] is True
    assert (served["width"], served["height"]) == (settings.image_size, settings.image_size)
    with session_scope() as session:
        row = session.get(Image, served["image_id"])
        logged = session.get(Prediction, served["prediction_id"])
    assert row is not None and row.features and "brightness" in row.features  # feeds drift
    assert row.source_key == "api:predict/frame.jpg"
    assert ObjectStore(settings).exists(settings.bucket_images, row.object_key)
    assert logged is not None and logged.source == "api" and logged.model_version == champion

    again = client.post(
        "/api/predict", headers=auth(), files=upload(image, "other-name.png")
    ).json()
    assert again["image_id"] == served["image_id"] and again["new_image"] is False
    assert again["prediction_id"] == served["prediction_id"]  # one prediction per image and version

    with second_version(settings) as other:
        models = client.get("/api/models").json()
        assert models["champion"] == champion and other in [
            v["version"] for v in models["versions"]
        ]
        listed = next(v for v in models["versions"] if v["version"] == champion)
        assert (
            "champion" in listed["aliases"]
            and listed["snapshot_hash"]
            and "mAP50" in listed["metrics"]
        )

        promoted = client.post(
            f"/api/models/{other}/promote", headers=auth(), json={"reason": "api test"}
        )
        assert promoted.json() == {"champion": other, "previous": champion, "changed": True}
        assert (
            client.post(f"/api/models/{other}/promote", headers=auth()).json()["changed"] is False
        )
        swapped = client.post("/api/predict", headers=auth(), files=upload(image)).json()
        assert (
            swapped["model_version"] == other
            and swapped["prediction_id"] != served["prediction_id"]
        )

        back = client.post(
            "/api/models/rollback", headers=auth(), json={"reason": "api test"}
        ).json()
        assert back == {"champion": champion, "previous": other, "changed": True}
        assert (
            client.post("/api/predict", headers=auth(), files=upload(image)).json()["model_version"]
            == champion
        )

        assert_error(
            client.post("/api/models/rollback", headers=auth(), json={"to_version": "987654"}), 404
        )
        to_other = client.post(
            "/api/models/rollback", headers=auth(), json={"to_version": other}
        ).json()
        assert to_other["champion"] == other
    assert get_alias(settings, CHAMPION).version == champion

    resources = client.get("/api/system/resources").json()
    assert resources["api"]["predictions_per_minute"] >= 1


class _Webhook(BaseHTTPRequestHandler):
    """A team's webhook endpoint: records what it takes, refuses the first ``refuse`` calls."""

    received: list[dict[str, Any]] = []
    refuse = 0
    calls = 0

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls += 1
        if type(self).refuse > 0:
            type(self).refuse -= 1
            self.send_response(503)
        else:
            type(self).received.append(body)
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def webhook(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_Webhook]]:
    """A local HTTP server as ``VISIONLOOP_NOTIFY_WEBHOOK_URL`` for one test."""
    server = HTTPServer(("127.0.0.1", 0), _Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Webhook.received, _Webhook.refuse, _Webhook.calls = [], 0, 0
    monkeypatch.setenv(
        "VISIONLOOP_NOTIFY_WEBHOOK_URL", f"http://127.0.0.1:{server.server_port}/hooks/t0ken"
    )
    get_settings.cache_clear()
    try:
        yield _Webhook
    finally:
        server.shutdown()
        monkeypatch.delenv("VISIONLOOP_NOTIFY_WEBHOOK_URL")
        get_settings.cache_clear()


def test_promotion_and_rollback_through_the_api_reach_the_webhook(
    client: TestClient, champion: str, webhook: type[_Webhook]
) -> None:
    settings = get_settings()
    with second_version(settings) as other:
        promoted = client.post(f"/api/models/{other}/promote", headers=auth(), json={})
        assert promoted.status_code == 200, promoted.text
        sent = webhook.received[-1]
        assert sent["kind"] == "model.promoted" and sent["payload"]["version"] == other
        assert sent["payload"]["previous"] == champion and sent["level"] == "info"

        # The endpoint is down for a moment: the notification is retried, not lost.
        webhook.refuse = 2
        back = client.post("/api/models/rollback", headers=auth(), json={"reason": "bad"})
        assert back.status_code == 200, back.text
        sent = webhook.received[-1]
        assert sent["kind"] == "model.rolled_back" and sent["payload"]["version"] == champion
        # One call for the promotion, then two refused and the third taken for the rollback.
        assert sent["payload"]["reason"] == "bad" and webhook.calls == 1 + 3
        assert len(webhook.received) == 2


def test_promote_and_rollback_refuse_what_cannot_be_done(
    client: TestClient, overrides: dict[Any, Any], champion: str
) -> None:
    assert_error(client.post("/api/models/987654/promote", headers=auth()), 404, "not_found")
    assert_error(client.post("/api/models/abc/promote", headers=auth()), 422, "validation_error")
    assert_error(client.post("/api/models/1/promote", headers=auth(), json={"reason": 1}), 422)
    assert_error(
        client.post("/api/models/rollback", headers=auth(), json={"to_version": "v1"}), 422
    )
    assert_error(client.get("/api/models?limit=0"), 422, "validation_error")
    # A registered model with no versions at all: nothing to list, nothing to roll back to.
    empty = get_settings().model_copy(
        update={"model_name": f"visionloop-empty-{uuid.uuid4().hex[:6]}"}
    )
    overrides[deps.settings] = lambda: empty
    assert client.get("/api/models").json() == {
        "model_name": empty.model_name,
        "champion": None,
        "aliases": {},
        "versions": [],
    }
    body = assert_error(client.post("/api/models/rollback", headers=auth()), 409, "conflict")
    assert "previous" in body["detail"]
    assert_error(
        client.post("/api/predict", headers=auth(), files=upload(jpeg(5))), 503, "no_champion"
    )


def test_predict_refuses_bad_uploads_with_the_reason(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, champion: str
) -> None:
    text = assert_error(
        client.post("/api/predict", headers=auth(), files=upload(b"camera 7 notes", "notes.jpg")),
        422,
        "invalid_image",
    )
    assert text["code"] == "not_an_image" and "text" in text["detail"]
    truncated = jpeg(77)[:300]
    assert assert_error(client.post("/api/predict", headers=auth(), files=upload(truncated)), 422)[
        "code"
    ] in (
        "truncated",
        "corrupt",
    )
    missing = assert_error(client.post("/api/predict", headers=auth()), 422, "validation_error")
    assert missing["errors"][0]["loc"] == ["body", "file"]
    monkeypatch.setattr(serving_routes, "MAX_UPLOAD_BYTES", 100)
    assert_error(
        client.post("/api/predict", headers=auth(), files=upload(jpeg(78))),
        413,
        "payload_too_large",
    )


def test_a_flagged_prediction_joins_the_review_queue(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, champion: str
) -> None:
    reason = f"api-test-{uuid.uuid4().hex[:6]}"
    # Whatever this tiny model predicts, selection flags the image.
    monkeypatch.setattr(
        serving,
        "select_for_review",
        lambda candidates, _policy: [Selected(candidates[0].image_id, reason, 1.0, 0.5)],
    )
    response = client.post(
        "/api/predict", headers=auth(), files=upload(jpeg(4242 + uuid.uuid4().int % 1000))
    )
    assert response.status_code == 200 and response.json()["flagged_reason"] == reason
    # TestClient returns after the background task (queueing in Label Studio) has run.
    page = client.get(f"/api/labeling/queue?flagged_reason={reason}").json()
    assert page["total"] == 1
    item = page["items"][0]
    assert item["image_id"] == response.json()["image_id"] and item["status"] == "pending"
    assert item["prediction_id"] == response.json()["prediction_id"]


def test_uploads_land_in_the_incoming_bucket(client: TestClient) -> None:
    settings = get_settings()
    data = jpeg(5000 + uuid.uuid4().int % 1000)
    first = client.post("/api/images", headers=auth(), files=upload(data))
    assert first.status_code == 201, first.text
    stored = first.json()
    assert stored["bucket"] == settings.bucket_incoming and stored["created"] is True
    assert stored["key"].startswith("uploads/") and stored["key"].endswith(".jpg")
    assert ObjectStore(settings).get_bytes(settings.bucket_incoming, stored["key"]) == data
    assert client.post("/api/images", headers=auth(), files=upload(data)).json()["created"] is False
    assert_error(
        client.post("/api/images", headers=auth(), files=upload(b"%PDF-1.4 no")),
        422,
        "invalid_image",
    )
    assert_error(client.post("/api/images", files=upload(data)), 401, "unauthorized")


# --- labelling --------------------------------------------------------------------------------


@contextmanager
def seeded_reviews(reason: str, specs: list[dict[str, Any]]) -> Iterator[list[int]]:
    """Queue items (with an image and a prediction each, and a reviewed label when a verdict is
    given) under ``reason``; all of it deleted afterwards."""
    image_ids: list[int] = []
    with session_scope() as session:
        for spec in specs:
            image = Image(
                content_hash=uuid.uuid4().hex * 2,
                object_key=f"test/{uuid.uuid4().hex}.jpg",
                size_bytes=1,
            )
            session.add(image)
            session.flush()
            prediction = Prediction(
                image_id=image.id, model_version="seed", boxes=spec.get("predicted", [])
            )
            session.add(prediction)
            session.flush()
            session.add(
                LabelingQueueItem(
                    image_id=image.id,
                    prediction_id=prediction.id,
                    image_path=f"s3://images/{image.object_key}",
                    confidence_score=spec.get("confidence", 0.5),
                    status=spec["status"],
                    flagged_reason=reason,
                )
            )
            if "verdict" in spec:
                session.add(
                    ReviewedLabel(
                        image_id=image.id,
                        image_path=image.object_key,
                        boxes=spec.get("reviewed", []),
                        verdict=spec["verdict"],
                        prediction_model_version="seed",
                    )
                )
            image_ids.append(image.id)  # type: ignore[arg-type]
    try:
        yield image_ids
    finally:
        with session_scope() as session:
            for model in (ReviewedLabel, LabelingQueueItem, Prediction):
                session.exec(delete(model).where(col(model.image_id).in_(image_ids)))  # type: ignore[attr-defined]
            session.exec(delete(Image).where(col(Image.id).in_(image_ids)))


SCRATCH = {"cls": 0, "name": "scratch", "conf": 0.5, "x1": 0.1, "y1": 0.1, "x2": 0.3, "y2": 0.3}
SCRATCH_REVIEWED = {"cls": 0, "name": "scratch", "cx": 0.2, "cy": 0.2, "w": 0.2, "h": 0.2}
DENT_REVIEWED = {"cls": 1, "name": "dent", "cx": 0.7, "cy": 0.7, "w": 0.1, "h": 0.1}


def test_queue_filters_and_pages(client: TestClient) -> None:
    reason = f"api-queue-{uuid.uuid4().hex[:6]}"
    specs = [
        {"status": QueueStatus.pending, "confidence": 0.45},
        {"status": QueueStatus.pending, "confidence": 0.65},
        {"status": QueueStatus.labeled, "confidence": 0.55, "verdict": Verdict.accepted},
    ]
    with seeded_reviews(reason, specs) as image_ids:
        page = client.get(f"/api/labeling/queue?flagged_reason={reason}&limit=2").json()
        assert page["total"] == 3 and [i["image_id"] for i in page["items"]] == image_ids[:0:-1]
        oldest = client.get(
            f"/api/labeling/queue?flagged_reason={reason}&order=oldest&limit=1&offset=1"
        ).json()
        assert [i["image_id"] for i in oldest["items"]] == [image_ids[1]]
        pending = client.get(f"/api/labeling/queue?flagged_reason={reason}&status=pending").json()
        assert pending["total"] == 2
        band = client.get(
            f"/api/labeling/queue?flagged_reason={reason}&min_confidence=0.5&max_confidence=0.6"
        ).json()
        assert [i["image_id"] for i in band["items"]] == [image_ids[2]]
        later = client.get(
            f"/api/labeling/queue?flagged_reason={reason}&created_after=2999-01-01T00:00:00Z"
        ).json()
        assert later["total"] == 0
    for bad in (
        "status=lost",
        "limit=501",
        "offset=-1",
        "min_confidence=2",
        "order=random",
        "created_after=yesterday",
    ):
        assert_error(client.get(f"/api/labeling/queue?{bad}"), 422, "validation_error")


def test_stats_count_the_queue_agreement_and_class_errors(client: TestClient) -> None:
    reason = f"api-stats-{uuid.uuid4().hex[:6]}"
    specs = [
        {"status": QueueStatus.pending},
        {
            "status": QueueStatus.labeled,
            "verdict": Verdict.accepted,
            "predicted": [SCRATCH],
            "reviewed": [SCRATCH_REVIEWED],
        },
        # the model saw a scratch that is not there and missed a dent
        {
            "status": QueueStatus.approved,
            "verdict": Verdict.rejected,
            "predicted": [SCRATCH],
            "reviewed": [DENT_REVIEWED],
        },
    ]
    before = client.get("/api/labeling/stats").json()
    with seeded_reviews(reason, specs):
        after = client.get("/api/labeling/stats").json()
    assert after["by_reason"][reason] == {"pending": 1, "labeled": 1, "approved": 1}
    for key in ("pending", "labeled", "approved"):
        assert after[key] - before[key] == 1
    assert after["verdicts"]["accepted"] - before["verdicts"]["accepted"] == 1
    assert after["verdicts"]["rejected"] - before["verdicts"]["rejected"] == 1
    reviewed = sum(after["verdicts"].values())
    assert after["agreement"] == pytest.approx(after["verdicts"]["accepted"] / reviewed, abs=1e-4)
    assert after["compared_images"] - before["compared_images"] == 2
    rows_before = {c["name"]: c for c in before["classes"]}
    rows_after = {c["name"]: c for c in after["classes"]}
    assert rows_after["scratch"]["predicted"] - rows_before["scratch"]["predicted"] == 2
    assert rows_after["scratch"]["false_positives"] - rows_before["scratch"]["false_positives"] == 1
    assert rows_after["dent"]["missed"] - rows_before["dent"]["missed"] == 1
    assert rows_after["dent"]["error_rate"] > 0


def test_export_hands_out_a_snapshot_in_every_format(client: TestClient, champion: str) -> None:
    settings = get_settings()
    snapshots = client.get("/api/labeling/snapshots?kind=bootstrap").json()
    assert snapshots["total"] >= 1
    newest = client.get("/api/labeling/snapshots").json()["items"][0]
    # The snapshot's profile as the snapshot recorded it (bootstrap: every image labelled).
    profile = snapshots["items"][0]["profile"]
    assert profile["images"] == snapshots["items"][0]["num_images"]
    assert set(profile["class_balance"]) == set(snapshots["items"][0]["class_names"])
    assert {"box_sizes", "boxes_per_image", "duplicates", "splits"} <= set(profile)

    assert_error(client.get("/api/labeling/export"), 401, "unauthorized")
    latest = client.get("/api/labeling/export", headers=auth())
    assert latest.status_code == 200 and latest.headers["content-type"] == "application/zip"
    chosen = int(latest.headers["x-snapshot-id"])
    archive = zipfile.ZipFile(io.BytesIO(latest.content))
    names = archive.namelist()
    spec = yaml.safe_load(archive.read("data.yaml"))
    assert (
        spec["names"] == dict(enumerate(settings.class_names)) and "train" in spec and "val" in spec
    )
    labels = [n for n in names if n.startswith("labels/")]
    images = [n for n in names if n.startswith("images/")]
    assert labels and len(labels) == len(images) and "manifest.json" in names
    assert "attachment" in latest.headers["content-disposition"]

    coco = client.get(
        f"/api/labeling/export?format=coco&snapshot_id={chosen}", headers=auth()
    ).json()
    assert (
        len(coco["images"]) == len(images)
        and [c["name"] for c in coco["categories"]] == settings.class_names
    )
    studio = client.get(
        f"/api/labeling/export?format=labelstudio&snapshot_id={chosen}", headers=auth()
    ).json()
    assert len(studio) == len(images) and "annotations" in studio[0]
    assert newest["id"] >= chosen

    assert_error(
        client.get("/api/labeling/export?snapshot_id=987654", headers=auth()), 404, "not_found"
    )
    assert_error(
        client.get("/api/labeling/export?format=voc", headers=auth()), 422, "validation_error"
    )
    assert_error(
        client.get("/api/labeling/export?snapshot_id=0", headers=auth()), 422, "validation_error"
    )
    assert_error(client.get("/api/labeling/snapshots?kind=other"), 422, "validation_error")


# --- drift --------------------------------------------------------------------------------------


def test_drift_latest_history_and_report(client: TestClient) -> None:
    settings = get_settings()
    store = ObjectStore(settings)
    report_key = f"drift/api-test/{uuid.uuid4().hex}.html"
    store.put_bytes(
        settings.bucket_reports,
        report_key,
        b"<html><body>evidently says hi</body></html>",
        "text/html",
    )
    features = {
        "brightness": {
            "name": "brightness",
            "statistic": 1e-9,
            "p_value": 1e-9,
            "threshold": 0.05,
            "drifted": True,
            "severity": 0.9,
        },
        "blur": {
            "name": "blur",
            "statistic": 0.4,
            "p_value": 0.4,
            "threshold": 0.05,
            "drifted": False,
            "severity": 0.01,
        },
        "_p_value": 1e-8,
    }
    rows = [
        DriftResult(stat_test="ks", drift_score=0.1, drift_share=0.0, level="green", features={}),
        DriftResult(
            stat_test="ks",
            drift_score=0.9,
            drift_share=0.5,
            dataset_drift=True,
            level="red",
            window_size=60,
            reference_size=40,
            features=features,
            report_key=report_key,
        ),
    ]
    with session_scope() as session:
        for row in rows:
            session.add(row)
    ids = [row.id for row in rows]
    try:
        latest = client.get("/api/metrics/drift").json()
        assert latest["id"] == ids[1] and latest["level"] == "red" and latest["p_value"] == 1e-8
        assert [f["name"] for f in latest["features"]] == [
            "brightness",
            "blur",
        ]  # most severe first
        assert latest["report_url"] == f"/api/metrics/drift/{ids[1]}/report"
        assert client.get(f"/api/metrics/drift/{ids[0]}").json()["report_url"] is None

        history = client.get("/api/metrics/drift/history").json()
        assert (history["yellow"], history["red"]) == (settings.drift_yellow, settings.drift_red)
        assert [p["id"] for p in history["points"]][-2:] == ids  # oldest first
        assert len(client.get("/api/metrics/drift/history?limit=1").json()["points"]) == 1
        assert (
            client.get("/api/metrics/drift/history?since=2999-01-01T00:00:00Z").json()["points"]
            == []
        )

        for path in ("/api/metrics/drift/report", f"/api/metrics/drift/{ids[1]}/report"):
            assert_error(client.get(path), 401, "unauthorized")
            report = client.get(path, headers=auth())
            assert report.status_code == 200 and "evidently says hi" in report.text
            assert report.headers["content-type"].startswith("text/html")
        assert_error(
            client.get(f"/api/metrics/drift/{ids[0]}/report", headers=auth()), 404, "not_found"
        )
        assert_error(client.get("/api/metrics/drift/987654"), 404, "not_found")
        assert_error(
            client.get("/api/metrics/drift/987654/report", headers=auth()), 404, "not_found"
        )
        assert_error(client.get("/api/metrics/drift/history?limit=0"), 422, "validation_error")
        assert_error(client.get("/api/metrics/drift/x"), 422, "validation_error")
    finally:
        with session_scope() as session:
            session.exec(delete(DriftResult).where(col(DriftResult.id).in_(ids)))


def test_a_retrain_report_in_each_format_with_the_token(client: TestClient) -> None:
    from training.retrain_report import report_key

    settings = get_settings()
    store = ObjectStore(settings)
    run_id, older = (900_000 + uuid.uuid4().int % 90_000 for _ in range(2))
    documents = {
        "md": (b"# Retraining run", "text/markdown"),
        "json": (b'{"retraining_run_id": 1}', "application/json"),
        "html": (b"<!doctype html><html><body>the page</body></html>", "text/html"),
    }
    for suffix, (body, media) in documents.items():
        store.put_bytes(settings.bucket_reports, report_key(run_id, suffix), body, media)
    # A run reported before reports had a page: its Markdown is there, its HTML is not.
    store.put_bytes(settings.bucket_reports, report_key(older, "md"), b"# old", "text/markdown")

    path = f"/api/retraining/runs/{run_id}/report"
    assert_error(client.get(path), 401, "unauthorized")
    for suffix, (body, media) in documents.items():
        response = client.get(path, params={"format": suffix}, headers=auth())
        assert response.status_code == 200 and response.content == body
        assert response.headers["content-type"].startswith(media)
    page = client.get(path, params={"format": "html"}, headers=auth())
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    assert client.get(path, headers=auth()).content == documents["md"][0]  # the default

    missing = assert_error(
        client.get(f"/api/retraining/runs/{older}/report?format=html", headers=auth()),
        404,
        "not_found",
    )
    assert "predates HTML reports" in missing["detail"]
    assert_error(
        client.get("/api/retraining/runs/2000000000/report", headers=auth()), 404, "not_found"
    )
    assert_error(client.get(f"{path}?format=pdf", headers=auth()), 422, "validation_error")


def test_drift_before_any_measurement_is_a_404_that_says_so(
    client: TestClient, overrides: dict[Any, Any], sqlite_url: str
) -> None:
    migrate(sqlite_url)
    empty = engine_for(sqlite_url)

    def empty_session() -> Iterator[Session]:
        with Session(empty) as session:
            yield session

    overrides[deps.db_session] = empty_session
    body = assert_error(client.get("/api/metrics/drift"), 404, "not_found")
    assert "not been measured" in body["detail"]
    assert_error(client.get("/api/metrics/drift/report", headers=auth()), 404, "not_found")
    assert client.get("/api/metrics/drift/history").json()["points"] == []


# --- events --------------------------------------------------------------------------------------


def test_events_list_recent_activity(client: TestClient) -> None:
    kind = f"apitest{uuid.uuid4().hex[:6]}"
    emitted = [emit(f"{kind}.step", f"step {i}", {"i": i}) for i in range(5)]
    newest = client.get(f"/api/events?kind={kind}.&limit=3").json()
    assert [e["payload"]["i"] for e in newest] == [2, 3, 4]  # the newest three, oldest first
    after = client.get(f"/api/events?kind={kind}&after_id={emitted[0].id}&limit=2").json()
    assert [e["id"] for e in after] == [emitted[1].id, emitted[2].id]
    assert newest[0]["created_at"].endswith("Z")
    assert_error(client.get("/api/events?limit=0"), 422, "validation_error")
    assert_error(client.get("/api/events?after_id=-1"), 422, "validation_error")
