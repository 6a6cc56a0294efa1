"""Serving: an uploaded image predicted by the champion and logged like an ingested one.

A prediction made for a caller is production data like any other: the image is stored once
by content (the images bucket and ``images`` table, as ingest does), its image-quality
features are kept for drift, and the champion's boxes are logged as a ``Prediction`` with
``source="api"``. A new image that selection flags is queued for review like an ingested one.
The same bytes sent again are the same image; a model version logs one prediction per image.

Uploads meant for the ingest flow (``store_incoming``) only land in the ``incoming`` bucket,
validated first so the caller hears at once about a file ingest would quarantine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from ingest.pipeline import prediction_row
from labeling.selection import Candidate, Selected, SelectionPolicy
from labeling.selection import select as select_for_review
from monitoring.features import extract_features
from serving.predictor import ChampionPredictor
from visionloop.db import session_scope
from visionloop.events import EventKind, emit
from visionloop.images import decode_image
from visionloop.models import Image, ImageStatus, Prediction
from visionloop.settings import Settings
from visionloop.storage import ObjectStore, content_key, sha256_hex

API_SOURCE = "api"
UPLOAD_PREFIX = "uploads/"
"""Where uploads land in the incoming bucket (the ingest flow reads every prefix)."""
VALIDATE_SIDE = 640
"""Uploads are decoded no larger than this to validate them: enough to find broken data."""
_SOURCE_KEY_MAX = 1024

log = logging.getLogger(__name__)
Row = TypeVar("Row", Image, Prediction)


@dataclass(frozen=True)
class Served:
    image_id: int
    prediction_id: int
    content_hash: str
    model_version: str
    boxes: list[dict[str, Any]]
    width: int
    height: int
    new_image: bool
    review: Selected | None  # why selection wants a reviewer to see it; None: it does not


@dataclass(frozen=True)
class Stored:
    bucket: str
    key: str
    content_hash: str
    size_bytes: int
    format: str
    width: int
    height: int
    created: bool  # False: the same bytes were uploaded before


def _image(content_hash: str) -> Image | None:
    with session_scope() as session:
        return session.exec(select(Image).where(Image.content_hash == content_hash)).first()


def _prediction(image_id: int, version: str) -> Prediction | None:
    with session_scope() as session:
        return session.exec(
            select(Prediction).where(
                Prediction.image_id == image_id, Prediction.model_version == version
            )
        ).first()


def _insert_or_existing(row: Row, existing: Callable[[], Row | None]) -> tuple[Row, bool]:
    """Insert ``row``; if a concurrent request inserted the same one first, return theirs."""
    try:
        with session_scope() as session:
            session.add(row)
        return row, True
    except IntegrityError:
        found = existing()
        if found is None:
            raise
        return found, False


def predict_upload(
    settings: Settings,
    data: bytes,
    *,
    predictor: ChampionPredictor,
    store: ObjectStore,
    filename: str = "",
) -> Served:
    """Predict ``data`` with the champion and log it; ``ImageRejected`` for an unusable file."""
    decoded = decode_image(data, max_side=predictor.input_size())
    [result] = predictor.predict_batch([decoded.rgb])
    digest = sha256_hex(data)

    image = _image(digest)
    new_image = image is None
    if image is None:
        key = content_key(data, suffix=decoded.extension)
        store.put_if_absent(settings.bucket_images, key, data, decoded.content_type)
        row = Image(
            content_hash=digest,
            object_key=key,
            source_key=f"{API_SOURCE}:predict/{filename}"[:_SOURCE_KEY_MAX],
            size_bytes=len(data),
            width=decoded.width,
            height=decoded.height,
            format=decoded.format,
            features=extract_features(data),  # from the bytes, exactly as ingest measures them
            status=ImageStatus.predicted,
        )
        image, new_image = _insert_or_existing(row, lambda: _image(digest))
    assert image.id is not None

    prediction = _prediction(image.id, result.model_version)
    if prediction is None:
        prediction, _ = _insert_or_existing(
            prediction_row(image.id, result, source=API_SOURCE),
            lambda: _prediction(image.id, result.model_version),  # type: ignore[arg-type] # id set above
        )
    assert prediction.id is not None

    review = None
    if new_image:
        # One image at a time: the labelling budget is per ingest cycle, so it does not apply.
        policy = SelectionPolicy.from_settings(settings, budget=1)
        chosen = select_for_review([Candidate(image.id, digest, result.confidences)], policy)
        review = chosen[0] if chosen else None
    return Served(
        image_id=image.id,
        prediction_id=prediction.id,
        content_hash=digest,
        model_version=result.model_version,
        boxes=result.boxes,
        width=decoded.width,
        height=decoded.height,
        new_image=new_image,
        review=review,
    )


def queue_flagged(settings: Settings, served: Served) -> None:
    """Queue a flagged image in Label Studio (run after answering: it calls Label Studio).

    Failures are logged, not raised: the queue row stays and the next ingest run links its task.
    """
    from labeling.tasks import queue_for_review

    if served.review is None:
        return
    try:
        report = queue_for_review(settings, [served.review])
    except Exception as exc:
        log.warning(
            "image %s not queued for review: %s: %s", served.image_id, type(exc).__name__, exc
        )
        return
    if report.added:
        emit(
            EventKind.QUEUE_ADDED,
            f"image {served.image_id} from the API queued for review ({served.review.reason})",
            {
                "images": report.added,
                "reasons": {str(served.image_id): served.review.reason},
                "task_ids": {str(i): t for i, t in report.task_ids.items()},
                "source": API_SOURCE,
            },
        )


def store_incoming(settings: Settings, data: bytes, *, store: ObjectStore) -> Stored:
    """Validate an upload and put it in the incoming bucket under its content key."""
    decoded = decode_image(data, max_side=VALIDATE_SIDE)
    key = content_key(data, suffix=decoded.extension, prefix=UPLOAD_PREFIX)
    created = store.put_if_absent(settings.bucket_incoming, key, data, decoded.content_type)
    return Stored(
        bucket=settings.bucket_incoming,
        key=key,
        content_hash=sha256_hex(data),
        size_bytes=len(data),
        format=decoded.format,
        width=decoded.width,
        height=decoded.height,
        created=created,
    )
