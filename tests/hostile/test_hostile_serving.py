"""Serving and review queueing under pressure, against the real stack: concurrent predictions
of the same images, an MLflow outage, a damaged weights cache and weights swapped in the
artifact store behind the registry's back.

The API runs in process (``TestClient``) so selection can be told to flag every image and a
test can hand the API a predictor of its own; Label Studio, MLflow, the object store and the
database are the session stack's servers.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import col, select
from stack_faults import service_down

from api import deps
from api.main import create_app
from cli.stack import Stack
from ingestion import upload as serving
from labeling.selection import Selected
from labeling.tasks import IMAGE_ID_KEY, queue_for_review
from labeling.wiring import review_project
from serving.predictor import ChampionPredictor
from visionloop import registry
from visionloop.db import session_scope
from visionloop.models import Image, LabelingQueueItem
from visionloop.settings import Settings, get_settings
from visionloop.storage import ObjectStore, sha256_hex
from visionloop.synthetic import encode_jpeg, generate_sample

pytestmark = [pytest.mark.stack]

MLFLOW = "mlflow"  # the service's name in cli/stack.py
OUTAGE_BOUND_S = 15.0
"""A prediction during an MLflow outage answers within this (it used to take minutes)."""


@pytest.fixture(scope="module")
def champion(stack: Stack) -> str:
    from flows.bootstrap import bootstrap_flow

    return bootstrap_flow(epochs=1, images=8)["version"]


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[TestClient]:
    with TestClient(create_app(), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def use_predictor(client: TestClient) -> Iterator[Any]:
    """Make the API predict with a given predictor for one test."""
    overrides = client.app.dependency_overrides  # type: ignore[attr-defined]

    def use(predictor: ChampionPredictor) -> None:
        overrides[deps.predictor] = lambda: predictor

    yield use
    overrides.pop(deps.predictor, None)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {get_settings().api_token.get_secret_value()}"}


def jpeg(seed: int) -> bytes:
    return encode_jpeg(generate_sample(0, seed=seed, size=get_settings().image_size).image)


def predict(client: TestClient, data: bytes) -> Any:
    return client.post(
        "/api/predict", headers=auth(), files={"file": ("frame.jpg", data, "image/jpeg")}
    )


# --- one review task per image -----------------------------------------------------------------


def _image_id(content_hash: str, wait_s: float = 60.0) -> int:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        with session_scope() as session:
            image = session.exec(select(Image).where(Image.content_hash == content_hash)).first()
            if image is not None and image.id is not None:
                return image.id
        time.sleep(0.05)
    raise AssertionError(f"no image row for {content_hash} after {wait_s} s")


def _queue_from_ingest(settings: Settings, content_hash: str, reason: str) -> None:
    """What the ingest flow does for the same image, as soon as the API has logged it."""
    image_id = _image_id(content_hash)
    with session_scope() as session:
        queue_for_review(session, settings, [Selected(image_id, reason, 1.0, 0.5)])


def _tasks_per_image(settings: Settings, image_ids: set[int]) -> Counter[int]:
    project = review_project(settings)
    tasks = project.ls.tasks.list(project=project.id, fields="task_only", page_size=500)
    return Counter(
        int(t.data[IMAGE_ID_KEY]) for t in tasks if (t.data or {}).get(IMAGE_ID_KEY) in image_ids
    )


def test_concurrent_predictions_and_ingest_make_one_task_per_image(
    settings: Settings,
    champion: str,
    client: TestClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reason = f"hostile-{uuid.uuid4().hex[:6]}"
    # Whatever this tiny model predicts, selection flags the image.
    monkeypatch.setattr(
        serving,
        "select_for_review",
        lambda candidates, _policy: [Selected(candidates[0].image_id, reason, 1.0, 0.5)],
    )
    base = 90_000 + uuid.uuid4().int % 10_000
    images = [jpeg(base + i) for i in range(6)]
    requests = [data for data in images for _ in range(4)]  # each image 4 times, interleaved
    with ThreadPoolExecutor(max_workers=9) as pool:
        ingest = pool.submit(_queue_from_ingest, settings, sha256_hex(images[0]), reason)
        answers = list(pool.map(lambda data: predict(client, data), requests))
        ingest.result()
    assert [a.status_code for a in answers] == [200] * len(requests), answers[0].text
    image_ids = {a.json()["image_id"] for a in answers}
    assert len(image_ids) == len(images)

    with session_scope() as session:
        rows = list(
            session.exec(
                select(LabelingQueueItem).where(col(LabelingQueueItem.image_id).in_(image_ids))
            )
        )
    links = {row.image_id: row.label_studio_task_id for row in rows}
    assert set(links) == image_ids and None not in links.values(), links
    counts = _tasks_per_image(settings, image_ids)
    assert counts == Counter({image_id: 1 for image_id in image_ids}), counts
    project = review_project(settings)
    for image_id, task_id in links.items():
        assert project.ls.tasks.get(id=task_id).data[IMAGE_ID_KEY] == image_id


# --- an MLflow outage ---------------------------------------------------------------------------


def test_serving_keeps_the_champion_through_an_mlflow_outage(
    stack: Stack, settings: Settings, champion: str, client: TestClient, use_predictor: Any
) -> None:
    # Asks MLflow on every request: the outage is met by the very next prediction.
    predictor = ChampionPredictor(settings, recheck_s=0.0)
    use_predictor(predictor)
    assert predict(client, jpeg(1)).json()["model_version"] == champion
    with service_down(stack, MLFLOW):
        started = time.monotonic()
        answer = predict(client, jpeg(2))
        took = time.monotonic() - started
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == champion
        assert took < OUTAGE_BOUND_S, f"a prediction during the outage took {took:.0f} s"
        assert predictor.last_error is not None and "MLflow" in predictor.last_error

        # Never loaded a champion: a quick 503 that names MLflow.
        use_predictor(ChampionPredictor(settings))
        started = time.monotonic()
        answer = predict(client, jpeg(3))
        took = time.monotonic() - started
        assert answer.status_code == 503, answer.text
        assert "MLflow" in answer.json()["detail"]
        assert took < OUTAGE_BOUND_S, f"the 503 took {took:.0f} s"
    assert predict(client, jpeg(4)).json()["model_version"] == champion


# --- the weights cache and foreign weights ------------------------------------------------------


def test_a_partial_file_in_the_weights_cache_is_replaced(
    settings: Settings, champion: str, tmp_path: Path
) -> None:
    ref = registry.get_version(settings, champion)
    assert ref.sha256, "registration records the weights' checksum"
    cached = registry.weights_cache_dir(tmp_path, ref) / registry.WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"PK\x03\x04 half a download")  # what a killed download leaves

    weights = registry.download_weights(settings, ref, tmp_path)
    assert weights == cached
    assert registry.file_sha256(weights) == ref.sha256
    assert not [p for p in cached.parent.iterdir() if p.name != registry.WEIGHTS_FILE]


def _weights_key(settings: Settings, run_id: str) -> str:
    suffix = f"{run_id}/artifacts/{registry.WEIGHTS_DIR}/{registry.WEIGHTS_FILE}"
    keys = [
        o.key
        for o in ObjectStore(settings).list_objects(settings.bucket_mlflow)
        if o.key.endswith(suffix)
    ]
    assert len(keys) == 1, keys
    return keys[0]


def _copy_of_champion(settings: Settings, champion: str, tmp_path: Path) -> registry.ModelRef:
    """A new registered version with the champion's weights, in a run of its own."""
    mlflow = registry.client(settings)
    weights = registry.download_weights(
        settings, registry.get_version(settings, champion), tmp_path / "models"
    )
    run = mlflow.create_run(registry.ensure_experiment(settings), run_name="hostile-copy")
    mlflow.log_artifact(run.info.run_id, str(weights), registry.WEIGHTS_DIR)
    mlflow.set_terminated(run.info.run_id)
    return registry.register_weights(settings, run.info.run_id)


def test_weights_swapped_in_the_artifact_store_are_refused(
    settings: Settings, champion: str, client: TestClient, use_predictor: Any, tmp_path: Path
) -> None:
    predictor = ChampionPredictor(settings, recheck_s=0.0)
    use_predictor(predictor)
    assert predict(client, jpeg(5)).json()["model_version"] == champion
    copy = _copy_of_champion(settings, champion, tmp_path)
    # Someone with access to the bucket replaces the registered file.
    ObjectStore(settings).put_bytes(
        settings.bucket_mlflow, _weights_key(settings, copy.run_id), b"\x80\x04 not ours" * 4096
    )
    try:
        registry.set_alias(settings, registry.CHAMPION, copy.version)
        answer = predict(client, jpeg(6))
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == champion  # the previous champion still serves
        assert predictor.last_error is not None and "sha256" in predictor.last_error

        with pytest.raises(registry.WeightsChecksumError, match="sha256"):
            ChampionPredictor(settings).model_version()
    finally:
        registry.set_alias(settings, registry.CHAMPION, champion)
        registry.client(settings).delete_model_version(settings.model_name, copy.version)


def test_a_version_without_a_checksum_loads_only_once_a_person_vouches_for_it(
    settings: Settings, champion: str, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from cli.app import app
    from training.promotion import promote

    mlflow = registry.client(settings)
    vetted = registry.get_version(settings, champion)
    # What a registry from before checksums holds: the same weights, no checksum tag.
    untagged = mlflow.create_model_version(
        settings.model_name, source=vetted.source, run_id=vetted.run_id
    )
    try:
        with pytest.raises(registry.WeightsChecksumError, match="no visionloop.weights_sha256"):
            registry.download_weights(
                settings, registry.get_version(settings, untagged.version), tmp_path
            )
        with pytest.raises(registry.WeightsChecksumError, match="trust-weights"):
            promote(settings, untagged.version)
        assert registry.get_alias(settings, registry.CHAMPION).version == champion
        cli = CliRunner()
        refused = cli.invoke(app, ["trust-weights", untagged.version, "0" * 64])
        assert refused.exit_code == 1
        assert "you vetted: not trusted" in " ".join(refused.output.split())  # rich wraps
        assert registry.get_version(settings, untagged.version).sha256 is None

        trusted = cli.invoke(app, ["trust-weights", untagged.version, vetted.sha256.upper()])
        assert trusted.exit_code == 0, trusted.output
        ref = registry.get_version(settings, untagged.version)
        assert ref.sha256 == vetted.sha256
        assert (
            registry.file_sha256(registry.download_weights(settings, ref, tmp_path)) == ref.sha256
        )
    finally:
        mlflow.delete_model_version(settings.model_name, untagged.version)
