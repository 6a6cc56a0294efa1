"""Reviewed labels to dataset snapshots: YOLO, COCO and Label Studio JSON, manifest, profile."""

from __future__ import annotations

import io
import json
import math
import uuid
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image as PILImage

from training.profile import near_duplicate_groups, profile_entries
from visionloop.boxes import (
    LabelError,
    YoloBox,
    box_dicts,
    ls_results_from_boxes,
    ls_results_to_boxes,
    normalise_boxes,
)
from visionloop.formats import (
    LabeledImage,
    SplitPolicy,
    assign_splits,
    build_manifest,
    manifest_hash,
    to_coco,
    to_label_studio,
)
from visionloop.settings import Settings
from visionloop.synthetic import generate_sample

CLASSES = ["scratch", "dent", "stain"]


def _image(
    i: int, boxes: tuple[YoloBox, ...] = (), width: int = 640, height: int = 480
) -> LabeledImage:
    return LabeledImage(f"{i:064x}"[::-1], ".jpg", width, height, boxes)


# --- pure conversions ---------------------------------------------------------------------------


def test_split_depends_only_on_the_image_hash() -> None:
    policy = SplitPolicy(test_percent=20, val_percent=15)
    hashes = [f"{i * 7919:08x}" + "0" * 56 for i in range(2000)]
    splits = [policy.split_of(h) for h in hashes]
    assert splits == [policy.split_of(h) for h in hashes]
    share = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert abs(share["test"] - 0.20) < 0.03 and abs(share["val"] - 0.15) < 0.03
    # A larger validation share never moves an image into or out of the held-out set.
    wider = SplitPolicy(test_percent=20, val_percent=30)
    assert [h for h in hashes if wider.split_of(h) == "test"] == [
        h for h, s in zip(hashes, splits) if s == "test"
    ]


def test_manifest_hash_is_stable_and_content_addressed() -> None:
    images = [_image(i, (YoloBox(i % 3, 0.5, 0.5, 0.2, 0.1),)) for i in range(10)]
    policy = SplitPolicy()

    def digest(items: list[LabeledImage]) -> str:
        entries = assign_splits(items, policy)
        return manifest_hash(
            build_manifest(entries, CLASSES, kind="training", split_method=policy.as_dict())
        )

    assert digest(images) == digest(list(reversed(images)))  # order of the rows does not matter
    moved = images[:3] + [_image(3, (YoloBox(0, 0.5, 0.5, 0.2, 0.11),))] + images[4:]
    assert digest(moved) != digest(images)  # one corrected box is a new dataset
    assert digest(images[:-1]) != digest(images)
    renamed = assign_splits(images, policy)
    assert manifest_hash(
        build_manifest(renamed, ["a", "b", "c"], kind="training", split_method=policy.as_dict())
    ) != digest(images)


def test_reviewed_boxes_take_the_class_from_the_label_and_are_clipped() -> None:
    raw = [
        {"cls": 2, "name": "scratch", "cx": 0.5, "cy": 0.5, "w": 0.2, "h": 0.2},  # name wins
        {"cls": 1, "cx": 0.95, "cy": 0.5, "w": 0.2, "h": 0.2},  # overshoots the right edge
        {"label": "rust", "cx": 0.5, "cy": 0.5, "w": 0.1, "h": 0.1},  # "label" is read as well
        {"label": "dent", "cx": 1.5, "cy": 0.5, "w": 0.2, "h": 0.2},  # entirely outside
    ]
    boxes, dropped = normalise_boxes(raw, CLASSES)
    assert boxes[0] == YoloBox(0, 0.5, 0.5, 0.2, 0.2)
    assert boxes[1].cls == 1 and math.isclose(boxes[1].cx, 0.925) and math.isclose(boxes[1].w, 0.15)
    assert len(boxes) == 2 and dropped == ["rust"]
    with pytest.raises(LabelError):
        normalise_boxes([{"label": "dent", "cx": "x", "cy": 0, "w": 1, "h": 1}], CLASSES)


def test_label_studio_rectangles_round_trip_and_rotation_is_enclosed() -> None:
    boxes = (YoloBox(1, 0.25, 0.5, 0.1, 0.3), YoloBox(2, 0.7, 0.2, 0.4, 0.2))
    results = ls_results_from_boxes(boxes, CLASSES, 640, 480)
    back = ls_results_to_boxes(results, CLASSES)
    for got, want in zip(back, box_dicts(boxes, CLASSES)):
        assert got["name"] == want["name"] and got["cls"] == want["cls"]
        assert all(math.isclose(got[k], want[k], abs_tol=1e-9) for k in ("cx", "cy", "w", "h"))

    # A 100x50 px box at (100, 100) rotated 90 degrees clockwise about its top-left corner
    # covers x 50..100 and y 100..200 in a 400x400 image.
    rotated = {
        "type": "rectanglelabels",
        "original_width": 400,
        "original_height": 400,
        "value": {
            "x": 25,
            "y": 25,
            "width": 25,
            "height": 12.5,
            "rotation": 90,
            "rectanglelabels": ["dent"],
        },
    }
    (box,) = ls_results_to_boxes([rotated], CLASSES)
    assert box["cls"] == 1
    assert [round(box[k], 6) for k in ("cx", "cy", "w", "h")] == [0.1875, 0.375, 0.125, 0.25]
    with pytest.raises(LabelError, match="rust"):
        ls_results_to_boxes(
            [{**rotated, "value": {**rotated["value"], "rectanglelabels": ["rust"]}}], CLASSES
        )


def test_coco_and_label_studio_exports_describe_the_same_boxes() -> None:
    images = [
        _image(i, (YoloBox(i % 3, 0.5, 0.4, 0.25, 0.1), YoloBox(0, 0.1, 0.1, 0.1, 0.1)))
        for i in range(6)
    ]
    entries = assign_splits(images, SplitPolicy())
    coco = to_coco(entries, CLASSES)
    assert [c["name"] for c in coco["categories"]] == CLASSES
    assert len(coco["annotations"]) == 12
    first = next(a for a in coco["annotations"] if a["image_id"] == 0)
    img = entries[0].image
    assert first["bbox"] == pytest.approx(
        [(0.5 - 0.125) * 640, (0.4 - 0.05) * 480, 0.25 * 640, 0.1 * 480]
    )
    assert first["category_id"] == img.boxes[0].cls

    tasks = to_label_studio(entries, CLASSES, lambda e: f"s3://datasets/{e.image_file}")
    assert [t["meta"]["split"] for t in tasks] == [e.split for e in entries]
    for task, entry in zip(tasks, entries):
        back, _ = normalise_boxes(
            ls_results_to_boxes(task["annotations"][0]["result"], CLASSES), CLASSES
        )
        assert [v for b in back for v in b] == pytest.approx(
            [v for b in entry.image.boxes for v in b]
        )


# --- against the real servers -------------------------------------------------------------------


def _parse_yolo(text: str) -> list[tuple[int, float, float, float, float]]:
    rows = []
    for line in text.splitlines():
        if line.strip():
            cls, *rest = line.split()
            rows.append((int(cls), *map(float, rest)))
    return rows


@pytest.mark.stack
def test_yolo_export_matches_label_studios_own(settings: Settings) -> None:
    from labeling.provision import client, ensure_project

    token = settings.label_studio_token.get_secret_value()
    title = f"visionloop export check {uuid.uuid4().hex[:8]}"
    project = ensure_project(settings.label_studio, token, title, settings.class_names)
    ls = client(settings.label_studio, token)
    # Boxes from the generator on images of several sizes, plus awkward ones: edges, thin, tiny.
    expected: dict[str, list[YoloBox]] = {}
    sizes = [(160, 160), (640, 480), (333, 517), (1920, 1080)]
    for i in range(12):
        width, height = sizes[i % len(sizes)]
        boxes = [YoloBox(*b) for b in generate_sample(i, seed=11, size=160).boxes]
        boxes += [
            YoloBox(i % 3, 0.0123 + i / 100, 0.9, 0.0246, 0.2),
            YoloBox(2, 0.999, 0.5, 0.002, 0.0007),
        ]
        stem = f"export_check_{i:03d}"
        task = ls.tasks.create(
            project=project, data={"image": f"http://127.0.0.1:9/unreachable/{stem}.jpg"}
        )
        ls.annotations.create(
            id=task.id, result=ls_results_from_boxes(boxes, settings.class_names, width, height)
        )
        expected[stem] = boxes

    headers = {"Authorization": f"Token {token}"}
    base = f"{settings.label_studio}/api/projects/{project}/export"
    theirs = httpx.get(base, params={"exportType": "YOLO"}, headers=headers, timeout=120)
    assert theirs.status_code == 200, theirs.text[:300]
    tasks = httpx.get(base, params={"exportType": "JSON"}, headers=headers, timeout=120).json()

    with zipfile.ZipFile(io.BytesIO(theirs.content)) as archive:
        ls_classes = archive.read("classes.txt").decode().split()
        # Label Studio names label files "<8 hex>__<image file stem>.txt".
        ls_labels = {
            Path(name).stem.split("__", 1)[-1]: _parse_yolo(archive.read(name).decode())
            for name in archive.namelist()
            if name.startswith("labels/") and name.endswith(".txt")
        }
    # Label Studio numbers classes alphabetically; ours follow the class map. Its list also
    # holds the per-box verdicts (the config's other choices), which no box is labelled with.
    to_ours = {
        i: settings.class_names.index(name)
        for i, name in enumerate(ls_classes)
        if name in settings.class_names
    }
    assert len(to_ours) == len(settings.class_names), ls_classes
    assert any(i != ours for i, ours in to_ours.items()), "the check needs a map that differs"

    ours: dict[str, list[tuple[int, float, float, float, float]]] = {}
    for task in tasks:
        stem = Path(task["data"]["image"]).stem
        reviewed = ls_results_to_boxes(task["annotations"][0]["result"], settings.class_names)
        boxes, dropped = normalise_boxes(reviewed, settings.class_names)
        assert not dropped
        ours[stem] = _parse_yolo(LabeledImage("0" * 64, ".jpg", 1, 1, boxes).label_text)
        # The reviewed boxes are the ones that went into Label Studio.
        assert [b.cls for b in boxes] == [b.cls for b in expected[stem]]
        for got, want in zip(boxes, expected[stem]):
            assert all(abs(g - w) < 1e-6 for g, w in zip(got[1:], want[1:]))

    assert set(ours) == set(expected) == set(ls_labels)
    for stem, rows in ours.items():
        theirs_rows = [(to_ours[c], *rest) for c, *rest in ls_labels[stem]]
        assert len(rows) == len(theirs_rows), stem
        for mine, other in zip(rows, theirs_rows):
            assert mine[0] == other[0], stem
            assert all(abs(a - b) <= 1e-4 for a, b in zip(mine[1:], other[1:])), (stem, mine, other)


@pytest.mark.stack
def test_export_writes_a_content_addressed_snapshot(settings: Settings, tmp_path: Path) -> None:
    from flows.export import export_flow
    from training.snapshots import download_snapshot, get_snapshot, read_manifest
    from visionloop.db import session_scope
    from visionloop.storage import ObjectStore
    from visionloop.synthetic_labels import add_reviewed_samples

    with session_scope() as session:
        mine = set(add_reviewed_samples(session, settings, 30, seed=21))
    first = export_flow()
    again = export_flow()
    assert again == first.model_copy(update={"created": False})  # same labels, same snapshot

    with session_scope() as session:
        training = get_snapshot(session, first.snapshot_id)
        holdout = get_snapshot(session, first.holdout_id)
    manifest = read_manifest(settings, training)
    assert first.snapshot_hash == training.manifest_hash == manifest_hash(manifest)
    listed = {item["image_hash"]: item for item in manifest["images"]}
    assert mine <= set(listed)
    policy = SplitPolicy()
    assert all(item["split"] == policy.split_of(h) for h, item in listed.items())

    store = ObjectStore(settings)
    keys = {
        o.key.removeprefix(training.object_prefix)
        for o in store.list_objects(settings.bucket_datasets, training.object_prefix)
    }
    assert {"data.yaml", "coco.json", "label-studio.json", "profile.json", "manifest.json"} <= keys
    assert {item["image"] for item in manifest["images"]} | {
        item["label"] for item in manifest["images"]
    } <= keys
    spec = yaml.safe_load(
        store.get_bytes(settings.bucket_datasets, training.object_prefix + "data.yaml")
    )
    assert spec["names"] == dict(enumerate(settings.class_names)) and spec["test"] == "images/test"
    coco = json.loads(
        store.get_bytes(settings.bucket_datasets, training.object_prefix + "coco.json")
    )
    assert len(coco["annotations"]) == training.profile["boxes"]
    ls_tasks = json.loads(
        store.get_bytes(settings.bucket_datasets, training.object_prefix + "label-studio.json")
    )
    assert len(ls_tasks) == training.num_images

    profile = training.profile
    assert profile["images"] == training.num_images == len(listed)
    assert sum(c["boxes"] for c in profile["class_balance"].values()) == profile["boxes"]
    assert (
        profile["image_sizes"]["most_common"][0]["size"]
        == f"{settings.image_size}x{settings.image_size}"
    )
    assert profile["duplicates"]["near_duplicate_groups"] == 0

    # The held-out set is exactly the test split, and a training copy never holds it.
    test_hashes = {h for h, item in listed.items() if item["split"] == "test"}
    assert holdout.kind == "holdout" and holdout.num_images == len(test_hashes) > 0
    assert {i["image_hash"] for i in read_manifest(settings, holdout)["images"]} == test_hashes
    local = download_snapshot(settings, training, tmp_path)
    local_images = {p.stem for p in local.parent.glob("images/*/*")}
    assert local_images and not local_images & test_hashes
    assert yaml.safe_load(local.read_text())["val"] == "images/val"
    held = download_snapshot(settings, holdout, tmp_path)
    assert {p.stem for p in held.parent.glob("images/*/*")} == test_hashes

    # New labels give a new snapshot; images already held out stay held out.
    with session_scope() as session:
        add_reviewed_samples(session, settings, 10, seed=21, start=30)
    grown = export_flow()
    assert grown.created and grown.snapshot_hash != first.snapshot_hash
    with session_scope() as session:
        grown_holdout = get_snapshot(session, grown.holdout_id)
    grown_test = {i["image_hash"] for i in read_manifest(settings, grown_holdout)["images"]}
    assert test_hashes <= grown_test


def test_profile_counts_classes_sizes_and_near_duplicates_across_splits() -> None:
    from training.profile import fingerprint
    from visionloop.formats import Entry

    def jpeg(image, quality: int = 85, size: int | None = None) -> bytes:
        buffer = io.BytesIO()
        picture = PILImage.fromarray(image)
        (picture.resize((size, size)) if size else picture).save(buffer, "JPEG", quality=quality)
        return buffer.getvalue()

    # Re-encoded, resized or brightened, a scene is a near-duplicate of itself; other scenes
    # of the same surfaces, under the same kind of lighting, are not.
    images = {f"scene{i}": generate_sample(i, seed=5, size=160).image for i in range(40)}
    prints = {key: fingerprint(jpeg(image)) for key, image in images.items()}
    scene = images["scene3"]
    prints["scene3 q95"] = fingerprint(jpeg(scene, quality=95))
    prints["scene3 x2"] = fingerprint(jpeg(scene, size=320))
    prints["scene3 bright"] = fingerprint(
        jpeg(np.clip(scene.astype(int) + 25, 0, 255).astype(np.uint8))
    )
    assert near_duplicate_groups(prints) == [["scene3", "scene3 bright", "scene3 q95", "scene3 x2"]]

    box = YoloBox(1, 0.5, 0.5, 0.25, 0.25)
    entries = [
        Entry(_image(1, (box, box), 160, 160), "train"),  # a duplicated box
        Entry(_image(2, (YoloBox(0, 0.5, 0.5, 0.5, 0.5),), 640, 480), "test"),
        Entry(_image(3, (), 160, 160), "val"),
    ]
    twin = fingerprint(jpeg(scene))
    fingerprints = {
        entries[0].image.image_hash: twin,
        entries[1].image.image_hash: fingerprint(jpeg(scene, quality=95)),
        entries[2].image.image_hash: prints["scene7"],
    }
    profile = profile_entries(entries, CLASSES, fingerprints, dropped_labels=["rust", "rust"])
    assert profile["boxes"] == 3 and profile["background_images"] == 1
    assert profile["class_balance"]["dent"] == {
        "boxes": 2,
        "images": 1,
        "share": pytest.approx(2 / 3),
        "by_split": {"train": 2, "val": 0, "test": 0},
    }
    assert profile["boxes_per_image"]["histogram"] == {"0": 1, "1": 1, "2": 1}
    assert profile["box_sizes"]["coco_size"] == {"small": 0, "medium": 2, "large": 1}
    assert profile["image_sizes"]["most_common"][0] == {"size": "160x160", "images": 2}
    assert profile["duplicates"]["near_duplicate_groups"] == 1
    assert profile["duplicates"]["groups_across_test"] == 1  # a held-out image with a twin in train
    assert profile["duplicates"]["duplicate_boxes"] == 1
    assert profile["dropped_boxes"] == {"rust": 2}
