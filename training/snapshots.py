"""Versioned dataset snapshots in the object store, one ``DatasetSnapshot`` row each.

A snapshot lives under ``s3://<datasets>/snapshots/<manifest hash>/``::

    images/{train,val,test}/<image sha256>.<ext>   labels/{train,val,test}/<image sha256>.txt
    data.yaml   coco.json   label-studio.json   profile.json   manifest.json

``manifest.json`` is written last, so a snapshot whose manifest exists is complete. The same
labels give the same manifest hash, and exporting them again reuses the snapshot as it is.
Reading one back trusts nothing in the bucket: the manifest must hash to the row's
``manifest_hash``, every path in it must stay inside its split's folder, and every file must
match the hash the manifest lists (``ManifestRejected`` otherwise).

Each export names the held-out set its challenger is judged on: the newest frozen version
(``training.holdout``), a snapshot of kind ``holdout`` that never changes once sealed. Splits
follow image hashes, and an image of a frozen version is pinned to the test split, so held-out
images stay held out in every later export; new test-split images wait for the next version.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image as PILImage
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from training.profile import fingerprint, profile_entries
from visionloop.boxes import LabelError, normalise_boxes
from visionloop.events import EventKind, emit
from visionloop.formats import (
    Entry,
    LabeledImage,
    ManifestError,
    SplitPolicy,
    assign_splits,
    build_manifest,
    check_manifest,
    data_yaml,
    manifest_hash,
    to_coco,
    to_label_studio,
)
from visionloop.models import DatasetSnapshot, Image, ReviewedLabel
from visionloop.registry import ModelRef, client
from visionloop.settings import Settings
from visionloop.storage import ObjectStore, StorageError, sha256_hex

SNAPSHOT_ROOT = "snapshots"
MANIFEST_FILE = "manifest.json"
SNAPSHOT_HASH_TAG = "visionloop.snapshot_hash"
HOLDOUT_HASH_TAG = "visionloop.holdout_hash"
_IO_THREADS = 8  # object-store round trips dominate; the S3 server handles these in parallel

# Which splits each kind trains or evaluates on: a training download never even holds the
# held-out images, so they cannot leak into training by a wrong path.
_LOCAL_SPLITS = {
    "training": {"train": "images/train", "val": "images/val"},
    "bootstrap": {"train": "images/train", "val": "images/val"},
    "holdout": {"train": "images/test", "val": "images/test"},
}


class SnapshotError(RuntimeError):
    """A snapshot cannot be made or read; the message says what is missing."""


class ManifestRejected(SnapshotError, ValueError):
    """A snapshot's manifest or one of its files is not what was exported, or a manifest path
    would leave the snapshot's folder; nothing of it is used."""


@dataclass(frozen=True)
class Source:
    """An image to put in a snapshot, how to read its bytes and whether they are still there."""

    image: LabeledImage
    read: Callable[[], bytes]
    available: Callable[[], bool] = lambda: True


@dataclass(frozen=True)
class ExportResult:
    training: DatasetSnapshot
    holdout: DatasetSnapshot
    created: bool  # False: the same labels were exported before, the snapshot is reused


# --- sources ----------------------------------------------------------------------------------


def _size_of(data: bytes) -> tuple[int, int]:
    with PILImage.open(io.BytesIO(data)) as img:
        return img.size


def reviewed_sources(
    session: Session, settings: Settings, store: ObjectStore
) -> tuple[list[Source], list[str], dict[str, str]]:
    """Every reviewed label as a snapshot source; also the box labels the class map dropped
    and the images left out, with why (one bad row must not block every retrain).

    All verdicts are exported: the reviewed boxes are the truth whether the champion's
    pre-annotation was accepted, corrected or rejected (no boxes means background); with
    ``train_approved_only``, only labels a second reviewer approved.
    """
    query = select(ReviewedLabel, Image).join(Image, ReviewedLabel.image_id == Image.id)
    if settings.train_approved_only:
        query = query.where(col(ReviewedLabel.approved_at).is_not(None))
    rows = session.exec(query).all()
    sources: list[Source] = []
    dropped: list[str] = []
    skipped: dict[str, str] = {}
    for label, image in rows:
        bucket, key = settings.bucket_images, image.object_key
        read = _reader(store, bucket, key)
        try:
            boxes, lost = normalise_boxes(label.boxes or [], settings.class_names)
            width, height = image.width, image.height
            if not width or not height:
                width, height = _size_of(read())
        except (LabelError, StorageError, OSError) as exc:
            skipped[image.content_hash] = f"{type(exc).__name__}: {exc}"
            continue
        dropped.extend(lost)
        suffix = Path(key).suffix.lower() or ".jpg"
        image_ref = LabeledImage(image.content_hash, suffix, width, height, boxes)
        sources.append(Source(image_ref, read, lambda b=bucket, k=key: store.exists(b, k)))
    return sources, dropped, skipped


def _reader(store: ObjectStore, bucket: str, key: str) -> Callable[[], bytes]:
    return lambda: store.get_bytes(bucket, key)


def yolo_folder_sources(data_yaml_path: Path, class_names: Sequence[str]) -> list[Source]:
    """The images of a local YOLO dataset, its train and val splits kept as they are."""
    spec = yaml.safe_load(data_yaml_path.read_text())
    root = Path(spec.get("path") or data_yaml_path.parent)
    sources: list[Source] = []
    for split in ("train", "val"):
        for path in sorted((root / spec[split]).iterdir()):
            if path.suffix.lower() not in (".jpg", ".jpeg", ".png"):
                continue
            data = path.read_bytes()
            # ultralytics' rule: the label path is the image path, last /images/ made /labels/.
            label_path = Path("/labels/".join(str(path).rsplit("/images/", 1))).with_suffix(".txt")
            lines = label_path.read_text().splitlines() if label_path.exists() else []
            raw = [
                dict(zip(("cls", "cx", "cy", "w", "h"), line.split()))
                for line in lines
                if line.strip()
            ]
            boxes, _ = normalise_boxes(raw, class_names)
            width, height = _size_of(data)
            image = LabeledImage(sha256_hex(data), path.suffix.lower(), width, height, boxes, split)
            sources.append(Source(image, lambda d=data: d))
    return sources


# --- writing snapshots ------------------------------------------------------------------------


_MISSING_IMAGE = "the image object is missing from the store"


@dataclass(frozen=True)
class _Described:
    """What a snapshot of some sources would be: its entries, manifest and manifest hash."""

    entries: list[Entry]
    manifest: dict[str, Any]
    digest: str


def _prefix(digest: str) -> str:
    return f"{SNAPSHOT_ROOT}/{digest}/"


def _find(session: Session, digest: str) -> DatasetSnapshot | None:
    return session.exec(
        select(DatasetSnapshot).where(DatasetSnapshot.manifest_hash == digest)
    ).first()


def _insert(session: Session, row: DatasetSnapshot) -> DatasetSnapshot:
    """Insert ``row`` unless another exporter of the same content got there first.

    Commits at once: the snapshot's files are complete, and a concurrent exporter of the
    same content must find the row rather than write it twice. The unique manifest hash
    settles a race; the loser rolls back and takes the winner's row.
    """
    try:
        session.add(row)
        session.commit()
        return row
    except IntegrityError:
        session.rollback()
        existing = _find(session, row.manifest_hash)
        if existing is None:
            raise
        return existing


def _counts(entries: Sequence[Entry]) -> dict[str, int]:
    return {
        f"num_{split}": sum(1 for e in entries if e.split == split)
        for split in ("train", "val", "test")
    }


def _describe(
    sources: Sequence[Source], class_names: list[str], kind: str, policy: SplitPolicy
) -> _Described:
    entries = assign_splits([s.image for s in sources], policy)
    given = bool(sources) and all(s.image.split for s in sources)
    manifest = build_manifest(
        entries,
        class_names,
        kind=kind,
        split_method={"method": "given"} if given else policy.as_dict(),
    )
    return _Described(entries, manifest, manifest_hash(manifest))


def _available(sources: Sequence[Source]) -> tuple[list[Source], list[str]]:
    """The sources whose bytes are still in the store, and the hashes of those that are not."""
    with ThreadPoolExecutor(_IO_THREADS) as pool:
        present = list(pool.map(lambda s: s.available(), sources))
    kept = [s for s, ok in zip(sources, present) if ok]
    missing = [s.image.image_hash for s, ok in zip(sources, present) if not ok]
    return kept, missing


def materialise(
    session: Session,
    settings: Settings,
    sources: Sequence[Source],
    *,
    kind: str,
    policy: SplitPolicy = SplitPolicy(),
    dropped: Iterable[str] = (),
    skipped: Mapping[str, str] | None = None,
    store: ObjectStore | None = None,
) -> tuple[DatasetSnapshot, list[Entry], bool]:
    """Write ``sources`` as a snapshot (or find the identical one); returns row, entries, created.

    ``dropped`` (box labels outside the class map) and ``skipped`` (image hash: why it was
    left out) only go into the profile. A new snapshot's row is committed (see ``_insert``).
    """
    store = store or ObjectStore(settings)
    class_names = list(settings.class_names)
    described = _describe(sources, class_names, kind, policy)
    existing = _find(session, described.digest)
    if existing is None:
        # An image whose object is gone (deleted by hand, lost with a bucket) must not stop
        # every future retrain: leave it out and say so in the profile.
        sources, missing = _available(sources)
        skipped = {**(skipped or {}), **dict.fromkeys(missing, _MISSING_IMAGE)}
        if missing:
            described = _describe(sources, class_names, kind, policy)
            existing = _find(session, described.digest)
    if existing is not None:
        return existing, described.entries, False

    prefix = _prefix(described.digest)
    fingerprints = _upload_images(settings, store, prefix, sources, described.entries)
    profile = profile_entries(described.entries, class_names, fingerprints, dropped) | {
        "skipped_images": skipped
    }
    _upload_documents(settings, store, prefix, described, profile)
    row = _insert(session, _snapshot_row(described, kind, class_names, profile))
    _announce(row, profile)
    return row, described.entries, True


def _upload_images(
    settings: Settings,
    store: ObjectStore,
    prefix: str,
    sources: Sequence[Source],
    entries: Sequence[Entry],
) -> dict[str, np.ndarray]:
    """Every entry's image and label file under ``prefix``; returns image hash: fingerprint."""
    bucket = settings.bucket_datasets
    by_hash = {s.image.image_hash: s for s in sources}

    def upload(entry: Entry) -> np.ndarray:
        data = by_hash[entry.image.image_hash].read()
        if sha256_hex(data) != entry.image.image_hash:
            raise SnapshotError(
                f"image {entry.image.image_hash} changed in the object store (its bytes no longer "
                "match the hash it was ingested with)"
            )
        store.put_bytes(bucket, prefix + entry.image_file, data, _content_type(entry.image.suffix))
        store.put_bytes(
            bucket, prefix + entry.label_file, entry.image.label_text.encode(), "text/plain"
        )
        return fingerprint(data)

    with ThreadPoolExecutor(_IO_THREADS) as pool:
        return dict(zip((e.image.image_hash for e in entries), pool.map(upload, entries)))


def _upload_documents(
    settings: Settings,
    store: ObjectStore,
    prefix: str,
    described: _Described,
    profile: dict[str, Any],
) -> None:
    """The snapshot's documents, its manifest last (see the module's docstring)."""
    bucket = settings.bucket_datasets
    entries, class_names = described.entries, described.manifest["class_names"]
    splits = {"train": "images/train", "val": "images/val", "test": "images/test"}
    label_studio = to_label_studio(
        entries, class_names, lambda e: f"s3://{bucket}/{prefix}{e.image_file}"
    )
    documents: dict[str, tuple[bytes, str]] = {
        "data.yaml": (data_yaml(class_names, splits).encode(), "application/x-yaml"),
        "coco.json": (json.dumps(to_coco(entries, class_names)).encode(), "application/json"),
        "label-studio.json": (json.dumps(label_studio).encode(), "application/json"),
        "profile.json": (json.dumps(profile, indent=1).encode(), "application/json"),
        MANIFEST_FILE: (json.dumps(described.manifest, indent=1).encode(), "application/json"),
    }
    # In this order, the manifest last: a manifest in the store means every file it lists is there.
    for name, (data, content_type) in documents.items():
        store.put_bytes(bucket, prefix + name, data, content_type)


def _snapshot_row(
    described: _Described, kind: str, class_names: list[str], profile: dict[str, Any]
) -> DatasetSnapshot:
    prefix = _prefix(described.digest)
    return DatasetSnapshot(
        manifest_hash=described.digest,
        kind=kind,
        object_prefix=prefix,
        manifest_key=prefix + MANIFEST_FILE,
        num_images=len(described.entries),
        class_names=class_names,
        profile=profile,
        **_counts(described.entries),
    )


def _announce(row: DatasetSnapshot, profile: dict[str, Any]) -> None:
    emit(
        EventKind.SNAPSHOT_CREATED,
        f"{row.kind} snapshot {row.manifest_hash[:12]}: {row.num_images} images "
        f"({row.num_train} train, {row.num_val} val, {row.num_test} test), "
        f"{profile['boxes']} boxes",
        {
            "snapshot_id": row.id,
            "manifest_hash": row.manifest_hash,
            "kind": row.kind,
            "images": row.num_images,
        },
    )


def _content_type(suffix: str) -> str:
    return {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(
        suffix, "application/octet-stream"
    )


def _require_every_split(total: int, splits: Sequence[str]) -> None:
    empty = [split for split in ("train", "val", "test") if split not in splits]
    if empty:
        counts = {split: splits.count(split) for split in ("train", "val", "test")}
        raise SnapshotError(
            f"cannot train on {total} reviewed labels: no image falls in the "
            f"{' and '.join(empty)} split ({counts}); review more images first"
        )


def export_reviewed_labels(
    session: Session,
    settings: Settings,
    *,
    policy: SplitPolicy = SplitPolicy(),
    store: ObjectStore | None = None,
) -> ExportResult:
    """Reviewed labels to a training snapshot and its held-out companion.

    Refuses (``SnapshotError``) a dataset with an empty train, val or test split: ultralytics
    needs the first two, and a challenger cannot be judged without the third.
    """
    from training.holdout import freeze, newest_frozen  # holdout builds on this module

    store = store or ObjectStore(settings)
    sources, dropped, skipped = reviewed_sources(session, settings, store)
    # A frozen held-out image stays held out even if the split percentages change: judged on
    # it, a challenger must never have trained on it.
    newest = newest_frozen(session, settings, store)
    frozen = newest.hashes
    sources = [_held_out(s) if s.image.image_hash in frozen else s for s in sources]
    _require_every_split(
        len(sources), [s.image.split or policy.split_of(s.image.image_hash) for s in sources]
    )
    training, entries, created = materialise(
        session,
        settings,
        sources,
        kind="training",
        policy=policy,
        dropped=dropped,
        skipped=skipped,
        store=store,
    )
    _require_every_split(len(entries), [e.split for e in entries])  # images may have gone missing
    return ExportResult(
        training, freeze(session, settings, training, entries, store, newest), created
    )


def _held_out(source: Source) -> Source:
    return replace(source, image=replace(source.image, split="test"))


# --- reading snapshots ------------------------------------------------------------------------


def get_snapshot(session: Session, snapshot_id: int) -> DatasetSnapshot:
    row = session.get(DatasetSnapshot, snapshot_id)
    if row is None:
        raise SnapshotError(f"no dataset snapshot with id {snapshot_id}")
    return row


def _name(snapshot: DatasetSnapshot) -> str:
    return f"snapshot {snapshot.manifest_hash[:12]} (id {snapshot.id})"


def read_manifest(
    settings: Settings, snapshot: DatasetSnapshot, store: ObjectStore | None = None
) -> dict[str, Any]:
    """The snapshot's manifest, refused (``ManifestRejected``) unless it is the exported one."""
    store = store or ObjectStore(settings)
    key = snapshot.manifest_key or snapshot.object_prefix + MANIFEST_FILE
    try:
        data = store.get_bytes(settings.bucket_datasets, key)
    except StorageError as exc:
        raise SnapshotError(
            f"snapshot {snapshot.manifest_hash[:12]} has no manifest in the store: {exc}"
        ) from exc
    return verified_manifest(snapshot, key, data)


def verified_manifest(snapshot: DatasetSnapshot, key: str, data: bytes) -> dict[str, Any]:
    """``data`` as a manifest, if every path in it is safe and it hashes to the snapshot's hash.

    The row's ``manifest_hash`` was computed from the manifest at export, so a manifest
    changed in the bucket since then no longer hashes to it. Paths are checked first: that
    error names the entry, which says more than a hash mismatch does.
    """
    try:
        manifest = json.loads(data)
    except ValueError as exc:  # not UTF-8, or not JSON
        raise ManifestRejected(f"{_name(snapshot)}: {key} is not valid JSON ({exc})") from exc
    try:
        check_manifest(manifest)
    except ManifestError as exc:
        raise ManifestRejected(f"{_name(snapshot)}: {key} entry {exc}") from exc
    digest = manifest_hash(manifest)
    if digest != snapshot.manifest_hash:
        raise ManifestRejected(
            f"{_name(snapshot)}: {key} was changed after export (its content hashes to "
            f"{digest[:12]}, the snapshot was recorded as {snapshot.manifest_hash[:12]})"
        )
    return manifest


def fetch_file(
    settings: Settings,
    store: ObjectStore,
    snapshot: DatasetSnapshot,
    item: Mapping[str, Any],
    field: str,
) -> bytes:
    """An entry's ``image`` or ``label`` bytes, refused unless they match the manifest's hash."""
    data = store.get_bytes(settings.bucket_datasets, snapshot.object_prefix + item[field])
    expected = item[f"{field}_hash"]
    if hashlib.sha256(data).hexdigest() != expected:
        raise ManifestRejected(
            f"{_name(snapshot)}: {field} file {item[field]} was changed after export (its "
            f"bytes do not match the sha256 {expected[:12]} the manifest lists)"
        )
    return data


def fetch_files(
    settings: Settings, store: ObjectStore, snapshot: DatasetSnapshot, item: Mapping[str, Any]
) -> tuple[bytes, bytes]:
    """An entry's image and label bytes, refused unless each matches its hash in the manifest."""
    return (
        fetch_file(settings, store, snapshot, item, "image"),
        fetch_file(settings, store, snapshot, item, "label"),
    )


def _inside(root: Path, relative: str, snapshot: DatasetSnapshot) -> Path:
    """``root / relative``, refused if it resolves outside ``root`` (a link on the way, say)."""
    path = root / relative
    if not path.resolve().is_relative_to(root.resolve()):
        raise ManifestRejected(f"{_name(snapshot)}: {relative} resolves outside {root}")
    return path


def download_snapshot(
    settings: Settings,
    snapshot: DatasetSnapshot,
    dest_root: Path | None = None,
    store: ObjectStore | None = None,
) -> Path:
    """A local copy of the snapshot's files for its kind; returns the local ``data.yaml``.

    The manifest is verified (``read_manifest``) before any folder is made, and every file
    against the manifest's hashes before it is written. Copies are cached by manifest hash
    under ``<data_dir>/datasets``; ``data.yaml`` is written last, so a folder that has one is
    complete.
    """
    store = store or ObjectStore(settings)
    local = (dest_root or settings.data_dir / "datasets") / snapshot.manifest_hash
    target = local / "data.yaml"
    if target.exists():
        return target
    manifest = read_manifest(settings, snapshot, store)
    splits = _LOCAL_SPLITS.get(snapshot.kind, _LOCAL_SPLITS["training"])
    wanted_dirs = set(splits.values())
    partial = local.with_name(f"{local.name}.partial-{uuid.uuid4().hex[:8]}")
    for folder in wanted_dirs:
        (partial / folder).mkdir(parents=True, exist_ok=True)
        (partial / folder.replace("images/", "labels/", 1)).mkdir(parents=True, exist_ok=True)

    def fetch(item: dict[str, Any]) -> None:
        image, label = fetch_files(settings, store, snapshot, item)
        _inside(partial, item["image"], snapshot).write_bytes(image)
        _inside(partial, item["label"], snapshot).write_bytes(label)

    items = [i for i in manifest["images"] if str(Path(i["image"]).parent) in wanted_dirs]
    try:
        with ThreadPoolExecutor(_IO_THREADS) as pool:
            list(pool.map(fetch, items))
        (partial / "data.yaml").write_text(data_yaml(manifest["class_names"], splits))
        try:
            partial.rename(local)
        except OSError:
            if not target.exists():  # not a concurrent download of the same snapshot: a real error
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def image_hashes(manifest: dict[str, Any]) -> list[str]:
    return [item["image_hash"] for item in manifest["images"]]


def mark_labels_used(session: Session, hashes: Sequence[str]) -> int:
    """Flag these images' reviewed labels as consumed by a retrain (no longer "new" labels)."""
    if not hashes:
        return 0
    ids = select(Image.id).where(Image.content_hash.in_(list(hashes)))
    result = session.exec(  # type: ignore[call-overload]
        update(ReviewedLabel).where(ReviewedLabel.image_id.in_(ids)).values(used_for_training=True)
    )
    return result.rowcount or 0


def training_snapshot_of(
    session: Session, settings: Settings, ref: ModelRef
) -> DatasetSnapshot | None:
    """The snapshot a model version was trained on (drift's reference), from its run's tag."""
    if not ref.run_id:
        return None
    digest = client(settings).get_run(ref.run_id).data.tags.get(SNAPSHOT_HASH_TAG)
    return _find(session, digest) if digest else None
