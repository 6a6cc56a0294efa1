"""The ingest flow against the real stack: S3 bucket in, Label Studio tasks out.

The session's champion is barely trained, so it is only sure of nothing: the flow keeps
boxes down to confidence 0.001 and selects by least confidence, and the expected queue is
recomputed from the predictions the flow stored (beside the control arm, a uniform draw the
flow keeps apart).
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from samples import awkward_files, good_jpegs, malformed_files
from sqlmodel import col, select

from api.main import create_app
from cli.stack import Stack, prefect_call
from ingestion.pipeline import QUARANTINE_PREFIX
from labeling.provision import client
from labeling.selection import SelectionPolicy
from labeling.tasks import IMAGE_ID_KEY, SAMPLE, WHY_KEY
from labeling.wiring import review_project
from monitoring.features import FEATURE_NAMES
from serving.embedding import from_blob
from serving.predictor import ChampionPredictor
from visionloop.db import session_scope
from visionloop.events import recent
from visionloop.models import Image, ImageStatus, LabelingQueueItem, Prediction
from visionloop.registry import CHAMPION, get_alias, register_weights, set_alias
from visionloop.registry import client as client_of
from visionloop.settings import Settings, get_settings
from visionloop.storage import ObjectStore, sha256_hex
from visionloop.synthetic import generate_sample

pytestmark = [pytest.mark.stack, pytest.mark.slow]

PREFIX = "ingest-test/"
BATCH = 8
BUDGET = 6
POLICY = SelectionPolicy(
    strategy="least_confidence", budget=BUDGET, audit_rate=0.0, control_rate=0.25
)
CONTROLS = math.ceil(BUDGET * POLICY.control_rate)
CONF = 0.001


def run_ingest(**params: Any) -> tuple[dict[str, Any], str]:
    """The flow's summary and its Prefect flow-run id."""
    from flows.ingest import ingest_flow

    params = {"prefix": PREFIX, "batch_size": BATCH, "conf": CONF, "selection": POLICY, **params}
    state = ingest_flow(**params, return_state=True)
    return state.result(), str(state.state_details.flow_run_id)


@pytest.fixture(scope="module")
def champion(stack: Stack) -> str:
    from flows.bootstrap import bootstrap_flow

    return bootstrap_flow(epochs=2, images=16)["version"]


@pytest.fixture(scope="module")
def files() -> dict[str, dict[str, Any]]:
    return {
        "good": good_jpegs(12, seed=101),
        "awkward": awkward_files(102),
        "malformed": malformed_files(103),
    }


@pytest.fixture(scope="module")
def first_run(champion: str, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    settings = get_settings()
    store = ObjectStore(settings)
    for name, data in files["good"].items():
        store.put_bytes(settings.bucket_incoming, PREFIX + name, data)
    for name, awkward in files["awkward"].items():
        store.put_bytes(settings.bucket_incoming, PREFIX + "awkward/" + name, awkward.data)
    for name, (data, _) in files["malformed"].items():
        store.put_bytes(settings.bucket_incoming, PREFIX + "bad/" + name, data)
    # The same bytes under a second key: one image.
    store.put_bytes(
        settings.bucket_incoming, PREFIX + "copy/img_000.jpg", files["good"]["img_000.jpg"]
    )
    summary, flow_run_id = run_ingest()
    return {"summary": summary, "flow_run_id": flow_run_id}


def uri(settings: Settings, name: str) -> str:
    return f"s3://{settings.bucket_incoming}/{PREFIX}{name}"


def image_by_source(source: str) -> Image | None:
    with session_scope() as session:
        return session.exec(select(Image).where(Image.source_key == source)).first()


def run_images(settings: Settings) -> list[Image]:
    with session_scope() as session:
        rows = session.exec(
            select(Image).where(col(Image.source_key).startswith(uri(settings, "")))
        )
        return list(rows)


def test_every_file_is_accounted_for(
    first_run: dict[str, Any], files: dict[str, dict[str, Any]]
) -> None:
    summary = first_run["summary"]
    valid = len(files["good"]) + len(files["awkward"])
    assert summary["files"] == valid + len(files["malformed"]) + 1
    assert (summary["ingested"], summary["quarantined"], summary["duplicates"]) == (
        valid,
        len(files["malformed"]),
        1,
    )


def test_malformed_files_are_quarantined_each_with_its_reason(
    settings: Settings, first_run: dict[str, Any], files: dict[str, dict[str, Any]]
) -> None:
    store = ObjectStore(settings)
    reasons = {}
    for name, (data, code) in files["malformed"].items():
        row = image_by_source(uri(settings, "bad/" + name))
        assert row is not None, name
        assert row.status == ImageStatus.quarantined
        assert row.quarantine_reason.startswith(f"{code}: "), (name, row.quarantine_reason)
        assert row.content_hash == sha256_hex(data)
        assert row.object_key.startswith(QUARANTINE_PREFIX)
        assert store.get_bytes(settings.bucket_quarantine, row.object_key) == data
        reasons[name] = row.quarantine_reason
    assert len(set(reasons.values())) == len(reasons)  # precise: no two files share a reason
    assert first_run["summary"]["quarantine"] == {
        uri(settings, "bad/" + n): r for n, r in reasons.items()
    }


def test_awkward_valid_files_are_ingested(
    settings: Settings, first_run: dict[str, Any], files: dict[str, dict[str, Any]]
) -> None:
    store = ObjectStore(settings)
    for name, expected in files["awkward"].items():
        row = image_by_source(uri(settings, "awkward/" + name))
        assert row is not None, name
        assert row.status in (ImageStatus.predicted, ImageStatus.queued), (
            name,
            row.quarantine_reason,
        )
        assert (row.format, row.width, row.height) == (
            expected.format,
            expected.width,
            expected.height,
        ), name
        assert row.object_key.endswith(expected.extension), name
        assert set(row.features) == set(FEATURE_NAMES)
        assert (row.features["width"], row.features["height"]) == (expected.width, expected.height)
        assert store.get_bytes(settings.bucket_images, row.object_key) == expected.data


def test_identical_bytes_are_one_image(
    settings: Settings, first_run: dict[str, Any], files
) -> None:
    digest = sha256_hex(files["good"]["img_000.jpg"])
    with session_scope() as session:
        rows = list(session.exec(select(Image).where(Image.content_hash == digest)))
    assert len(rows) == 1
    assert rows[0].source_key in (uri(settings, "img_000.jpg"), uri(settings, "copy/img_000.jpg"))


def test_each_image_is_predicted_once_by_the_champion(
    settings: Settings, first_run: dict[str, Any], champion: str
) -> None:
    ingested = [i for i in run_images(settings) if i.status != ImageStatus.quarantined]
    with session_scope() as session:
        predictions = list(
            session.exec(
                select(Prediction).where(col(Prediction.image_id).in_([i.id for i in ingested]))
            )
        )
    assert sorted(p.image_id for p in predictions) == sorted(i.id for i in ingested)
    assert (
        {p.model_version for p in predictions}
        == {champion}
        == {first_run["summary"]["model_version"]}
    )
    for p in predictions:
        assert p.num_boxes == len(p.boxes) > 0  # at confidence 0.001 even this model says something
        assert p.min_confidence == min(b["conf"] for b in p.boxes) >= CONF
        assert all(0 <= b["x1"] < b["x2"] <= 1 and 0 <= b["y1"] < b["y2"] <= 1 for b in p.boxes)


def run_queue(settings: Settings) -> dict[int, LabelingQueueItem]:
    """The queue rows of this module's images, by image id."""
    ids = [i.id for i in run_images(settings)]
    with session_scope() as session:
        rows = session.exec(
            select(LabelingQueueItem).where(col(LabelingQueueItem.image_id).in_(ids))
        )
        return {q.image_id: q for q in rows}


def expected_queue(settings: Settings, control: set[int]) -> list[int]:
    """Least confidence over the images the control arm left, recomputed from the stored
    predictions: the weakest boxes first, exact ties by content hash."""
    content = {
        i.id: i.content_hash for i in run_images(settings) if i.status != ImageStatus.quarantined
    }
    with session_scope() as session:
        predictions = session.exec(
            select(Prediction).where(col(Prediction.image_id).in_(list(content)))
        )
        uncertain = [
            (p.min_confidence, content[p.image_id], p.image_id)
            for p in predictions
            if p.min_confidence is not None
            and p.min_confidence < POLICY.high
            and p.image_id not in control
        ]
    return [image_id for *_, image_id in sorted(uncertain)[: BUDGET - len(control)]]


def test_uncertain_images_become_label_studio_tasks_with_predictions(
    settings: Settings, first_run: dict[str, Any], champion: str
) -> None:
    items = run_queue(settings)
    control = {i for i, q in items.items() if q.arm == "control"}
    assert len(control) == CONTROLS
    expected = expected_queue(settings, control)
    assert len(expected) == BUDGET - CONTROLS
    assert sorted(first_run["summary"]["queued_images"]) == sorted([*expected, *control])
    assert set(items) == {*expected, *control}
    with session_scope() as session:
        predictions = {
            p.image_id: p
            for p in session.exec(select(Prediction).where(col(Prediction.image_id).in_(items)))
        }
        images = {i.id: i for i in session.exec(select(Image).where(col(Image.id).in_(items)))}

    token = settings.label_studio_token.get_secret_value()
    ls = client(settings.label_studio, token)
    for image_id in items:
        item, prediction, image = items[image_id], predictions[image_id], images[image_id]
        assert item.cycle == first_run["flow_run_id"]
        assert item.score_parts  # every row keeps why it was chosen
        if image_id in control:
            assert (item.arm, item.flagged_reason) == ("control", "control")
        else:
            assert (item.arm, item.flagged_reason) == ("selected", "least_confidence")
            assert item.confidence_score == prediction.min_confidence
        assert item.prediction_id == prediction.id and item.status == "pending"
        assert image.status == ImageStatus.queued
        task = ls.tasks.get(id=item.label_studio_task_id)
        assert task.data[IMAGE_ID_KEY] == image_id
        if image_id in control:
            # The reviewer is not told which images are controls: they read as a sample.
            assert task.data[WHY_KEY] == task.data["flagged_reason"] == SAMPLE
            assert "control" not in str(task.data)
        else:
            parts = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in item.score_parts.items())
            assert task.data[WHY_KEY] == f"least_confidence: {parts}"
        [pre] = task.predictions
        assert pre.model_version == champion
        assert [r["score"] for r in pre.result] == [b["conf"] for b in prediction.boxes]
        assert [r["value"]["rectanglelabels"] for r in pre.result] == [
            [b["name"]] for b in prediction.boxes
        ]
        first, box = pre.result[0], prediction.boxes[0]
        assert first["value"]["x"] == pytest.approx(box["x1"] * 100)
        assert first["value"]["width"] == pytest.approx((box["x2"] - box["x1"]) * 100)
        assert (first["original_width"], first["original_height"]) == (image.width, image.height)
        # Label Studio serves the image itself, from the object store.
        shown = httpx.get(
            task.data["image"], headers={"Authorization": f"Token {token}"}, timeout=30
        )
        assert shown.status_code == 200
        assert shown.content == ObjectStore(settings).get_bytes(
            settings.bucket_images, image.object_key
        )
    # The review screen shows the task's why above the image.
    project = review_project(settings)
    assert '"$why"' in ls.projects.get(id=project.id).label_config


def test_every_predicted_image_keeps_its_embedding_and_near_misses(
    settings: Settings, first_run: dict[str, Any]
) -> None:
    ids = [i.id for i in run_images(settings) if i.status != ImageStatus.quarantined]
    with session_scope() as session:
        predictions = list(
            session.exec(select(Prediction).where(col(Prediction.image_id).in_(ids)))
        )
    assert len(predictions) == len(ids)
    vectors = np.stack([from_blob(p.embedding) for p in predictions])
    assert vectors.shape[1] > 0
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-2)
    assert len({v.tobytes() for v in vectors}) == len(vectors)  # distinct images, vectors
    # Shown down to 0.001, under the 0.01 candidate floor: nothing is left to keep below.
    assert all(p.below == [] for p in predictions)


def test_the_queue_api_shows_arm_cycle_and_score_parts(
    settings: Settings, first_run: dict[str, Any]
) -> None:
    items = run_queue(settings)
    auth = {"Authorization": f"Bearer {settings.api_token.get_secret_value()}"}
    with TestClient(create_app()) as api:
        page = api.get("/api/labeling/queue", params={"limit": 500}, headers=auth)
    assert page.status_code == 200, page.text
    shown = {i["image_id"]: i for i in page.json()["items"] if i["image_id"] in items}
    assert set(shown) == set(items)
    for image_id, item in items.items():
        assert shown[image_id]["arm"] == item.arm
        assert shown[image_id]["cycle"] == item.cycle == first_run["flow_run_id"]
        assert shown[image_id]["score_parts"] == pytest.approx(item.score_parts)
    assert {i["arm"] for i in shown.values()} == {"selected", "control"}


def test_work_is_batched_and_progress_reported(
    settings: Settings, first_run: dict[str, Any]
) -> None:
    flow_run_id = first_run["flow_run_id"]
    task_runs = prefect_call(
        settings, "POST", "task_runs/filter", body={"flow_runs": {"id": {"any_": [flow_run_id]}}}
    ).json()
    names = sorted(t["name"].rsplit("-", 1)[0] for t in task_runs)
    batches = math.ceil(first_run["summary"]["files"] / BATCH)
    assert names.count("ingest_files") == batches
    assert len(names) == batches + 2  # find_new_files, queue_uncertain: never a task per image

    artifacts = prefect_call(
        settings,
        "POST",
        "artifacts/filter",
        body={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}},
    ).json()
    by_key = {a["key"]: a for a in artifacts}
    assert by_key["ingest-progress"]["data"] == 100.0
    assert "bad/bomb.png" in by_key["ingest-summary"]["data"]

    progress = [
        e
        for e in recent(limit=500, kind_prefix="ingest.progress")
        if e.payload.get("total") == first_run["summary"]["files"]
    ]
    assert len(progress) >= batches
    assert any(e.kind == "queue.added" for e in recent(limit=50, kind_prefix="queue."))


def _footprint(settings: Settings) -> dict[str, int]:
    store = ObjectStore(settings)
    with session_scope() as session:
        counts = {
            table.__tablename__: len(list(session.exec(select(table.id))))
            for table in (Image, Prediction, LabelingQueueItem)
        }
    project = review_project(settings)
    counts["tasks"] = len(list(project.ls.tasks.list(project=project.id, fields="task_only")))
    for bucket in (settings.bucket_images, settings.bucket_quarantine):
        counts[bucket] = len(list(store.list_objects(bucket)))
    return counts


def test_a_second_run_adds_nothing_anywhere(
    settings: Settings, first_run: dict[str, Any], files
) -> None:
    before = _footprint(settings)
    summary, _ = run_ingest()
    # Only the one name whose bytes were ingested under another name is read again (the
    # database records one source name per image); it is recognised as a duplicate.
    assert (summary["files"], summary["duplicates"]) == (1, 1)
    assert (summary["ingested"], summary["quarantined"], summary["queued"]) == (0, 0, 0)
    assert _footprint(settings) == before

    # Known bytes under a new name: recognised, still nothing added.
    ObjectStore(settings).put_bytes(
        settings.bucket_incoming, PREFIX + "later/again.jpg", files["good"]["img_001.jpg"]
    )
    summary, _ = run_ingest()
    assert (summary["files"], summary["duplicates"], summary["ingested"], summary["queued"]) == (
        2,
        2,
        0,
        0,
    )
    assert _footprint(settings) == before


def test_a_local_folder_works_too(settings: Settings, champion: str, tmp_path: Path) -> None:
    folder = tmp_path / "drop"
    (folder / "sub").mkdir(parents=True)
    for name, data in good_jpegs(2, seed=104).items():
        (folder / "sub" / name).write_bytes(data)
    (folder / "README").write_text(f"not an image {uuid.uuid4()}")
    summary, _ = run_ingest(folder=str(folder), selection=SelectionPolicy(budget=0))
    assert (summary["files"], summary["ingested"], summary["quarantined"]) == (3, 2, 1)
    row = image_by_source((folder / "sub" / "img_000.jpg").as_uri())
    assert row is not None and row.status == ImageStatus.predicted
    assert run_ingest(folder=str(folder))[0]["files"] == 0  # every name is known


def test_the_predictor_follows_the_champion_alias(settings: Settings, champion: str) -> None:
    predictor = ChampionPredictor(settings, recheck_s=0.0)
    assert predictor.model_version() == champion
    original = get_alias(settings, CHAMPION)
    assert original is not None and original.run_id
    challenger = register_weights(settings, original.run_id)  # same weights, a new version
    try:
        set_alias(settings, CHAMPION, challenger.version)
        image = generate_sample(0, seed=105, size=settings.image_size).image
        [result] = predictor.predict_batch([image])
        assert result.model_version == challenger.version != champion
    finally:
        set_alias(settings, CHAMPION, original.version)
        client_of(settings).delete_model_version(settings.model_name, challenger.version)
    assert predictor.model_version() == champion
