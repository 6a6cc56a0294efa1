"""Dynamic batching of predictions, and retraining conditions that do not ask MLflow each time.

The batcher's own logic (which requests share a batch, who gets which result, who gets an
error, backpressure) is tested with a small deterministic predictor stand-in, whose batches a
test can hold and release at will. That each caller gets its own image's prediction is tested
with the session's real champion, in process and through the API process the stack runs.
The conditions' cache is tested through the API against the real MLflow, which one test stops.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from stack_faults import service_down, signal_service

from api import deps
from api.main import create_app
from cli.stack import Stack
from monitoring import champion_cache
from serving.batching import BatcherClosed, BatcherOverloaded, MicroBatcher
from serving.embedding import from_blob
from serving.predictor import PREDICT_CONF, ChampionPredictor, PredictionResult
from visionloop.db import session_scope
from visionloop.images import DecodeLimits, decode_image
from visionloop.models import Prediction
from visionloop.registry import CHAMPION, PREVIOUS, get_alias, register_weights, set_alias
from visionloop.registry import client as mlflow_client
from visionloop.settings import Settings, get_settings
from visionloop.synthetic import encode_jpeg, generate_sample

CLIENTS = 8
CONF = 0.001
"""Where the session's barely trained champion shows boxes at all."""
NOISE = 1e-3
"""How far a batched prediction may be from the same image predicted alone."""


# --- the batching logic, with a stand-in predictor ---------------------------------------------


class StandIn:
    """A deterministic predictor: one box per image whose confidence is the image's first
    pixel / 255, and a ``model_version`` naming the batch. Only the batching logic is under
    test here, so the model itself is not needed; ``hold`` keeps the next batch waiting until
    ``release``, so a test decides what queues up behind it."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, float]] = []  # (size, conf) per batch
        self.started = threading.Event()
        self._gate = threading.Event()
        self._gate.set()
        self.poison: int | None = None  # a batch holding an image of this value raises

    def hold(self) -> None:
        self._gate.clear()
        self.started.clear()

    def release(self) -> None:
        self._gate.set()

    def predict_batch(
        self,
        images: Sequence[np.ndarray],
        *,
        imgsz: int | None = None,
        conf: float = PREDICT_CONF,
        flip: bool = False,
    ) -> list[PredictionResult]:
        self.started.set()
        assert self._gate.wait(30), "the test never released the batch"
        self.batches.append((len(images), conf))
        values = [int(image[0, 0, 0]) for image in images]
        if self.poison in values:
            raise ValueError(f"poisoned batch {values}")
        return [
            PredictionResult(
                boxes=[
                    {"cls": 0, "name": "a", "conf": value / 255, "x1": 0, "y1": 0, "x2": 1, "y2": 1}
                ],
                model_version=f"batch-{len(self.batches)}",
            )
            for value in values
        ]


def pixel(value: int) -> np.ndarray:
    return np.full((8, 8, 3), value, dtype=np.uint8)


@pytest.fixture
def stand_in() -> StandIn:
    return StandIn()


def test_concurrent_callers_share_batches_and_each_gets_its_own_result(stand_in: StandIn) -> None:
    batcher = MicroBatcher(stand_in, max_batch=16, max_wait_ms=50, max_queue=64)
    try:
        stand_in.hold()
        first = batcher.submit(pixel(200))  # keeps the worker busy while the others queue
        assert stand_in.started.wait(10)
        futures = {value: batcher.submit(pixel(value)) for value in range(1, 21)}
        stand_in.release()
        assert first.result(10).boxes[0]["conf"] == pytest.approx(200 / 255)
        for value, future in futures.items():
            assert future.result(10).boxes[0]["conf"] == pytest.approx(value / 255)
    finally:
        batcher.close()
    # 20 queued requests: one batch of max_batch, then the 4 left, not 20 batches of one.
    assert [size for size, _ in stand_in.batches] == [1, 16, 4]
    assert batcher.stats().largest == 16 and batcher.stats().images == 21


def test_only_requests_with_the_same_options_share_a_batch_and_an_error_fails_only_its_batch(
    stand_in: StandIn,
) -> None:
    batcher = MicroBatcher(stand_in, max_batch=16, max_wait_ms=50, max_queue=64)
    try:
        stand_in.hold()
        batcher.submit(pixel(250))
        assert stand_in.started.wait(10)
        stand_in.poison = 7
        # Interleaved: conf 0.25 (one of them poisoned) and conf 0.5.
        low = [batcher.submit(pixel(v), conf=0.25) for v in (5, 6, 7, 8)]
        high = [batcher.submit(pixel(v), conf=0.5) for v in (15, 16, 17, 18)]
        stand_in.release()
        for future in low:
            with pytest.raises(ValueError, match="poisoned"):
                future.result(10)
        assert [f.result(10).boxes[0]["conf"] for f in high] == pytest.approx(
            [v / 255 for v in (15, 16, 17, 18)]
        )
        # The worker goes on after a failed batch.
        stand_in.poison = None
        assert batcher.predict(pixel(9), conf=0.25).boxes[0]["conf"] == pytest.approx(9 / 255)
    finally:
        batcher.close()
    assert stand_in.batches[1:] == [(4, 0.25), (4, 0.5), (1, 0.25)]
    assert batcher.stats().failed_batches == 1


def test_a_full_queue_refuses_at_once_and_close_fails_what_waits(stand_in: StandIn) -> None:
    batcher = MicroBatcher(stand_in, max_batch=4, max_wait_ms=0, max_queue=2)
    stand_in.hold()
    running = batcher.submit(pixel(1))
    assert stand_in.started.wait(10)
    queued = [batcher.submit(pixel(2)), batcher.submit(pixel(3))]
    with pytest.raises(BatcherOverloaded, match="VISIONLOOP_BATCH_QUEUE"):
        batcher.submit(pixel(4))
    stand_in.release()
    assert [f.result(10).boxes[0]["conf"] for f in queued] == pytest.approx([2 / 255, 3 / 255])
    assert running.result(10).boxes[0]["conf"] == pytest.approx(1 / 255)
    # Room again once the worker caught up.
    assert batcher.predict(pixel(5)).boxes[0]["conf"] == pytest.approx(5 / 255)

    stand_in.hold()
    busy = batcher.submit(pixel(6))
    assert stand_in.started.wait(10)
    waiting = batcher.submit(pixel(7))
    closer = threading.Thread(target=batcher.close)
    closer.start()
    time.sleep(0.1)
    stand_in.release()
    closer.join(10)
    assert not closer.is_alive()
    assert busy.result(10).boxes[0]["conf"] == pytest.approx(6 / 255)  # the batch in flight ends
    with pytest.raises(BatcherClosed):
        waiting.result(10)  # what waited behind it is refused, not left hanging
    with pytest.raises(BatcherClosed):
        batcher.submit(pixel(8))


# --- the real champion -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def champion(stack: Stack) -> str:
    from flows.bootstrap import bootstrap_flow

    return bootstrap_flow(epochs=1, images=8)["version"]


def distinct_jpegs(count: int) -> list[bytes]:
    """JPEGs of distinct scenes no earlier test uploaded (the API logs an image once)."""
    seed = 40_000 + uuid.uuid4().int % 50_000
    size = get_settings().image_size
    return [encode_jpeg(generate_sample(i, seed=seed, size=size).image) for i in range(count)]


def decoded(data: bytes, predictor: ChampionPredictor) -> np.ndarray:
    """The image as ``/api/predict`` hands it to the model."""
    limits = DecodeLimits.from_settings(get_settings())
    return decode_image(data, max_side=predictor.input_size(), limits=limits).rgb


def assert_same_boxes(got: list[dict[str, Any]], solo: list[dict[str, Any]], conf: float) -> None:
    """Equal up to the float noise of a batched forward pass against a single one.

    A box within that noise of ``conf`` may be shown in one and not the other, and boxes of
    equal confidence may swap places: the boxes clear of the threshold are compared as sets.
    """

    def clear(boxes: list[dict[str, Any]]) -> list[tuple[float, ...]]:
        rows = [
            (b["cls"], b["x1"], b["y1"], b["x2"], b["y2"], b["conf"])
            for b in boxes
            if b["conf"] >= conf + NOISE
        ]
        return sorted(rows, key=lambda row: tuple(round(v, 2) for v in row))

    mine, own = clear(got), clear(solo)
    assert len(mine) == len(own), (mine, own)
    for row, expected in zip(mine, own, strict=True):
        assert row == pytest.approx(expected, abs=NOISE), (mine, own)


def assert_own_embeddings(got: list[np.ndarray], solo: list[np.ndarray]) -> None:
    """Each result carries the embedding of its own image: nearest to its solo prediction's
    and to no other image's (the images differ enough for a swap to show)."""
    distances = np.array([[np.linalg.norm(g - s) for s in solo] for g in got])
    assert list(distances.argmin(axis=1)) == list(range(len(solo))), distances
    assert distances.diagonal().max() < 1e-2, distances.diagonal()


@pytest.mark.stack
@pytest.mark.slow
def test_threads_get_their_own_images_prediction_from_a_shared_batch(
    settings: Settings, champion: str
) -> None:
    predictor = ChampionPredictor(settings)
    images = [decoded(data, predictor) for data in distinct_jpegs(CLIENTS)]
    solo = [predictor.predict_batch([image], conf=CONF)[0] for image in images]
    assert any(b["conf"] >= CONF + NOISE for s in solo for b in s.boxes), "no boxes to compare"
    # A long wait, so that all the threads' requests make one batch however slow this machine.
    batcher = MicroBatcher(predictor, max_batch=16, max_wait_ms=2000, max_queue=64)
    start = threading.Barrier(CLIENTS)

    def call(image: np.ndarray) -> PredictionResult:
        start.wait(30)
        return batcher.predict(image, conf=CONF)

    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            batched = list(pool.map(call, images))
    finally:
        batcher.close()
    assert batcher.stats().largest > 1, batcher.stats()
    for got, own in zip(batched, solo, strict=True):
        assert got.model_version == own.model_version == champion
        assert_same_boxes(got.boxes, own.boxes, CONF)
    assert_own_embeddings([b.embedding for b in batched], [s.embedding for s in solo])


@pytest.mark.stack
@pytest.mark.slow
def test_asking_the_input_size_does_not_wait_for_the_batch_being_predicted(
    settings: Settings, champion: str
) -> None:
    """A request decodes to the model's input size before it joins a batch: that question
    must not queue behind the batch in hand, or requests reach the batcher one by one."""
    predictor = ChampionPredictor(settings)
    size = predictor.input_size()  # loaded
    with ThreadPoolExecutor(1) as pool, predictor._lock:  # what a batch holds while predicting
        assert pool.submit(predictor.input_size).result(timeout=10) == size
        assert pool.submit(predictor.model_version).result(timeout=10) == champion


def test_served_images_join_the_confidence_replay_about_to_run(settings: Settings) -> None:
    """A replay of the confidence stream per served image repeats the same work under load:
    images that arrive while one runs share the next, one replay per stream."""
    from contextlib import contextmanager

    from ingestion.upload import _ConfidenceWatch

    opened: list[str] = []
    first_open, release = threading.Event(), threading.Event()

    def sessions(stream: str) -> Any:
        """The real database's sessions for one stream's replays, the first held open until
        the test has handed over the images that must wait for it."""

        @contextmanager
        def open_session() -> Iterator[Any]:
            opened.append(stream)
            first_open.set()
            assert release.wait(30)
            with session_scope() as session:
                yield session

        return open_session

    watch = _ConfidenceWatch()
    watch.submit(sessions("7"), settings, "7", 1)
    assert first_open.wait(30)
    for image_id in (2, 3, 4):
        watch.submit(sessions("7"), settings, "7", image_id)
    watch.submit(sessions("8"), settings, "8", 5)
    release.set()
    deadline = time.monotonic() + 30
    while len(opened) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # nothing more comes
    # Five images, three replays: the first alone, the three that waited for it together, and
    # the other version's stream in a replay of its own.
    assert opened == ["7", "7", "8"]


@pytest.mark.stack
@pytest.mark.slow
def test_concurrent_api_predictions_each_get_their_own_images_boxes(
    stack: Stack, settings: Settings, champion: str
) -> None:
    """Through the API process the stack runs (uvicorn, its own batcher), 8 at once."""
    predictor = ChampionPredictor(settings)
    uploads = distinct_jpegs(CLIENTS)
    solo = [predictor.predict_batch([decoded(data, predictor)])[0] for data in uploads]
    auth = {"Authorization": f"Bearer {settings.api_token.get_secret_value()}"}
    start = threading.Barrier(CLIENTS)

    def call(index: int) -> dict[str, Any]:
        start.wait(30)
        files = {"file": (f"batch-{index}.jpg", uploads[index], "image/jpeg")}
        response = httpx.post(
            f"{stack.settings.api_url}/api/predict", headers=auth, files=files, timeout=120
        )
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(call, range(CLIENTS)))
    with session_scope() as session:
        logged = [session.get(Prediction, a["prediction_id"]) for a in answers]
    for answer, row, own in zip(answers, logged, solo, strict=True):
        assert answer["model_version"] == own.model_version == champion
        assert answer["new_image"] is True
        assert_same_boxes(answer["boxes"], own.boxes, PREDICT_CONF)
        assert row is not None and row.embedding is not None
        # The near misses too: the shown boxes of a barely trained model are often none.
        top = [c for _, c in own.below[:5]]
        assert [c for _, c in row.below[:5]] == pytest.approx(top, abs=NOISE)
    assert_own_embeddings(
        [from_blob(row.embedding) for row in logged],  # type: ignore[union-attr]
        [s.embedding for s in solo],
    )


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[TestClient]:
    with TestClient(create_app(), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def overrides(client: TestClient) -> Iterator[dict[Any, Any]]:
    yield client.app.dependency_overrides  # type: ignore[attr-defined]
    client.app.dependency_overrides.clear()  # type: ignore[attr-defined]


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {get_settings().api_token.get_secret_value()}"}


@pytest.mark.stack
def test_a_full_batch_queue_is_a_503_that_names_the_service(
    client: TestClient, overrides: dict[Any, Any], champion: str, stand_in: StandIn
) -> None:
    # A stand-in behind the batcher: the overload is what is under test, and a real model
    # cannot be made to hold its batch until the test lets it go.
    batcher = MicroBatcher(stand_in, max_batch=1, max_wait_ms=0, max_queue=1)
    overrides[deps.batcher] = lambda: batcher
    try:
        stand_in.hold()
        running = batcher.submit(pixel(1))
        assert stand_in.started.wait(10)
        queued = batcher.submit(pixel(2))
        [data] = distinct_jpegs(1)
        refused = client.post(
            "/api/predict", headers=auth(), files={"file": ("f.jpg", data, "image/jpeg")}
        )
        assert refused.status_code == 503, refused.text
        body = refused.json()
        assert body["error"] == "service_unavailable"
        assert "prediction batcher is overloaded" in body["detail"]
        assert "VISIONLOOP_BATCH_QUEUE" in body["detail"]
        stand_in.release()
        assert running.result(10) and queued.result(10)
    finally:
        stand_in.release()
        batcher.close()


# --- the retraining conditions' champion -------------------------------------------------------


def champion_reason(client: TestClient) -> str:
    response = client.get("/api/retraining/conditions")
    assert response.status_code == 200, response.text
    return next(c for c in response.json()["conditions"] if c["name"] == "champion_age")["reason"]


@pytest.mark.stack
def test_the_conditions_show_a_promotion_and_a_rollback_at_once(
    client: TestClient, champion: str, settings: Settings
) -> None:
    assert f"version {champion})" in champion_reason(client)
    previous = get_alias(settings, PREVIOUS)
    other = register_weights(settings, get_alias(settings, CHAMPION).run_id).version  # type: ignore[union-attr]
    try:
        # Within the recheck interval of the answer above: only the invalidation shows it.
        promoted = client.post(f"/api/models/{other}/promote", headers=auth())
        assert promoted.status_code == 200, promoted.text
        assert f"version {other})" in champion_reason(client)
        back = client.post("/api/models/rollback", headers=auth())
        assert back.status_code == 200, back.text
        assert f"version {champion})" in champion_reason(client)
    finally:
        set_alias(settings, CHAMPION, champion)
        mlflow_client(settings).delete_model_version(settings.model_name, other)
        if previous is not None:
            set_alias(settings, PREVIOUS, previous.version)
        champion_cache.invalidate()


@pytest.mark.stack
def test_the_conditions_answer_from_the_cache_while_mlflow_is_down(
    stack: Stack, client: TestClient, overrides: dict[Any, Any], champion: str, settings: Settings
) -> None:
    patient = settings.model_copy(update={"champion_recheck_s": 3600.0})
    overrides[deps.settings] = lambda: patient
    champion_cache.invalidate()
    assert f"version {champion})" in champion_reason(client)  # asked MLflow once
    try:
        with service_down(stack, "mlflow"):
            # MLflow is gone: only an answer kept from before can say which version it is.
            fresh = champion_reason(client)
            assert f"version {champion})" in fresh and "stale" not in fresh
            # Past the recheck interval the cache asks MLflow, which does not answer: the last
            # answer still serves, and says it may be stale.
            overrides[deps.settings] = lambda: settings.model_copy(
                update={"champion_recheck_s": 0.2}
            )
            time.sleep(0.3)
            stale = champion_reason(client)
            assert f"version {champion})" in stale
            assert "MLflow has not answered for" in stale and "may be stale" in stale
        # MLflow is back: the next recheck confirms the champion, no longer stale.
        time.sleep(0.3)
        again = champion_reason(client)
        assert f"version {champion})" in again and "stale" not in again
    finally:
        champion_cache.invalidate()


@pytest.mark.stack
def test_under_steady_calls_the_conditions_never_wait_for_mlflow(
    stack: Stack, client: TestClient, overrides: dict[Any, Any], champion: str, settings: Settings
) -> None:
    """A call past half the recheck interval has MLflow asked behind its answer, so a call just
    past the whole interval still finds a fresh answer, even with MLflow hung (stopped, not
    killed: it takes connections and never answers, so a caller asking it would wait
    ``service_timeout_s``)."""
    ttl = 4.0
    overrides[deps.settings] = lambda: settings.model_copy(update={"champion_recheck_s": ttl})
    champion_cache.invalidate()
    assert f"version {champion})" in champion_reason(client)  # asked, and waited for
    time.sleep(ttl * 0.65)
    assert f"version {champion})" in champion_reason(client)  # asked again, behind it
    time.sleep(ttl * 0.5)  # the first answer is now past the interval, the second is not
    hung = signal_service(stack, "mlflow", signal.SIGSTOP)
    try:
        answers: list[str] = []
        caller = threading.Thread(target=lambda: answers.append(champion_reason(client)))
        caller.start()
        caller.join(settings.service_timeout_s * 0.6)
        assert answers, "the conditions waited for a hung MLflow"
        assert f"version {champion})" in answers[0] and "stale" not in answers[0]
    finally:
        for pid in hung:
            os.kill(pid, signal.SIGCONT)
        caller.join()
        champion_cache.invalidate()


@pytest.mark.stack
@pytest.mark.slow
def test_a_confidence_shift_seen_at_predict_raises_the_drift_level(
    stack: Stack, settings: Settings, champion: str
) -> None:
    """ADWIN behind the API process: a history of sure predictions, then ``/api/predict`` calls
    on which the barely trained champion is far less sure; the background check records it."""
    from sqlmodel import col, delete, func, select

    from monitoring.confidence_stream import STAT_TEST
    from visionloop.events import recent
    from visionloop.models import DriftLevel, DriftResult, Image

    history = 400
    with session_scope() as session:
        before = session.exec(select(func.max(DriftResult.id))).one() or 0
        images = [
            Image(content_hash=uuid.uuid4().hex * 2, object_key=f"adwin-history/{i}.jpg")
            for i in range(history)
        ]
        session.add_all(images)
        session.flush()
        session.add_all(
            Prediction(image_id=image.id, model_version=champion, boxes=[], mean_confidence=0.95)
            for image in images
        )
        image_ids = [image.id for image in images]
    auth = {"Authorization": f"Bearer {settings.api_token.get_secret_value()}"}

    def changes() -> list[DriftResult]:
        with session_scope() as session:
            return list(
                session.exec(
                    select(DriftResult).where(
                        col(DriftResult.id) > before, DriftResult.stat_test == STAT_TEST
                    )
                )
            )

    try:
        uploads = distinct_jpegs(40)
        found: list[DriftResult] = []
        for index, data in enumerate(uploads):
            files = {"file": (f"adwin-{index}.jpg", data, "image/jpeg")}
            answer = httpx.post(
                f"{settings.api_url}/api/predict", headers=auth, files=files, timeout=120
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["new_image"] is True
            if found := changes():
                break
        # The replay runs after the answer, on the API's own thread: the last one may still be
        # at work.
        deadline = time.monotonic() + 30
        while not found and time.monotonic() < deadline:
            time.sleep(0.2)
            found = changes()
        assert found, "ADWIN saw no change in 40 predictions after 400 sure ones"
        change = found[0]
        assert change.model_version == champion and change.level != DriftLevel.green
        shift = change.features["confidence"]
        # ADWIN's estimate right at the change still averages in some of the sure history.
        assert shift["mean_before"] > 0.9 and shift["mean_after"] < shift["mean_before"]
        events = recent(limit=20, kind_prefix="drift.stream_change")
        assert any(e.payload.get("result_id") == change.id for e in events)
    finally:
        with session_scope() as session:
            session.exec(
                delete(DriftResult).where(
                    col(DriftResult.id) > before, DriftResult.stat_test == STAT_TEST
                )
            )
            session.exec(delete(Prediction).where(col(Prediction.image_id).in_(image_ids)))
            session.exec(delete(Image).where(col(Image.id).in_(image_ids)))
