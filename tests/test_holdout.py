"""The frozen held-out set: how it grows, that a sealed version never changes, and that two
exports at once never seal two versions under one number."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from training.comparison import pick_examples, render
from training.evaluation import ImageResult
from training.holdout import claim_version, plan_growth
from training.interval import ImageStats
from visionloop.formats import Entry, LabeledImage
from visionloop.models import DatasetSnapshot
from visionloop.settings import Settings


def _entry(image_hash: str) -> Entry:
    return Entry(LabeledImage(image_hash, ".jpg", 64, 64, ()), "test")


def test_the_first_version_takes_the_whole_test_split_later_ones_wait_for_the_growth() -> None:
    test = [_entry(h) for h in ("a1", "b2", "c3")]
    first = plan_growth(None, test, growth=10)
    assert first.seal and [e.image.image_hash for e in first.new] == ["a1", "b2", "c3"]
    assert not plan_growth(None, [], growth=1).seal  # nothing to hold out yet

    frozen = {"a1", "b2"}
    waiting = plan_growth(frozen, test, growth=2)
    assert not waiting.seal and [e.image.image_hash for e in waiting.new] == ["c3"]
    grown = plan_growth(frozen, [*test, _entry("d4")], growth=2)
    assert grown.seal and [e.image.image_hash for e in grown.new] == ["c3", "d4"]
    assert not plan_growth({"a1", "b2", "c3"}, test, growth=1).seal  # nothing new


def _holdout_row(session: Session, tag: str) -> int:
    row = DatasetSnapshot(
        manifest_hash=f"{tag:0>64}", kind="holdout", object_prefix=f"snapshots/{tag}/"
    )
    session.add(row)
    session.commit()
    assert row.id is not None
    return row.id


@pytest.mark.parametrize("racers", [8])
def test_exports_racing_for_one_version_number_give_it_to_exactly_one(
    engine: Engine, racers: int
) -> None:
    with Session(engine) as session:
        rows = [_holdout_row(session, f"race{i}") for i in range(racers)]
        assert claim_version(session, _holdout_row(session, "first"), 1)

    def race(number: int) -> list[bool]:
        start = threading.Barrier(racers)
        won = [False] * racers

        def claim(i: int) -> None:
            with Session(engine) as session:
                start.wait()
                won[i] = claim_version(session, rows[i], number)

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(racers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return won

    for number in (2, 3):
        won = race(number)
        assert sum(won) == 1, won
        with Session(engine) as session:
            holders = session.exec(
                select(DatasetSnapshot).where(DatasetSnapshot.holdout_version == number)
            ).all()
        assert [h.id for h in holders] == [rows[won.index(True)]]
    with Session(engine) as session:
        # A number at or below the newest one is never given again, not even to a new row.
        assert not claim_version(session, _holdout_row(session, "late"), 2)
        numbered = session.exec(
            select(DatasetSnapshot.holdout_version).where(
                DatasetSnapshot.holdout_version.is_not(None)  # type: ignore[union-attr]
            )
        ).all()
    assert sorted(numbered) == [1, 2, 3]


def _result(image_hash: str, found: int, boxes: int) -> ImageResult:
    tp = np.zeros((found + 1, 10), dtype=bool)
    tp[:found] = True
    stats = ImageStats(tp, np.linspace(0.9, 0.1, found + 1), np.zeros(found + 1), np.zeros(2))
    shown = [
        {"cls": 0, "name": "dent", "conf": 0.8, "x1": 0.1, "y1": 0.1, "x2": 0.5, "y2": 0.5}
    ] * boxes
    return ImageResult(image_hash, stats, shown)


def test_the_images_where_the_models_differ_most_are_picked_and_drawn_side_by_side() -> None:
    champion = [_result("same", 1, 1), _result("worse", 2, 2), _result("better", 0, 0)]
    challenger = [_result("better", 2, 2), _result("same", 1, 1), _result("worse", 1, 3)]
    picked = pick_examples(champion, challenger, count=2)
    assert [p["image_hash"] for p in picked] == ["better", "worse"]
    assert picked[0]["challenger_map"] > picked[0]["champion_map"]
    assert len(picked[0]["challenger_boxes"]) == 2

    buffer = io.BytesIO()
    PILImage.fromarray(np.full((200, 400, 3), 128, dtype=np.uint8)).save(buffer, "JPEG")
    png = render(buffer.getvalue(), "1 0.5 0.5 0.2 0.2\n", picked[0], ["scratch", "dent"])
    with PILImage.open(io.BytesIO(png)) as picture:
        assert picture.format == "PNG"
        width, height = picture.size
        pixels = np.asarray(picture.convert("RGB"))
    assert width > 2 * 320 and height > 160  # two halves of at most 320 px, captioned
    left, right = pixels[:, : width // 2], pixels[:, width // 2 :]
    orange, blue = np.array([0xE8, 0x71, 0x0A]), np.array([0x1A, 0x73, 0xE8])
    # The champion found nothing here (no orange), the challenger's boxes are blue.
    assert not (left == orange).all(axis=-1).any() and (right == blue).all(axis=-1).any()


# --- on the real stack: exports seal versions in the object store ----------------------------


@pytest.mark.stack
def test_versions_seal_at_the_growth_threshold_and_never_change(
    settings: Settings, tmp_path: Path
) -> None:
    from training.holdout import freeze, holdout_status, newest_version
    from training.snapshot_export import export_snapshot
    from training.snapshots import (
        download_snapshot,
        export_reviewed_labels,
        image_hashes,
        read_manifest,
        reviewed_sources,
    )
    from visionloop.db import session_scope
    from visionloop.formats import SplitPolicy, assign_splits
    from visionloop.storage import ObjectStore
    from visionloop.synthetic_labels import add_reviewed_samples

    store = ObjectStore(settings)
    patient = settings.model_copy(update={"holdout_growth": 10_000})
    with session_scope() as session:
        add_reviewed_samples(session, settings, 40, seed=41)
        first = export_reviewed_labels(session, patient)
        version = first.holdout
        assert version.holdout_version is not None and version.kind == "holdout"
        frozen_manifest = store.get_bytes(settings.bucket_datasets, version.manifest_key)
        frozen = set(image_hashes(read_manifest(settings, version)))

        # New labels: their test images wait, the gate keeps the same version.
        add_reviewed_samples(session, settings, 40, seed=41, start=40)
        waiting = export_reviewed_labels(session, patient)
        assert waiting.holdout.id == version.id
        status = holdout_status(session, patient, waiting.training, waiting.holdout)
        assert status.version == version.holdout_version and status.previous_id is None
        pending = status.pending
        assert pending > 0
        test = {
            i["image_hash"]
            for i in read_manifest(settings, waiting.training)["images"]
            if i["split"] == "test"
        }
        assert len(test - frozen) == pending

        # Exactly the growth threshold seals the next version: the old one plus the pending.
        ready = settings.model_copy(update={"holdout_growth": pending})
        sealed = export_reviewed_labels(session, ready)
        assert sealed.holdout.holdout_version == version.holdout_version + 1
        assert set(image_hashes(read_manifest(settings, sealed.holdout))) == frozen | test
        status = holdout_status(session, ready, sealed.training, sealed.holdout)
        assert status.pending == 0 and status.previous_id == version.id
        # ...and the old version is as it was: row, manifest and files.
        again = session.get(DatasetSnapshot, version.id)
        assert again.manifest_hash == version.manifest_hash and again.num_images == len(frozen)
        assert store.get_bytes(settings.bucket_datasets, version.manifest_key) == frozen_manifest
        local = download_snapshot(settings, again, tmp_path)
        assert {p.stem for p in local.parent.glob("images/*/*")} == frozen
        # A version exports like any snapshot (its own COCO document, one image each).
        coco = json.loads(b"".join(export_snapshot(settings, sealed.holdout, "coco").chunks()))
        assert {i["sha256"] for i in coco["images"]} == frozen | test
        assert sealed.holdout.profile["images"] == len(frozen | test)

        # Two exports sealing at once with different new images: one number each, no
        # version lost, the later one built on the earlier.
        add_reviewed_samples(session, settings, 60, seed=41, start=80)
        grown = export_reviewed_labels(session, patient)
        sources, _, _ = reviewed_sources(session, settings, store)
        entries = assign_splits([s.image for s in sources], SplitPolicy())
        base = set(image_hashes(read_manifest(settings, newest_version(session))))
        new = [e for e in entries if e.split == "test" and e.image.image_hash not in base]
        assert len(new) >= 2
    training_row = grown.training
    eager = settings.model_copy(update={"holdout_growth": 1})
    unnumbered = select(DatasetSnapshot.id).where(
        DatasetSnapshot.kind == "holdout",
        DatasetSnapshot.holdout_version.is_(None),  # type: ignore[union-attr]
    )
    with session_scope() as session:
        orphans_before = set(session.exec(unnumbered).all())
    halves = [new[::2], new[1::2]]
    start = threading.Barrier(2)
    results: list = [None, None]

    def seal(i: int) -> None:
        with session_scope() as session:
            old = [e for e in entries if e.split == "test" and e.image.image_hash in base]
            start.wait()
            results[i] = freeze(session, eager, training_row, [*old, *halves[i]], store)

    threads = [threading.Thread(target=seal, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    numbers = sorted(r.holdout_version for r in results)
    top = sealed.holdout.holdout_version
    with session_scope() as session:
        rows = session.exec(
            select(DatasetSnapshot).where(DatasetSnapshot.holdout_version > top)  # type: ignore[operator]
        ).all()
    assert sorted(r.holdout_version for r in rows) == numbers == [top + 1, top + 2]
    later = max(rows, key=lambda r: r.holdout_version)
    assert set(image_hashes(read_manifest(settings, later))) == base | {
        e.image.image_hash for e in new
    }
    # The loser's first row, built for the number it lost, is gone: it is no version.
    with session_scope() as session:
        assert set(session.exec(unnumbered).all()) == orphans_before

    # The snapshots API names each version.
    from fastapi.testclient import TestClient

    from api.main import create_app

    with TestClient(create_app()) as client:
        listed = client.get("/api/labeling/snapshots", params={"kind": "holdout", "limit": 500})
    numbers = {s["id"]: s["holdout_version"] for s in listed.json()["items"]}
    assert numbers[later.id] == top + 2 and numbers[version.id] == version.holdout_version
