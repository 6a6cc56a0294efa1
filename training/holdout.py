"""The frozen held-out set: numbered versions that never change once sealed.

The gate scores champion and challenger on the newest version. Test-split images that are
not in it yet wait (pending); once ``VISIONLOOP_HOLDOUT_GROWTH`` of them have gathered, the
next version is sealed as the newest one plus them (the first version takes whatever test
split exists). A version's images and labels are copied into a folder of its own, so a label
corrected later, or an image deleted, changes no version already sealed: a score on version
3 in May compares with a score on version 3 in June.

A version is a ``DatasetSnapshot`` of kind ``holdout`` whose ``holdout_version`` is set. Two
exports may try to seal the same number at once; the row is written first with no number,
and the number is then claimed with one compare-and-set (see ``claim_version``), so exactly
one of them gets it and the other starts over from the version that won.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, exists, text, update
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from training.profile import profile_entries
from training.snapshots import (
    _IO_THREADS,
    MANIFEST_FILE,
    SnapshotError,
    _content_type,
    _Described,
    _insert,
    _prefix,
    _upload_documents,
    fetch_files,
    image_hashes,
    read_manifest,
)
from visionloop.boxes import parse_yolo_labels
from visionloop.events import EventKind, emit
from visionloop.formats import (
    MANIFEST_FORMAT,
    Entry,
    LabeledImage,
    build_manifest,
    manifest_hash,
)
from visionloop.models import DatasetSnapshot
from visionloop.settings import Settings
from visionloop.storage import ObjectStore

_ATTEMPTS = 5  # a lost claim starts over; more losses in a row than this is not a race


@dataclass(frozen=True)
class Growth:
    """What an export's test split does to the frozen set: the images not in the newest
    version, and whether they seal the next one."""

    new: list[Entry]
    seal: bool


def plan_growth(frozen: set[str] | None, test: Sequence[Entry], growth: int) -> Growth:
    """``frozen`` is the newest version's image hashes (None: no version yet)."""
    if frozen is None:
        return Growth(list(test), bool(test))
    new = [e for e in test if e.image.image_hash not in frozen]
    return Growth(new, bool(new) and len(new) >= growth)


def newest_version(session: Session) -> DatasetSnapshot | None:
    return session.exec(
        select(DatasetSnapshot)
        .where(col(DatasetSnapshot.holdout_version).is_not(None))
        .order_by(col(DatasetSnapshot.holdout_version).desc())
    ).first()


def get_version(session: Session, number: int) -> DatasetSnapshot | None:
    return session.exec(
        select(DatasetSnapshot).where(DatasetSnapshot.holdout_version == number)
    ).first()


@dataclass(frozen=True)
class Newest:
    """The newest version and its manifest's items (none before the first is sealed)."""

    version: DatasetSnapshot | None
    items: list[dict[str, Any]]

    @property
    def hashes(self) -> set[str]:
        return {item["image_hash"] for item in self.items}


def newest_frozen(session: Session, settings: Settings, store: ObjectStore) -> Newest:
    current = newest_version(session)
    if current is None:
        return Newest(None, [])
    return Newest(current, read_manifest(settings, current, store)["images"])


def claim_version(session: Session, row_id: int, number: int) -> bool:
    """Give the unnumbered holdout row ``row_id`` version ``number`` unless some row already
    holds that number or a later one; whether it did. Commits.

    One UPDATE whose condition reads the table: SQLite runs it under its single writer lock,
    and PostgreSQL's READ COMMITTED would let two such statements pass on different rows, so
    there the table is locked against other writers first (until the commit, microseconds).
    """
    if session.get_bind().dialect.name == "postgresql":
        lock = text("LOCK TABLE dataset_snapshots IN SHARE ROW EXCLUSIVE MODE")
        session.exec(lock)  # type: ignore[call-overload]
    other = aliased(DatasetSnapshot)  # not correlated with the row being updated
    taken = select(other.id).where(col(other.holdout_version) >= number)
    result = session.exec(  # type: ignore[call-overload]
        update(DatasetSnapshot)
        .where(
            col(DatasetSnapshot.id) == row_id,
            col(DatasetSnapshot.holdout_version).is_(None),
            ~exists(taken),
        )
        .values(holdout_version=number)
    )
    session.commit()
    return (result.rowcount or 0) == 1


def freeze(
    session: Session,
    settings: Settings,
    training: DatasetSnapshot,
    entries: Sequence[Entry],
    store: ObjectStore,
    newest: Newest | None = None,
) -> DatasetSnapshot:
    """The frozen version an export's challenger is judged on, sealing the next one first if
    the export's test split has grown enough (``VISIONLOOP_HOLDOUT_GROWTH``). ``newest`` is
    what the caller already read of the newest version; a lost race reads it again."""
    test = [e for e in entries if e.split == "test"]
    for _ in range(_ATTEMPTS):
        newest = newest or newest_frozen(session, settings, store)
        current = newest.version
        # A different class map gives label indices another meaning: start a fresh lineage.
        same_classes = current is not None and current.class_names == training.class_names
        frozen = newest.hashes if same_classes else None
        growth = plan_growth(frozen, test, settings.holdout_growth)
        if not growth.seal:
            assert current is not None  # the first version seals whatever test split exists
            return current
        carried = newest if same_classes else Newest(None, [])
        sealed = _seal(session, settings, store, training, carried, current, growth.new)
        if sealed is not None:
            return sealed
        newest = None
    raise SnapshotError(
        f"could not seal a held-out version in {_ATTEMPTS} attempts: other exports kept "
        "sealing one first"
    )


def _seal(
    session: Session,
    settings: Settings,
    store: ObjectStore,
    training: DatasetSnapshot,
    carried: Newest,
    current: DatasetSnapshot | None,
    new: Sequence[Entry],
) -> DatasetSnapshot | None:
    """Version ``current + 1``: ``carried``'s images as they were sealed plus ``new`` ones from
    ``training``; None if another export claimed the number first."""
    number = (current.holdout_version or 0) + 1 if current is not None else 1
    old = carried.items
    added = build_manifest(new, training.class_names, kind="holdout", split_method={})["images"]
    items = sorted([*old, *added], key=lambda item: item["image_hash"])
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "kind": "holdout",
        "class_names": list(training.class_names),
        # The number and lineage are content: a version sealed again elsewhere with the same
        # images under another number is another version.
        "split": {
            "method": "frozen",
            "version": number,
            "previous": carried.version.manifest_hash if carried.version is not None else None,
        },
        "counts": {"train": 0, "val": 0, "test": len(items)},
        "images": items,
    }
    digest = manifest_hash(manifest)
    prefix = _prefix(digest)
    sources = [(carried.version, item) for item in old] + [(training, item) for item in added]
    labels = _copy_files(settings, store, prefix, sources)
    entries = [_entry(item, labels[item["image_hash"]]) for item in items]
    profile = profile_entries(entries, training.class_names, {}) | {
        "carried": len(old),
        "added": len(added),
        # Which export sealed it: a retrain of that export also scores the version before.
        "sealed_from": training.manifest_hash,
    }
    # The same documents as any snapshot (COCO, Label Studio JSON, profile), manifest last.
    _upload_documents(settings, store, prefix, _Described(entries, manifest, digest), profile)
    # End the transaction of the reads above: on SQLite a write in a transaction that began
    # with a read fails when another writer committed in between.
    session.commit()
    row = _insert(
        session,
        DatasetSnapshot(
            manifest_hash=digest,
            kind="holdout",
            object_prefix=prefix,
            manifest_key=prefix + MANIFEST_FILE,
            num_images=len(items),
            num_test=len(items),
            class_names=list(training.class_names),
            profile=profile,
        ),
    )
    assert row.id is not None
    if not claim_version(session, row.id, number):
        session.refresh(row)
        if row.holdout_version != number:  # a twin export of the same content also counts
            _discard_unnumbered(session, row.id)
            return None
    session.refresh(row)
    emit(
        EventKind.SNAPSHOT_CREATED,
        f"held-out version {number} sealed: {len(items)} images ({len(old)} carried, "
        f"{len(added)} new), {row.manifest_hash[:12]}",
        {
            "snapshot_id": row.id,
            "manifest_hash": row.manifest_hash,
            "kind": "holdout",
            "holdout_version": number,
            "images": len(items),
        },
    )
    return row


def _discard_unnumbered(session: Session, row_id: int) -> None:
    """Remove a holdout row that lost its number: it is no version, and listed among the
    snapshots it would look like one. (Its files stay in the bucket, unreferenced.)"""
    session.exec(  # type: ignore[call-overload]
        delete(DatasetSnapshot).where(
            col(DatasetSnapshot.id) == row_id, col(DatasetSnapshot.holdout_version).is_(None)
        )
    )
    session.commit()


def _copy_files(
    settings: Settings,
    store: ObjectStore,
    prefix: str,
    sources: Sequence[tuple[DatasetSnapshot | None, dict[str, Any]]],
) -> dict[str, str]:
    """Each item's image and label from its snapshot into ``prefix``, checked against the
    manifest's hashes on the way (a file changed in the bucket is refused, not frozen);
    returns image hash: label text."""
    bucket = settings.bucket_datasets

    def copy(source: tuple[DatasetSnapshot | None, dict[str, Any]]) -> tuple[str, str]:
        snapshot, item = source
        assert snapshot is not None
        image, label = fetch_files(settings, store, snapshot, item)
        store.put_bytes(
            bucket, prefix + item["image"], image, _content_type(Path(item["image"]).suffix)
        )
        store.put_bytes(bucket, prefix + item["label"], label, "text/plain")
        return item["image_hash"], label.decode()

    with ThreadPoolExecutor(_IO_THREADS) as pool:
        return dict(pool.map(copy, sources))


def _entry(item: dict[str, Any], label_text: str) -> Entry:
    """A manifest item and its label file as the entry an export would have made of it."""
    image = LabeledImage(
        item["image_hash"],
        Path(item["image"]).suffix,
        int(item["width"]),
        int(item["height"]),
        parse_yolo_labels(label_text),
        item["split"],
    )
    return Entry(image, item["split"])


@dataclass(frozen=True)
class HoldoutStatus:
    """Where the frozen set stands for one export: the version judged on, the version before
    it when that export sealed it (its scores keep the trend comparable), the images pending."""

    version: int | None
    previous_id: int | None
    pending: int
    growth: int


def holdout_status(
    session: Session,
    settings: Settings,
    training: DatasetSnapshot,
    holdout: DatasetSnapshot,
    store: ObjectStore | None = None,
) -> HoldoutStatus:
    """Read back from the records: the training snapshot's test images not in ``holdout``
    are pending, and a version sealed from this very snapshot has a predecessor to score."""
    store = store or ObjectStore(settings)
    test = {
        item["image_hash"]
        for item in read_manifest(settings, training, store)["images"]
        if item["split"] == "test"
    }
    frozen = set(image_hashes(read_manifest(settings, holdout, store)))
    number = holdout.holdout_version
    previous = None
    sealed_here = (holdout.profile or {}).get("sealed_from") == training.manifest_hash
    if number and number > 1 and sealed_here:
        previous = get_version(session, number - 1)
    return HoldoutStatus(
        number,
        previous.id if previous is not None else None,
        len(test - frozen),
        settings.holdout_growth,
    )
