"""The demo's synthetic camera: rounds into the real S3 server, ground truth by content hash."""

from __future__ import annotations

import numpy as np
import pytest

from cli.loop_report import render_markdown
from cli.production_stream import GroundTruth, StreamPlan, upload_round
from visionloop.settings import Settings
from visionloop.storage import ObjectStore, sha256_hex
from visionloop.synthetic import DriftParams


def test_plan_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="rounds"):
        StreamPlan(rounds=0)
    with pytest.raises(ValueError, match="shift_round"):
        StreamPlan(rounds=3, shift_round=4)
    plan = StreamPlan(rounds=3, shift_round=1)
    assert [plan.drifted(i) for i in range(3)] == [False, True, True]


@pytest.mark.stack
def test_rounds_upload_new_images_with_their_ground_truth(settings: Settings, tmp_path) -> None:
    store = ObjectStore(settings)
    truth = GroundTruth(tmp_path / "truth.json")
    plan = StreamPlan(
        rounds=2,
        images_per_round=3,
        shift_round=1,
        broken_every=2,
        drift=DriftParams(brightness=-0.3),
    )
    first = upload_round(settings, plan, 0, truth, run_tag="t1", store=store)
    second = upload_round(settings, plan, 1, truth, run_tag="t1", store=store)

    assert (first.drifted, second.drifted) == (False, True)
    assert first.prefix == "demo/t1/round-00/" and len(first.image_keys) == 3
    assert first.broken_keys == [] and len(second.broken_keys) == 2  # every second round
    # The stream moves on: no image is uploaded twice.
    assert len(set(first.image_keys + second.image_keys)) == 6

    # What is in the bucket is what the ground truth is keyed by, and it survives a reload.
    reloaded = GroundTruth(tmp_path / "truth.json")
    assert reloaded.next_index == 6
    brightness = []
    for key in first.image_keys + second.image_keys:
        data = store.get_bytes(settings.bucket_incoming, key)
        boxes = reloaded.get(sha256_hex(data))
        assert boxes is not None
        assert all(
            0 <= cx <= 1 and 0 <= cy <= 1 and 0 < w <= 1 and 0 < h <= 1 for _, cx, cy, w, h in boxes
        )
        import io

        from PIL import Image

        brightness.append(np.asarray(Image.open(io.BytesIO(data)).convert("L")).mean())
    assert np.mean(brightness[3:]) < np.mean(brightness[:3]) - 30  # the lighting changed
    for key in second.broken_keys:
        assert store.get_bytes(settings.bucket_incoming, key)
        assert reloaded.get(sha256_hex(store.get_bytes(settings.bucket_incoming, key))) is None


def test_report_renders_every_section() -> None:
    report = {
        "run_tag": "20261121-120000",
        "started_at": "a",
        "finished_at": "b",
        "images": {
            "files": 5,
            "ingested": 4,
            "quarantined": 1,
            "queued": 2,
            "labelled": 2,
            "quarantine_reasons": {"bad.jpg": "not an image: HTML document"},
            "queued_by_reason": {"confidence_band": 2},
            "reviewers": {"x": 2},
        },
        "rounds": [
            {
                "round": 0,
                "drifted": False,
                "uploaded": 4,
                "queued": 2,
                "labelled": 2,
                "drift_level": "red",
                "decision": "Retrain now: drift.",
            }
        ],
        "drift": [
            {
                "at": "2026-11-21T12:00:00",
                "level": "red",
                "score": 0.9,
                "drifted_features": ["brightness"],
            }
        ],
        "retrains": [
            {
                "id": 3,
                "trigger": "drift",
                "promoted": True,
                "status": "succeeded",
                "reason": "Drift is red.",
                "reasons": ["mAP50-95 rose."],
                "error": None,
            }
        ],
        "comparison": {
            "holdout_hash": "f" * 64,
            "holdout_images": 9,
            "before": {"version": "1", "metrics": {"mAP50": 0.4, "mAP50-95": 0.2}},
            "after": {"version": "2", "metrics": {"mAP50": 0.9, "mAP50-95": 0.5}},
        },
    }
    text = render_markdown(report)
    for needle in (
        "not an image: HTML document",
        "| 0 | no | 4 | 2 | 2 | red |",
        "brightness",
        "Retraining run 3 (drift): promoted",
        "- mAP50-95 rose.",
        "| after | 2 | 0.900 | 0.500 |",
    ):
        assert needle in text, needle
