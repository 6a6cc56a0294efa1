"""Embeddings from the champion's own forward pass, sub-threshold candidates and the flip pass.

The unit tests run a real (untrained) YOLOv8n built from its YAML: what they check holds for
any weights. The stack tests use the session's champion through ``ChampionPredictor``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from samples import good_jpegs
from sqlmodel import select

from ingestion.pipeline import ingest_batch, list_folder
from ingestion.selection_context import selection_context
from labeling.reference import load_reference, reference_key, store_reference
from labeling.scoring import flip_disagreement
from serving.embedding import (
    EARLY_LAYER,
    from_blob,
    mirror,
    normalise,
    predict_with_features,
    to_blob,
    unmirror_boxes,
)
from serving.predictor import ChampionPredictor, get_predictor
from training.snapshots import read_manifest, training_snapshot_of
from visionloop.db import session_scope
from visionloop.images import decode_image
from visionloop.models import Prediction
from visionloop.registry import CHAMPION, download_weights, get_alias
from visionloop.storage import ObjectStore
from visionloop.synthetic import generate_sample

IMGSZ = 160
DIM = 2 * 32
"""A YOLOv8n's embedding: mean and std of each of the early block's 32 channels."""
CONF = 0.001
"""Where the session's barely trained champion shows boxes at all."""


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from training.trainer import configure_ultralytics

    configure_ultralytics(tmp_path_factory.mktemp("ultralytics"))
    from ultralytics import YOLO

    return YOLO("yolov8n.yaml", task="detect")


def bgr_images(count: int, seed: int) -> list[np.ndarray]:
    return [
        np.ascontiguousarray(generate_sample(i, seed=seed, size=IMGSZ).image[:, :, ::-1])
        for i in range(count)
    ]


def _counted(model: Any) -> tuple[list[Any], Any]:
    """Forward calls of the network ``model.predict`` runs, and their input tensors, recorded
    from the next predict on (the hook is attached where ultralytics' predictor runs it)."""
    inputs: list[Any] = []
    handles: list[Any] = []

    def attach(predictor: Any) -> None:
        handles.append(
            predictor.model.model.register_forward_pre_hook(
                lambda _m, args: inputs.append(args[0].detach().clone())
            )
        )

    model.callbacks["on_predict_start"].append(attach)

    def detach() -> None:
        model.callbacks["on_predict_start"].remove(attach)
        for handle in handles:
            handle.remove()

    return inputs, detach


def manual_embedding(network: Any, im: Any) -> np.ndarray:
    """The embedding computed by running the network's first layers by hand: the per-channel
    mean and standard deviation of the early block's output."""
    import torch

    x = im
    with torch.no_grad():
        for layer in network.model[: EARLY_LAYER + 1]:
            assert layer.f == -1  # the stem is a plain chain
            x = layer(x)
        early = x.float()
        looks = torch.cat([early.mean(dim=(2, 3)), early.std(dim=(2, 3))], dim=1)
    return normalise(looks.numpy())


def test_the_embedding_comes_from_the_prediction_forward_pass(model: Any) -> None:
    images = bgr_images(4, seed=11)
    model.predict(images[:1], imgsz=IMGSZ, verbose=False)  # the predictor is set up before
    callbacks = list(model.callbacks["on_predict_start"])
    inputs, detach = _counted(model)
    try:
        results, embeddings = predict_with_features(model, images, imgsz=IMGSZ, verbose=False)
    finally:
        detach()
    assert model.callbacks["on_predict_start"] == callbacks
    assert len(results) == 4 and len(inputs) == 1  # one forward for the whole batch
    assert inputs[0].shape[0] == 4
    assert embeddings.shape == (4, DIM) and embeddings.dtype == np.float32
    expected = manual_embedding(model.predictor.model.model, inputs[0])
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)
    # Nothing stays attached: the next plain predict runs no hook of ours.
    assert not model.predictor.model.model.model[EARLY_LAYER]._forward_hooks


def test_the_first_predict_of_a_fresh_model_is_embedded_too(tmp_path: Any) -> None:
    from ultralytics import YOLO

    fresh = YOLO("yolov8n.yaml", task="detect")  # no predictor yet: set up inside the call
    images = bgr_images(2, seed=12)
    results, embeddings = predict_with_features(fresh, images, imgsz=IMGSZ, verbose=False)
    assert len(results) == 2 and embeddings.shape == (2, DIM)


def test_embeddings_are_deterministic_normalised_and_per_image(model: Any) -> None:
    images = bgr_images(3, seed=13)
    _, first = predict_with_features(model, images, imgsz=IMGSZ, verbose=False)
    _, again = predict_with_features(model, images, imgsz=IMGSZ, verbose=False)
    _, reversed_ = predict_with_features(model, images[::-1], imgsz=IMGSZ, verbose=False)
    _, alone = predict_with_features(model, images[1:2], imgsz=IMGSZ, verbose=False)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(reversed_[::-1], first, atol=1e-5)
    np.testing.assert_allclose(alone[0], first[1], atol=1e-5)  # batch neighbours do not matter
    assert not np.allclose(first[0], first[1])  # different images, different vectors


def test_a_stored_embedding_reads_back_within_half_precision() -> None:
    vector = normalise(np.random.default_rng(0).normal(size=(1, DIM)))[0]
    blob = to_blob(vector)
    assert len(blob) == DIM * 2
    back = from_blob(blob)
    assert back.dtype == np.float32 and back.shape == (DIM,)
    np.testing.assert_allclose(back, vector, atol=1e-3)


def test_mirrored_boxes_map_back() -> None:
    image = np.arange(2 * 3 * 3).reshape(2, 3, 3).astype(np.uint8)
    [flipped] = mirror([image])
    assert flipped.flags.c_contiguous
    np.testing.assert_array_equal(flipped[:, 0], image[:, 2])
    boxes = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.0, 1.0, 1.0]])
    np.testing.assert_allclose(unmirror_boxes(boxes), [[0.7, 0.2, 0.9, 0.4], [0.0, 0.0, 0.5, 1.0]])
    np.testing.assert_allclose(unmirror_boxes(unmirror_boxes(boxes)), boxes)


# --- the champion on the stack ----------------------------------------------------------------


@pytest.fixture(scope="module")
def champion(stack: Any) -> str:
    from flows.bootstrap import bootstrap_flow

    return bootstrap_flow(epochs=2, images=16)["version"]


def rgb_images(count: int, seed: int, size: int) -> list[np.ndarray]:
    return [generate_sample(i, seed=seed, size=size).image for i in range(count)]


@pytest.mark.stack
@pytest.mark.slow
def test_the_predictor_shows_boxes_over_conf_and_keeps_the_near_misses(
    settings: Any, champion: str, tmp_path: Any
) -> None:
    from ultralytics import YOLO

    # This barely trained champion is sure of nothing: it only almost-sees things, under the
    # default candidate floor of 0.01, so the floor goes lower to give it near misses.
    floor = 0.0005
    predictor = ChampionPredictor(settings.model_copy(update={"candidate_conf": floor}))
    images = rgb_images(4, seed=21, size=settings.image_size)
    probe = predictor.predict_batch(images, conf=floor)
    confs = sorted({b["conf"] for r in probe for b in r.boxes})
    assert len(confs) > 1, "the champion finds no candidates to tell apart"
    # Between two confidences near the median: some boxes shown, some under the threshold.
    middle = len(confs) // 2
    display = (confs[middle - 1] + confs[middle]) / 2

    results = predictor.predict_batch(images, conf=display)
    # The shown boxes are what ultralytics itself returns at the display confidence.
    weights = download_weights(settings, get_alias(settings, CHAMPION), tmp_path)
    plain = YOLO(str(weights), task="detect").predict(
        [np.ascontiguousarray(i[:, :, ::-1]) for i in images], conf=display, verbose=False
    )
    for result, own, everything in zip(results, plain, probe):
        assert result.model_version == champion
        assert [b["conf"] for b in result.boxes] == pytest.approx(
            sorted(own.boxes.conf.tolist(), reverse=True), abs=1e-6
        )
        below = [conf for _, conf in result.below]
        assert all(floor <= c < display for c in below), (floor, display, below)
        assert below == sorted(below, reverse=True) and len(below) <= 32
        expected = [b["conf"] for b in everything.boxes if b["conf"] < display][:32]
        assert below == pytest.approx(expected, abs=1e-6)
        assert result.embedding is not None
        np.testing.assert_allclose(result.embedding, everything.embedding, atol=1e-6)
    assert any(r.boxes for r in results) and any(r.below for r in results)


@pytest.mark.stack
@pytest.mark.slow
def test_flip_predicts_the_mirror_image_and_maps_its_boxes_back(
    settings: Any, champion: str
) -> None:
    predictor = ChampionPredictor(settings)
    images = rgb_images(3, seed=22, size=settings.image_size)
    mirrored = [np.ascontiguousarray(i[:, ::-1]) for i in images]
    conf = 0.001  # this barely trained champion's boxes are all weak
    upright = predictor.predict_batch(images, conf=conf)
    flipped = predictor.predict_batch(mirrored, conf=conf, flip=True)
    assert sum(len(r.boxes) for r in upright) > 0
    for seen, back in zip(upright, flipped):
        # The mirror of the mirror image is the image: the boxes found on it, mapped into
        # the mirrored frame, are the image's boxes mirrored.
        expected = [
            (b["cls"], b["conf"], 1 - b["x2"], b["y1"], 1 - b["x1"], b["y2"]) for b in seen.boxes
        ]
        got = [(b["cls"], b["conf"], b["x1"], b["y1"], b["x2"], b["y2"]) for b in back.boxes]
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g[0] == e[0] and g[1:] == pytest.approx(e[1:], abs=2e-6)
        assert back.embedding is None and seen.embedding is not None


@pytest.mark.stack
@pytest.mark.slow
def test_the_champion_reference_is_embedded_once_and_reused(settings: Any, champion: str) -> None:
    store = ObjectStore(settings)
    ref = get_alias(settings, CHAMPION)
    assert ref is not None and ref.version == champion
    key = reference_key(settings.model_name, champion)
    store.delete(settings.bucket_reports, key)  # computed by another test maybe: start afresh
    predictor = get_predictor(settings)
    with session_scope() as session:
        context = selection_context(
            session, settings, store, predictor, champion, "cycle-1", session_scope
        )
        snapshot = training_snapshot_of(session, settings, ref)
        assert snapshot is not None
        manifest = read_manifest(settings, snapshot, store)
    assert context.cycle == "cycle-1"
    assert context.class_weights == {}  # a bootstrap champion was never evaluated per class
    train = sorted(
        (i for i in manifest["images"] if i["split"] == "train"), key=lambda i: i["image_hash"]
    )
    reference = context.reference
    assert reference is not None
    assert reference.shape == (len(train), DIM)
    np.testing.assert_allclose(np.linalg.norm(reference, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(load_reference(settings, store, ref), reference)

    # The sample is ordered by content hash, each row that image's embedding by the champion.
    data = store.get_bytes(settings.bucket_datasets, snapshot.object_prefix + train[0]["image"])
    decoded = decode_image(data, max_side=predictor.input_size())
    [result] = predictor.predict_batch([decoded.rgb])
    np.testing.assert_allclose(reference[0], result.embedding, atol=1e-5)

    # Once stored it is read, not computed again.
    marker = np.eye(2, DIM, dtype=np.float32)
    store_reference(settings, store, ref, marker)
    try:
        with session_scope() as session:
            again = selection_context(
                session, settings, store, predictor, champion, "cycle-2", session_scope
            )
        np.testing.assert_array_equal(again.reference, marker)
    finally:
        store.delete(settings.bucket_reports, key)


@pytest.mark.stack
@pytest.mark.slow
def test_ingested_candidates_carry_their_evidence_and_the_flip_pass_scores_them(
    settings: Any, champion: str, tmp_path: Path
) -> None:
    for name, data in good_jpegs(3, seed=23).items():
        (tmp_path / name).write_bytes(data)
    store = ObjectStore(settings)
    predictor = get_predictor(settings)
    with session_scope() as session:
        report = ingest_batch(
            session, settings, store, list_folder(tmp_path), predictor=predictor, conf=CONF
        )
    candidates = report.candidates
    assert len(candidates) == 3
    for c in candidates:
        assert c.embedding is not None and c.embedding.shape == (DIM,)
        assert list(c.classes) == [int(b[0]) for b in c.boxes]
        assert list(c.confidences) == [b[1] for b in c.boxes]
        assert c.boxes and all(conf >= CONF for conf in c.confidences)
        with session_scope() as session:
            [row] = session.exec(select(Prediction).where(Prediction.image_id == c.image_id))
        # What is stored is what selection saw (the embedding at half precision).
        np.testing.assert_allclose(from_blob(row.embedding), c.embedding, atol=1e-3)
        assert row.below == [list(b) for b in c.below]

    with session_scope() as session:
        context = selection_context(
            session, settings, store, predictor, champion, "cycle-3", session_scope, conf=CONF
        )
    assert context.flip is not None
    scores = context.flip(candidates)
    assert set(scores) == {c.image_id for c in candidates}
    images = [
        decode_image(d, max_side=predictor.input_size()).rgb for d in good_jpegs(3, 23).values()
    ]
    mirrored = predictor.predict_batch(images, conf=CONF, flip=True)
    for c, result in zip(candidates, mirrored):
        flipped = [(b["cls"], b["conf"], b["x1"], b["y1"], b["x2"], b["y2"]) for b in result.boxes]
        assert scores[c.image_id] == pytest.approx(flip_disagreement(c.boxes, flipped))
        assert 0.0 <= scores[c.image_id] <= 1.0


@pytest.mark.stack
@pytest.mark.slow
def test_a_prediction_served_by_the_api_is_stored_with_its_embedding(
    settings: Any, champion: str
) -> None:
    from fastapi.testclient import TestClient

    from api.main import create_app

    [data] = good_jpegs(1, seed=24).values()
    auth = {"Authorization": f"Bearer {settings.api_token.get_secret_value()}"}
    with TestClient(create_app()) as api:
        answer = api.post(
            "/api/predict", headers=auth, files={"file": ("frame.jpg", data, "image/jpeg")}
        )
    assert answer.status_code == 200, answer.text
    served = answer.json()
    assert "embedding" not in served and "below" not in served  # the answer keeps its shape
    with session_scope() as session:
        logged = session.get(Prediction, served["prediction_id"])
    assert logged is not None and logged.source == "api"
    assert logged.embedding is not None and logged.below is not None
    assert np.linalg.norm(from_blob(logged.embedding)) == pytest.approx(1.0, abs=1e-2)
