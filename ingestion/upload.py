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
import queue
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from ingestion.pipeline import candidate, image_row, measure_image, prediction_row
from labeling.selection import Selected, SelectionPolicy
from labeling.selection import select as select_for_review
from monitoring.confidence_stream import watch_confidence
from serving.batching import MicroBatcher
from serving.predictor import ChampionPredictor, PredictionResult
from visionloop.events import EventKind, emit
from visionloop.images import DecodedImage, DecodeLimits, decode_image
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


def _image(session: Session, content_hash: str) -> Image | None:
    return session.exec(select(Image).where(Image.content_hash == content_hash)).first()


def _prediction(session: Session, image_id: int, version: str) -> Prediction | None:
    return session.exec(
        select(Prediction).where(
            Prediction.image_id == image_id, Prediction.model_version == version
        )
    ).first()


def _insert_or_existing(
    session: Session, row: Row, existing: Callable[[], Row | None]
) -> tuple[Row, bool]:
    """Insert ``row``; if a concurrent request inserted the same one first, return theirs.

    Commits at once: only a committed row can lose the race cleanly, since a refused insert
    rolls back the whole transaction.
    """
    try:
        session.add(row)
        session.commit()
        return row, True
    except IntegrityError:
        session.rollback()
        found = existing()
        if found is None:
            raise
        return found, False


def _logged(
    settings: Settings,
    session: Session,
    store: ObjectStore,
    data: bytes,
    decoded: DecodedImage,
    source_key: str,
    result: PredictionResult,
) -> tuple[Image, Prediction, bool]:
    """The image row of ``data`` and its prediction ``result``, stored and inserted where new;
    returns them and whether the image is new.

    New content, the usual case, is written in one transaction: the image, then its
    prediction, one commit. Another request that committed the same content first makes the
    insert fail; then the image is theirs, and its prediction is logged unless this version
    already did (``_logged_prediction``).
    """
    digest = sha256_hex(data)
    image = _image(session, digest)
    if image is None:
        prepared = measure_image(data, source_key, decoded, DecodeLimits.from_settings(settings))
        # No row: new to the platform. The key is the content's hash, so writing it again over
        # a copy a failed request left behind changes nothing, and costs less than asking first.
        store.put_bytes(settings.bucket_images, prepared.object_key, data, decoded.content_type)
        row = image_row(prepared, ImageStatus.predicted)
        try:
            session.add(row)
            session.flush()  # its id, for the prediction
            assert row.id is not None
            prediction = prediction_row(row.id, result, source=API_SOURCE)
            session.add(prediction)
            session.commit()
            return row, prediction, True
        except IntegrityError:
            # Only the image can collide: nobody else sees it before this commits.
            session.rollback()
            image = _image(session, digest)
            if image is None:
                raise
    assert image.id is not None
    return image, _logged_prediction(session, image.id, result), False


def _logged_prediction(session: Session, image_id: int, result: PredictionResult) -> Prediction:
    """The prediction ``result`` for the image, inserted unless this version logged one."""
    version = result.model_version
    prediction = _prediction(session, image_id, version)
    if prediction is None:
        prediction, _ = _insert_or_existing(
            session,
            prediction_row(image_id, result, source=API_SOURCE),
            lambda: _prediction(session, image_id, version),
        )
    return prediction


def _review_of(
    settings: Settings, image_id: int, digest: str, result: PredictionResult
) -> Selected | None:
    # One image at a time: the labelling budget is per ingest cycle, so it does not apply.
    policy = SelectionPolicy.from_settings(settings, budget=1)
    chosen = select_for_review([candidate(image_id, digest, result)], policy)
    return chosen[0] if chosen else None


def predict_upload(
    session: Session,
    settings: Settings,
    data: bytes,
    *,
    predictor: ChampionPredictor,
    store: ObjectStore,
    filename: str = "",
    batcher: MicroBatcher | None = None,
) -> Served:
    """Predict ``data`` with the champion and log it; ``ImageRejected`` for an unusable file.

    ``batcher`` (in front of ``predictor``) lets concurrent uploads share a forward pass;
    without it the image is predicted alone. The rows are committed as they are logged (see
    ``_logged``).
    """
    # 1. Decode and validate: no service, no model. (``input_size`` may ask MLflow whether the
    #    champion moved, outside the model's lock: see ``ChampionPredictor._current``.)
    limits = DecodeLimits.from_settings(settings)
    decoded = decode_image(data, max_side=predictor.input_size(), limits=limits)
    # 2. The model, and nothing else: every caller waiting for it waits for this alone.
    if batcher is not None:
        result = batcher.predict(decoded.rgb)
    else:
        [result] = predictor.predict_batch([decoded.rgb])
    # 3. The object store and the database, once the model is free for the next batch.
    source_key = f"{API_SOURCE}:predict/{filename}"[:_SOURCE_KEY_MAX]
    image, prediction, new_image = _logged(
        settings, session, store, data, decoded, source_key, result
    )
    assert image.id is not None and prediction.id is not None
    return Served(
        image_id=image.id,
        prediction_id=prediction.id,
        content_hash=image.content_hash,
        model_version=result.model_version,
        boxes=result.boxes,
        width=decoded.width,
        height=decoded.height,
        new_image=new_image,
        review=_review_of(settings, image.id, image.content_hash, result) if new_image else None,
    )


OpenSession = Callable[[], AbstractContextManager[Session]]


class _ConfidenceWatch:
    """The confidence stream's replays for served images, on a thread of their own.

    A replay reads the model version's newest predictions and runs ADWIN over them: one per
    request would repeat that work for every image under load. A request only hands its image
    over; the thread replays each stream (database and version) once for every image that
    arrived while it was busy. Not a background task that loops: that would keep its
    request's connection waiting for as long as images keep coming.
    """

    def __init__(self) -> None:
        self._images: queue.SimpleQueue[tuple[OpenSession, Settings, str, int]] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(
        self, open_session: OpenSession, settings: Settings, model_version: str, image_id: int
    ) -> None:
        self._images.put((open_session, settings, model_version, image_id))
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="confidence-watch", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            waiting = [self._images.get()]
            with suppress(queue.Empty):
                while True:
                    waiting.append(self._images.get_nowait())
            streams: dict[tuple[str, str], tuple[OpenSession, Settings, list[int]]] = {}
            for open_session, settings, version, image_id in waiting:
                stream = streams.setdefault(
                    (settings.db_url, version), (open_session, settings, [])
                )
                stream[2].append(image_id)
            for (_, version), (open_session, settings, image_ids) in streams.items():
                try:
                    with open_session() as session:
                        watch_confidence(session, settings, version, image_ids)
                except Exception as exc:  # the database away: the next images try again
                    log.warning(
                        "confidence stream of model version %s not checked for %d images: %s: %s",
                        version,
                        len(image_ids),
                        type(exc).__name__,
                        exc,
                    )


_confidence_watch = _ConfidenceWatch()


def watch_served_confidence(open_session: OpenSession, settings: Settings, served: Served) -> None:
    """Feed a new image's prediction to the confidence stream's change detector (ADWIN; see
    ``monitoring.confidence_stream``) in the next replay of its stream (``_ConfidenceWatch``).
    An image seen before adds nothing new to the stream."""
    if not served.new_image:
        return
    _confidence_watch.submit(open_session, settings, served.model_version, served.image_id)


def queue_flagged(open_session: OpenSession, settings: Settings, served: Served) -> None:
    """Queue a flagged image in Label Studio (run after answering: it calls Label Studio).

    Runs after the request's session is closed, so the caller passes how to open one.
    Failures are logged, not raised: the queue row stays and the next ingest run links its task.
    """
    from labeling.tasks import queue_for_review
    from labeling.wiring import forget_wiring, wired_project

    if served.review is None:
        return
    try:
        project = wired_project(settings)
        with open_session() as session:
            report = queue_for_review(session, settings, [served.review], project, wired=True)
    except Exception as exc:
        forget_wiring(settings)  # the next image ensures the project and its wiring again
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
    limits = DecodeLimits.from_settings(settings)
    decoded = decode_image(data, max_side=VALIDATE_SIDE, limits=limits)
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
