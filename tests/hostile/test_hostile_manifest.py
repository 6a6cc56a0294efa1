"""A snapshot changed in the bucket after export is refused before anything is written.

Each test exports a small snapshot of its own to the session stack's object store, tampers
with it there the way someone with write access to the bucket could, and checks that the
download (and the YOLO zip export) refuses it and that no file appeared outside the work dir.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from visionloop.formats import ManifestError, check_manifest, path_problem
from visionloop.settings import Settings

SPLIT_OF_INDEX = ["train", "train", "val", "val", "test", "test"]


# --- pure: which manifest paths are refused --------------------------------------------------


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("../../escape.txt", "has a '..' component"),
        ("labels/train/../../../escape.txt", "has a '..' component"),
        ("/tmp/escape.txt", "is an absolute path"),
        ("C:/escape.txt", "names a drive"),
        ("labels\\train\\x.txt", "contains a backslash"),
        ("labels/train/x.txt\x00.jpg", "contains a NUL character"),
        ("labels//x.txt", "has an empty or '.' component"),
        ("", "is not a non-empty string"),
        (None, "is not a non-empty string"),
    ],
)
def test_unsafe_manifest_paths_are_named_with_the_reason(path: object, why: str) -> None:
    assert path_problem(path) == why


def test_manifest_entries_outside_their_split_folder_are_refused() -> None:
    item = {
        "image_hash": "a" * 64,
        "label_hash": "b" * 64,
        "split": "train",
        "image": "images/train/" + "a" * 64 + ".jpg",
        "label": "labels/train/" + "a" * 64 + ".txt",
    }
    check_manifest({"class_names": ["dent"], "images": [item]})
    for change, message in [
        ({"label": "labels/test/x.txt"}, "label 'labels/test/x.txt': is not under labels/train/"),
        ({"image": "data.yaml"}, "image 'data.yaml': is not under images/train/"),
        ({"split": "../x"}, "split '../x': is not one of train, val, test"),
        ({"label_hash": "nope"}, "label_hash 'nope': is not a sha256 hex digest"),
    ]:
        with pytest.raises(ManifestError, match=f"images\\[0\\].* {re.escape(message)}"):
            check_manifest({"class_names": ["dent"], "images": [item | change]})


# --- against the session stack's object store ------------------------------------------------


@pytest.fixture
def snapshot(settings: Settings) -> Iterator[Any]:
    """A fresh six-image training snapshot (two per split); removed again afterwards."""
    from training.snapshots import Source, materialise
    from visionloop.boxes import YoloBox
    from visionloop.db import session_scope
    from visionloop.formats import LabeledImage
    from visionloop.models import DatasetSnapshot
    from visionloop.storage import ObjectStore, sha256_hex
    from visionloop.synthetic import encode_jpeg, generate_sample

    seed = uuid.uuid4().int % 100_000  # content of its own, so materialise never reuses a row
    sources = []
    for index, split in enumerate(SPLIT_OF_INDEX):
        sample = generate_sample(index, seed=seed, size=64, class_names=settings.class_names)
        data = encode_jpeg(sample.image)
        boxes = tuple(YoloBox(*b) for b in sample.boxes)
        image = LabeledImage(sha256_hex(data), ".jpg", 64, 64, boxes, split)
        sources.append(Source(image, lambda d=data: d))
    with session_scope() as session:
        row, _, created = materialise(session, settings, sources, kind="training")
        assert created
        session.refresh(row)
        session.expunge(row)
    yield row
    store = ObjectStore(settings)
    for info in list(store.list_objects(settings.bucket_datasets, row.object_prefix)):
        store.delete(settings.bucket_datasets, info.key)
    with session_scope() as session:
        session.delete(session.get(DatasetSnapshot, row.id))


def _manifest(settings: Settings, row: Any) -> dict[str, Any]:
    from visionloop.storage import ObjectStore

    return json.loads(ObjectStore(settings).get_bytes(settings.bucket_datasets, row.manifest_key))


def _put(settings: Settings, key: str, data: bytes) -> None:
    from visionloop.storage import ObjectStore

    ObjectStore(settings).put_bytes(settings.bucket_datasets, key, data)


def _plant_label(settings: Settings, row: Any, path: str, text: bytes) -> dict[str, Any]:
    """Point the first training entry's label at ``path``, with a matching file and hash.

    The S3 client refuses keys with a '..' segment, so for such a path only the manifest
    changes: it alone must be refused, before any key is read.
    """
    manifest = _manifest(settings, row)
    item = next(i for i in manifest["images"] if i["split"] == "train")
    item["label"] = path
    item["label_hash"] = hashlib.sha256(text).hexdigest()
    if ".." not in path.split("/"):
        _put(settings, row.object_prefix + path, text)
    _put(settings, row.manifest_key, json.dumps(manifest, indent=1).encode())
    return item


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _refused(settings: Settings, row: Any, work: Path, match: str) -> None:
    from training.snapshots import download_snapshot

    with pytest.raises(ValueError, match=match) as refused:
        download_snapshot(settings, row, work)
    assert type(refused.value).__name__ == "ManifestRejected"
    assert f"snapshot {row.manifest_hash[:12]}" in str(refused.value)
    assert _files_under(work) == []  # refused before anything was written


@pytest.mark.stack
def test_a_label_path_with_dotdot_is_refused_and_nothing_escapes(
    settings: Settings, snapshot: Any, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    _plant_label(settings, snapshot, "../../escape.txt", b"0 0.5 0.5 0.1 0.1\n")
    escape = r"images\[\d+\] \(\w+\) label '\.\./\.\./escape\.txt': has a '\.\.' component"
    _refused(settings, snapshot, work, escape)
    assert _files_under(tmp_path) == []


@pytest.mark.stack
def test_an_absolute_label_path_is_refused_and_nothing_is_written_there(
    settings: Settings, snapshot: Any, tmp_path: Path
) -> None:
    outside = tmp_path / "outside" / "abs-escape.txt"
    outside.parent.mkdir()
    _plant_label(settings, snapshot, str(outside), b"0 0.5 0.5 0.1 0.1\n")
    _refused(settings, snapshot, tmp_path / "work", f"label '{outside}': is an absolute path")
    assert not outside.exists()


@pytest.mark.stack
def test_a_zip_export_refuses_an_image_path_that_climbs_out(
    settings: Settings, snapshot: Any
) -> None:
    from training.snapshot_export import export_snapshot

    manifest = _manifest(settings, snapshot)
    item = manifest["images"][0]
    item["image"] = "../../../escape.jpg"
    _put(settings, snapshot.manifest_key, json.dumps(manifest, indent=1).encode())
    with pytest.raises(ValueError, match=r"image '\.\./\.\./\.\./escape\.jpg': has a '\.\.'"):
        export_snapshot(settings, snapshot, "yolo").body.close()


def _manifest_file(settings: Settings, row: Any, name: str) -> bytes:
    from visionloop.storage import ObjectStore

    return ObjectStore(settings).get_bytes(settings.bucket_datasets, row.object_prefix + name)


@pytest.mark.stack
def test_a_manifest_changed_by_one_byte_is_refused(
    settings: Settings, snapshot: Any, tmp_path: Path
) -> None:
    original = _manifest_file(settings, snapshot, "manifest.json")
    assert original.count(b'"width": 64,') == len(SPLIT_OF_INDEX)
    _put(settings, snapshot.manifest_key, original.replace(b'"width": 64,', b'"width": 65,', 1))
    _refused(settings, snapshot, tmp_path / "work", "manifest.json was changed after export")


@pytest.mark.stack
def test_a_poisoned_label_with_its_hash_updated_in_the_manifest_is_refused(
    settings: Settings, snapshot: Any, tmp_path: Path
) -> None:
    manifest = _manifest(settings, snapshot)
    item = next(i for i in manifest["images"] if i["split"] == "train")
    _plant_label(settings, snapshot, item["label"], b"2 0.5 0.5 0.9 0.9\n")
    _refused(settings, snapshot, tmp_path / "work", "manifest.json was changed after export")


@pytest.mark.stack
def test_a_label_file_changed_in_the_bucket_is_refused_by_download_and_export(
    settings: Settings, snapshot: Any, tmp_path: Path
) -> None:
    from training.snapshot_export import export_snapshot

    item = next(i for i in _manifest(settings, snapshot)["images"] if i["split"] == "train")
    label = _manifest_file(settings, snapshot, item["label"])
    _put(settings, snapshot.object_prefix + item["label"], label + b"1 0.5 0.5 0.2 0.2\n")
    message = f"label file {item['label']} was changed after export"
    _refused(settings, snapshot, tmp_path / "work", message)
    with pytest.raises(ValueError, match=message):
        export_snapshot(settings, snapshot, "yolo").body.close()
    _export_answers_409(settings, snapshot, message)


def _export_answers_409(settings: Settings, snapshot: Any, message: str) -> None:
    """The API says the stored snapshot is refused, as a conflict a person must look at."""
    from fastapi.testclient import TestClient

    from api.main import create_app

    token = settings.api_token.get_secret_value()
    with TestClient(create_app()) as client:
        answer = client.get(
            "/api/labeling/export",
            params={"snapshot_id": snapshot.id, "format": "yolo"},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert answer.status_code == 409, answer.text
    assert answer.json()["error"] == "snapshot_rejected"
    assert message in answer.json()["detail"]
