"""What selection knows of the champion besides this cycle's images: the embeddings of its
training images (for novelty) and its per-class AP (for class weights).

Reference embeddings are computed once per champion version, the first time selection needs
them, from a deterministic sample of the train split of the snapshot the version was trained
on (its MLflow run's snapshot tag, as drift finds it), and kept in the object store under
``reports/reference-embeddings/<model name>/<version>.npy``. A version trained on data the
platform has no snapshot of (weights registered by hand) has no reference: ``None``.

This module only finds, reads and writes them; the embedding itself is the champion's
forward pass, which the caller passes in (``embed``): labeling does not import serving.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from sqlmodel import Session, col, select

from labeling.scoring import class_weights_from_ap
from training.snapshots import fetch_file, read_manifest, training_snapshot_of
from visionloop.models import RetrainingRun, RetrainStatus
from visionloop.registry import ModelRef
from visionloop.settings import Settings
from visionloop.storage import ObjectStore

log = logging.getLogger(__name__)

REFERENCE_PREFIX = "reference-embeddings"
REFERENCE_IMAGES = 2000
"""Training images embedded at most: enough to cover a training set's conditions, and a
nearest-neighbour search over them stays cheap."""
_IO_THREADS = 8  # object-store round trips dominate, as in a snapshot download
_RUNS_LOOKED_AT = 200  # the newest retraining runs searched for an evaluation of the version

Embed = Callable[[Sequence[bytes]], np.ndarray | None]
"""Encoded images -> their ``(n, d)`` embeddings by the version in question, or None when the
model that answered is not that version (the alias moved meanwhile)."""


def reference_key(model_name: str, version: str) -> str:
    return f"{REFERENCE_PREFIX}/{model_name}/{version}.npy"


def _encode(vectors: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(vectors, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def _decode(data: bytes, key: str) -> np.ndarray:
    """A stored reference, refused unless it is a finite float matrix (never unpickled)."""
    try:
        vectors = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{key} is not a plain .npy array: {exc}") from exc
    if vectors.ndim != 2 or vectors.dtype.kind != "f" or not np.isfinite(vectors).all():
        raise ValueError(f"{key} is not a finite float matrix ({vectors.dtype}, {vectors.shape})")
    return vectors.astype(np.float32, copy=False)


def load_reference(settings: Settings, store: ObjectStore, ref: ModelRef) -> np.ndarray | None:
    """The stored reference of ``ref``'s version; None if none is stored yet."""
    key = reference_key(ref.name, ref.version)
    if not store.exists(settings.bucket_reports, key):
        return None
    return _decode(store.get_bytes(settings.bucket_reports, key), key)


def store_reference(
    settings: Settings, store: ObjectStore, ref: ModelRef, vectors: np.ndarray
) -> str:
    key = reference_key(ref.name, ref.version)
    store.put_bytes(settings.bucket_reports, key, _encode(vectors), "application/octet-stream")
    return key


def training_sample(
    session: Session,
    settings: Settings,
    ref: ModelRef,
    store: ObjectStore,
    limit: int = REFERENCE_IMAGES,
) -> list[bytes] | None:
    """Up to ``limit`` images of the train split ``ref`` was trained on; None without a known
    training snapshot.

    The sample is the images with the lowest content hashes: random with respect to what the
    images show, and the same every time. Each image must match its hash in the (verified)
    manifest.
    """
    snapshot = training_snapshot_of(session, settings, ref)
    if snapshot is None:
        return None
    manifest = read_manifest(settings, snapshot, store)
    train = [item for item in manifest["images"] if item.get("split") == "train"]
    chosen = sorted(train, key=lambda item: item["image_hash"])[:limit]

    def fetch(item: Mapping[str, Any]) -> bytes:
        return fetch_file(settings, store, snapshot, item, "image")

    with ThreadPoolExecutor(_IO_THREADS) as pool:
        return list(pool.map(fetch, chosen))


def reference_embeddings(
    session: Session,
    settings: Settings,
    ref: ModelRef,
    embed: Embed,
    store: ObjectStore | None = None,
    limit: int = REFERENCE_IMAGES,
) -> np.ndarray | None:
    """The embeddings of ``ref``'s training images: stored ones, else computed with ``embed``
    and stored. None when the version's training set is unknown or ``embed`` answered with
    another version (nothing is stored then)."""
    store = store or ObjectStore(settings)
    try:
        stored = load_reference(settings, store, ref)
    except ValueError as exc:  # damaged in the bucket: computed again and replaced
        log.warning("reference embeddings of version %s recomputed: %s", ref.version, exc)
        stored = None
    if stored is not None:
        return stored
    images = training_sample(session, settings, ref, store, limit)
    if not images:
        return None
    vectors = embed(images)
    if vectors is None:
        return None
    key = store_reference(settings, store, ref, vectors)
    log.info("embedded %d training images of version %s into %s", len(vectors), ref.version, key)
    return vectors


def champion_per_class(session: Session, version: str) -> dict[str, dict[str, float]] | None:
    """Per-class AP from the newest evaluation of model ``version``: as the challenger of the
    run that trained it, or as the champion a later challenger was compared with. None when
    it was never evaluated (a bootstrap champion)."""
    runs = session.exec(
        select(RetrainingRun)
        .where(RetrainingRun.status == RetrainStatus.succeeded)
        .order_by(col(RetrainingRun.id).desc())
        .limit(_RUNS_LOOKED_AT)
    )
    for run in runs:
        metrics = run.metrics or {}
        if run.model_version == version and metrics.get("challenger"):
            evaluated = metrics["challenger"]
        elif metrics.get("champion_version") == version and metrics.get("champion"):
            evaluated = metrics["champion"]
        else:
            continue
        per_class = evaluated.get("per_class")
        if per_class:
            return per_class
    return None


def champion_class_weights(session: Session, settings: Settings, version: str) -> dict[int, float]:
    """Class id -> weight from the version's last evaluation; empty (all classes alike) when
    it has none."""
    per_class = champion_per_class(session, version)
    if not per_class:
        return {}
    return class_weights_from_ap(per_class, settings.class_names)
