"""The two populations drift compares, as feature tables with one row per image.

Columns: the image-quality features (``monitoring.features``) plus prediction statistics of
the champion: mean and max confidence, boxes per image and the class mix (share of each class
among an image's boxes; empty when it has none).

* **reference**: the champion's training snapshot (MLflow run tag → snapshot manifest). Image
  features come from every snapshot image; prediction statistics only from the images the
  model did not train on, since a model is over-confident on its own training images. The
  table is built once per model version and cached in the reports bucket.
* **current**: recent production images (the last ``drift_window_hours``, at most
  ``drift_window_size``), with the predictions this same model version made at ingest.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import pandas as pd
from sqlmodel import Session, select

from monitoring.drift import DriftError
from monitoring.features import FEATURE_NAMES, extract_features
from visionloop.images import DecodeLimits, decode_image
from visionloop.models import Image, ImageStatus, Prediction
from visionloop.registry import ModelRef
from visionloop.settings import Settings
from visionloop.storage import ObjectStore, StorageError

if TYPE_CHECKING:
    from serving.predictor import ChampionPredictor

_BATCH = 32


def prediction_stats(
    boxes: Sequence[dict[str, Any]], class_names: Sequence[str]
) -> dict[str, float]:
    confidences = [float(b["conf"]) for b in boxes]
    stats: dict[str, float] = {
        "pred_boxes": float(len(boxes)),
        "pred_mean_conf": sum(confidences) / len(confidences) if confidences else float("nan"),
        "pred_max_conf": max(confidences) if confidences else 0.0,
    }
    for index, name in enumerate(class_names):
        hits = sum(1 for b in boxes if int(b["cls"]) == index)
        stats[f"pred_share_{name}"] = hits / len(boxes) if boxes else float("nan")
    return stats


def reference_key(settings: Settings, ref: ModelRef) -> str:
    return f"drift/reference/{settings.model_name}/v{ref.version}.parquet"


def _cached_reference(settings: Settings, store: ObjectStore, key: str) -> pd.DataFrame | None:
    try:
        return pd.read_parquet(io.BytesIO(store.get_bytes(settings.bucket_reports, key)))
    except StorageError:
        return None  # not built yet for this version


def _store_reference(settings: Settings, store: ObjectStore, key: str, frame: pd.DataFrame) -> None:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    store.put_bytes(
        settings.bucket_reports, key, buffer.getvalue(), "application/vnd.apache.parquet"
    )


def _predictor_for(settings: Settings, ref: ModelRef) -> ChampionPredictor:
    """A fresh predictor of ``ref``: the reference is only ever built for the current champion."""
    from serving.predictor import ChampionPredictor

    predictor = ChampionPredictor(settings, recheck_s=float("inf"))
    if predictor.model_version() != ref.version:
        raise DriftError(
            f"the champion moved away from version {ref.version} while building its reference"
        )
    return predictor


def _reference_rows(
    blobs: Sequence[bytes],
    names: Sequence[str],
    predictor: ChampionPredictor,
    class_names: Sequence[str],
    limits: DecodeLimits,
) -> list[dict[str, Any]]:
    """Feature rows of one batch of snapshot images; prediction statistics only for the images
    outside the training split (a model is over-confident on what it trained on)."""
    unseen = [k for k, name in enumerate(names) if "/train/" not in f"/{name}"]
    decoded = [decode_image(blobs[k], limits=limits).rgb for k in unseen]
    predictions = predictor.predict_batch(decoded) if unseen else []
    by_index = dict(zip(unseen, predictions))
    rows: list[dict[str, Any]] = []
    for k, blob in enumerate(blobs):
        row: dict[str, Any] = dict(extract_features(blob, limits=limits))
        if k in by_index:
            row.update(prediction_stats(by_index[k].boxes, class_names))
        rows.append(row)
    return rows


def _build_reference(
    session: Session, settings: Settings, ref: ModelRef, store: ObjectStore
) -> pd.DataFrame:
    from training.snapshots import read_manifest, training_snapshot_of

    snapshot = training_snapshot_of(session, settings, ref)
    if snapshot is None:
        raise DriftError(
            f"model version {ref.version} has no training snapshot recorded in MLflow, so there is "
            "no reference to compare production with"
        )
    manifest = read_manifest(settings, snapshot, store)
    predictor = _predictor_for(settings, ref)
    limits = DecodeLimits.from_settings(settings)
    rows: list[dict[str, Any]] = []
    items = manifest["images"]
    for start in range(0, len(items), _BATCH):
        names = [i["image"] for i in items[start : start + _BATCH]]
        blobs = [
            store.get_bytes(settings.bucket_datasets, snapshot.object_prefix + name)
            for name in names
        ]
        rows.extend(_reference_rows(blobs, names, predictor, manifest["class_names"], limits))
    return pd.DataFrame(rows)


def reference_frame(
    session: Session, settings: Settings, ref: ModelRef, store: ObjectStore | None = None
) -> pd.DataFrame:
    """The champion's reference table, from the cache or built from its training snapshot."""
    store = store or ObjectStore(settings)
    key = reference_key(settings, ref)
    cached = _cached_reference(settings, store, key)
    if cached is not None:
        return cached
    frame = _build_reference(session, settings, ref, store)
    _store_reference(settings, store, key, frame)
    return frame


def _recent_images(
    session: Session, settings: Settings, model_version: str, since: datetime
) -> Sequence[tuple[Image, Prediction | None]]:
    return session.exec(
        select(Image, Prediction)
        .join(
            Prediction,
            (Prediction.image_id == Image.id) & (Prediction.model_version == model_version),
            isouter=True,
        )
        .where(
            Image.status != ImageStatus.quarantined,
            Image.features.is_not(None),
            Image.created_at >= since,
        )
        .order_by(Image.created_at.desc())
        .limit(settings.drift_window_size)
    ).all()


def current_frame(
    session: Session, settings: Settings, model_version: str, now: datetime
) -> pd.DataFrame:
    """Recent production images with their features and this model version's predictions."""
    since = now - timedelta(hours=settings.drift_window_hours)
    table = []
    for image, prediction in _recent_images(session, settings, model_version, since):
        row: dict[str, Any] = {name: image.features.get(name) for name in FEATURE_NAMES}
        if prediction is not None:
            row.update(prediction_stats(prediction.boxes, settings.class_names))
        table.append(row)
    return pd.DataFrame(table)
