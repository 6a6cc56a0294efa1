"""The API's pieces that need no servers: JSON errors, telemetry, review analytics, exports."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI, Query
from fastapi.testclient import TestClient

from api import errors
from api.telemetry import RequestLog, TelemetryMiddleware, percentile
from labeling.review_queue import class_errors, match_count
from serving.predictor import NoChampionError
from training.retrain_guard import RetrainBusy
from training.snapshot_export import _only
from visionloop.images import ImageRejected
from visionloop.models import RetrainingRun


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    errors.install(app)
    log = RequestLog()
    app.state.request_log = log
    app.add_middleware(TelemetryMiddleware, log=log)

    @app.get("/busy")
    def busy() -> None:
        raise RetrainBusy(RetrainingRun(id=7, trigger="manual", prefect_flow_run_id="abc"))

    @app.get("/bad-image")
    def bad_image() -> None:
        raise ImageRejected("truncated", "the image data is broken")

    @app.get("/no-champion")
    def no_champion() -> None:
        raise NoChampionError("no version has the alias 'champion'")

    @app.get("/missing")
    def missing() -> None:
        raise errors.NotFound("no retraining run 5")

    @app.get("/prefect-down")
    def prefect_down() -> None:
        raise httpx.ConnectError("connection refused")

    @app.get("/bug")
    def bug() -> None:
        raise ZeroDivisionError("division by zero")

    @app.get("/number")
    def number(n: int = Query(ge=1)) -> dict[str, int]:
        return {"n": n}

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize(
    ("path", "status", "kind", "words"),
    [
        ("/busy", 409, "retrain_running", "retraining run 7"),
        ("/bad-image", 422, "invalid_image", "the image data is broken"),
        ("/no-champion", 503, "no_champion", "alias 'champion'"),
        ("/missing", 404, "not_found", "no retraining run 5"),
        ("/prefect-down", 503, "service_unavailable", "connection refused"),
        # A bug's message may carry anything (SQL, paths, hosts): the log has it, not the answer.
        ("/bug", 500, "internal_error", "request id"),
        ("/number?n=0", 422, "validation_error", "query.n"),
        ("/number?n=x", 422, "validation_error", "valid integer"),
        ("/nowhere", 404, "not_found", "Not Found"),
    ],
)
def test_every_error_is_json_that_says_what_was_wrong(
    client: TestClient, path: str, status: int, kind: str, words: str
) -> None:
    response = client.get(path)
    assert response.status_code == status
    body = response.json()
    assert body["error"] == kind and words in body["detail"]
    if status == 500:
        assert "division" not in response.text and "ZeroDivisionError" not in response.text
        assert body["request_id"] == response.headers["x-request-id"]


def test_extra_fields_name_what_the_client_needs(client: TestClient) -> None:
    busy = client.get("/busy").json()
    assert busy["retraining_run_id"] == 7 and busy["flow_run_id"] == "abc"
    assert client.get("/bad-image").json()["code"] == "truncated"
    invalid = client.get("/number?n=0").json()
    assert invalid["errors"][0]["loc"] == ["query", "n"]
    assert client.post("/number").json()["error"] == "method_not_allowed"


def test_the_telemetry_counts_every_answer_including_crashes(client: TestClient) -> None:
    log: RequestLog = client.app.state.request_log  # type: ignore[attr-defined]
    before = log.summary().requests
    client.get("/number?n=3")
    client.get("/bug")
    summary = log.summary()
    assert summary.requests == before + 2
    assert summary.error_rate is not None and summary.error_rate > 0
    assert summary.latency_p50_ms is not None and summary.latency_p50_ms >= 0


def test_request_log_percentiles_rates_and_window() -> None:
    log = RequestLog(capacity=1000, window_s=300)
    now = 10_000.0
    for i in range(100):
        log.record(float(i + 1), 200, "/api/x", at=now - 50 + i * 0.5)
    for _ in range(10):
        log.record(5.0, 200, "/api/predict", at=now - 10)
    log.record(7.0, 503, "/api/predict", at=now - 5)
    log.record(1.0, 200, "/api/x", at=now - 400)  # outside the window
    summary = log.summary(now=now)
    assert summary.requests == 111
    assert summary.predictions_per_minute == 10  # the 503 is not a prediction
    assert summary.error_rate == round(1 / 111, 4)
    assert summary.latency_p99_ms == 99.0
    assert summary.requests_per_minute == pytest.approx(111 * 60 / 50, rel=0.01)
    assert percentile([3, 1, 2], 50) == 2 and percentile([], 50) is None


def test_ring_buffer_is_bounded() -> None:
    log = RequestLog(capacity=10)
    for i in range(100):
        log.record(float(i), 200, "/")
    assert log.summary().requests == 10


def _pred(name: str, x1: float, y1: float, x2: float, y2: float) -> dict:
    return {"name": name, "conf": 0.5, "x1": x1, "y1": y1, "x2": x2, "y2": y2}


def _rev(name: str, cx: float, cy: float, w: float, h: float) -> dict:
    return {"name": name, "cx": cx, "cy": cy, "w": w, "h": h}


def test_class_error_rates_come_from_the_corrections() -> None:
    pairs = [
        # a scratch found exactly, a false scratch, a dent the model missed
        (
            [_pred("scratch", 0.1, 0.1, 0.3, 0.3), _pred("scratch", 0.6, 0.6, 0.7, 0.7)],
            [_rev("scratch", 0.2, 0.2, 0.2, 0.2), _rev("dent", 0.5, 0.5, 0.1, 0.1)],
        ),
        # a stain drawn the wrong class: one false stain, one missed dent
        (
            [_pred("stain", 0.4, 0.4, 0.6, 0.6)],
            [{"cls": 1, "cx": 0.5, "cy": 0.5, "w": 0.2, "h": 0.2}],
        ),
    ]
    rows = {row.name: row for row in class_errors(pairs, ["scratch", "dent", "stain"])}
    assert (rows["scratch"].predicted, rows["scratch"].reviewed, rows["scratch"].matched) == (
        2,
        1,
        1,
    )
    assert rows["scratch"].false_positives == 1 and rows["scratch"].error_rate == 0.5
    assert rows["dent"].missed == 2 and rows["dent"].error_rate == 1.0
    assert rows["stain"].false_positives == 1
    assert class_errors([], ["scratch"])[0].error_rate is None


def test_matching_is_one_to_one() -> None:
    box = (0.1, 0.1, 0.3, 0.3)
    assert match_count([box, box], [box]) == 1
    assert match_count([box], [(0.5, 0.5, 0.6, 0.6)]) == 0


def test_holdout_exports_keep_only_their_images() -> None:
    coco = {
        "images": [{"id": 0, "sha256": "a"}, {"id": 1, "sha256": "b"}],
        "annotations": [{"id": 0, "image_id": 0}, {"id": 1, "image_id": 1}],
        "categories": [],
    }
    kept = _only(coco, "coco", {"b"})
    assert [i["sha256"] for i in kept["images"]] == ["b"] and [
        a["image_id"] for a in kept["annotations"]
    ] == [1]
    tasks = [{"meta": {"image_hash": "a"}}, {"meta": {"image_hash": "b"}}]
    assert _only(tasks, "labelstudio", {"a"}) == [tasks[0]]
