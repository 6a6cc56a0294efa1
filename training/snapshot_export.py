"""A dataset snapshot handed out in one of the formats people train or label with.

* ``yolo``: a zip of the snapshot as ultralytics reads it (``data.yaml``, ``images/<split>/``,
  ``labels/<split>/``) plus its ``manifest.json``;
* ``coco``: the snapshot's COCO detection JSON;
* ``labelstudio``: the snapshot's Label Studio import JSON.

The JSON documents are the ones written with the snapshot. A held-out snapshot shares its
training snapshot's files: its documents are the training ones cut down to its own images.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any, Literal

from sqlmodel import Session, col, select

from training.snapshots import ManifestRejected, SnapshotError, fetch_files, read_manifest
from visionloop.formats import SPLITS, data_yaml
from visionloop.models import DatasetSnapshot
from visionloop.settings import Settings
from visionloop.storage import ObjectStore, StorageError

ExportFormat = Literal["yolo", "coco", "labelstudio"]
EXPORTABLE_KINDS = ("training", "bootstrap")
"""What "the latest snapshot" means: the newest one a model was or will be trained on."""
_DOCUMENTS = {"coco": "coco.json", "labelstudio": "label-studio.json"}
_IO_THREADS = 8
_SPOOL_BYTES = 32 * 1024 * 1024  # larger zips go to a temporary file, not memory
CHUNK = 1024 * 1024


class UnknownSnapshot(LookupError):
    pass


@dataclass
class Export:
    filename: str
    media_type: str
    body: IO[bytes]  # positioned at the start; the caller closes it

    def chunks(self) -> Iterator[bytes]:
        try:
            while block := self.body.read(CHUNK):
                yield block
        finally:
            self.body.close()


def snapshot_for_export(session: Session, snapshot_id: int | None) -> DatasetSnapshot:
    """Snapshot ``snapshot_id``, or the newest training (or bootstrap) snapshot."""
    if snapshot_id is not None:
        row = session.get(DatasetSnapshot, snapshot_id)
        if row is None:
            raise UnknownSnapshot(f"no dataset snapshot with id {snapshot_id}")
        return row
    row = session.exec(
        select(DatasetSnapshot)
        .where(col(DatasetSnapshot.kind).in_(EXPORTABLE_KINDS))
        .order_by(col(DatasetSnapshot.id).desc())
        .limit(1)
    ).first()
    if row is None:
        raise UnknownSnapshot(
            "there is no dataset snapshot yet; export the reviewed labels first "
            "(flow export-labels)"
        )
    return row


def _spool() -> IO[bytes]:
    """An empty body for an export; the ``Export`` it goes into closes it."""
    return tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)


def _document(settings: Settings, store: ObjectStore, snapshot: DatasetSnapshot, name: str) -> Any:
    try:
        return json.loads(store.get_bytes(settings.bucket_datasets, snapshot.object_prefix + name))
    except StorageError as exc:
        raise UnknownSnapshot(
            f"snapshot {snapshot.manifest_hash[:12]} has no {name}: {exc}"
        ) from exc


def _only(document: Any, fmt: str, hashes: set[str]) -> Any:
    """The document cut down to the images whose hash is in ``hashes``."""
    if fmt == "labelstudio":
        return [task for task in document if task.get("meta", {}).get("image_hash") in hashes]
    images = [image for image in document["images"] if image.get("sha256") in hashes]
    kept = {image["id"] for image in images}
    annotations = [a for a in document["annotations"] if a["image_id"] in kept]
    return {**document, "images": images, "annotations": annotations}


def export_snapshot(
    settings: Settings,
    snapshot: DatasetSnapshot,
    fmt: ExportFormat,
    store: ObjectStore | None = None,
) -> Export:
    store = store or ObjectStore(settings)
    stem = f"visionloop-{snapshot.kind}-{snapshot.manifest_hash[:12]}"
    try:
        manifest = read_manifest(settings, snapshot, store)
    except ManifestRejected:  # the files are there but not as exported: not a missing snapshot
        raise
    except SnapshotError as exc:  # the row exists but its files do not
        raise UnknownSnapshot(str(exc)) from exc
    if fmt == "yolo":
        return Export(
            f"{stem}-yolo.zip", "application/zip", _yolo_zip(settings, store, snapshot, manifest)
        )
    document = _document(settings, store, snapshot, _DOCUMENTS[fmt])
    if snapshot.kind == "holdout":
        document = _only(document, fmt, {item["image_hash"] for item in manifest["images"]})
    body = _spool()
    body.write(json.dumps(document).encode())
    body.seek(0)
    return Export(f"{stem}-{fmt}.json", "application/json", body)


def _yolo_zip(
    settings: Settings, store: ObjectStore, snapshot: DatasetSnapshot, manifest: dict[str, Any]
) -> IO[bytes]:
    items = manifest["images"]
    present = [split for split in SPLITS if any(item["split"] == split for item in items)]
    body = _spool()

    def fetch(item: dict[str, Any]) -> tuple[dict[str, Any], bytes, bytes]:
        return item, *fetch_files(settings, store, snapshot, item)

    with zipfile.ZipFile(body, "w") as archive:
        archive.writestr(
            "data.yaml", data_yaml(manifest["class_names"], {s: f"images/{s}" for s in present})
        )
        archive.writestr("manifest.json", json.dumps(manifest, indent=1), zipfile.ZIP_DEFLATED)
        with ThreadPoolExecutor(_IO_THREADS) as pool:
            for item, image, label in pool.map(fetch, items):
                archive.writestr(item["image"], image)  # already compressed: stored as is
                archive.writestr(item["label"], label, zipfile.ZIP_DEFLATED)
    body.seek(0)
    return body
