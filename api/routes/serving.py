"""Serving: predictions from the champion for an uploaded image, and uploads for the ingest flow."""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, File, UploadFile

from api.deps import (
    BatcherDep,
    EngineDep,
    PredictorDep,
    SessionDep,
    SettingsDep,
    StoreDep,
    Token,
)
from api.errors import (
    AUTH,
    ImageErrorBody,
    PayloadTooLarge,
    ServiceUnavailable,
    ValidationErrorBody,
    responses,
)
from api.schemas import PredictionOut, StoredImageOut
from ingestion.upload import (
    predict_upload,
    queue_flagged,
    store_incoming,
    watch_served_confidence,
)
from serving.batching import BatcherUnavailable
from visionloop.db import session_scope

router = APIRouter(prefix="/api", tags=["serving"])

MAX_UPLOAD_BYTES = 50 * 1024 * 1024
"""Larger uploads are refused before reading them whole into memory."""

_IMAGE_ERRORS = {
    **responses(400, 413),
    422: {
        "model": ValidationErrorBody | ImageErrorBody,
        "description": "The form is invalid (`errors` says where), or the file is not a usable "
        "image (`code` says why).",
    },
}


def _read(upload: UploadFile) -> bytes:
    data = upload.file.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise PayloadTooLarge(f"the upload is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MiB")
    return data


@router.post(
    "/predict",
    response_model=PredictionOut,
    dependencies=[Token],
    responses={**AUTH, **_IMAGE_ERRORS},
)
def predict(
    settings: SettingsDep,
    session: SessionDep,
    engine: EngineDep,
    predictor: PredictorDep,
    batcher: BatcherDep,
    store: StoreDep,
    background: BackgroundTasks,
    file: Annotated[UploadFile, File(description="The image: JPEG, PNG, WebP, GIF, BMP or TIFF.")],
) -> PredictionOut:
    """Boxes from the current champion (normalised 0..1 to the upright image).

    The image and the prediction are logged like ingested ones, so they feed drift and, when
    selection flags the image, the review queue. A new champion is picked up without restart.
    Concurrent requests share forward passes (``VISIONLOOP_BATCH_*``); 503 when too many wait.
    """
    try:
        served = predict_upload(
            session,
            settings,
            _read(file),
            predictor=predictor,
            store=store,
            filename=file.filename or "",
            batcher=batcher,
        )
    except BatcherUnavailable as exc:
        raise ServiceUnavailable(str(exc)) from exc
    open_session = partial(session_scope, engine)
    if served.review is not None:
        # Calls Label Studio, so after answering, in a session of its own on the same engine.
        background.add_task(queue_flagged, open_session, settings, served)
    # Replays the confidence stream (a few ms): after answering, not on the request's clock.
    background.add_task(watch_served_confidence, open_session, settings, served)
    return PredictionOut.model_validate(
        {**served.__dict__, "flagged_reason": served.review.reason if served.review else None}
    )


@router.post(
    "/images",
    status_code=201,
    response_model=StoredImageOut,
    dependencies=[Token],
    responses={**AUTH, **_IMAGE_ERRORS},
)
def upload_image(
    settings: SettingsDep,
    store: StoreDep,
    file: Annotated[UploadFile, File(description="The image: JPEG, PNG, WebP, GIF, BMP or TIFF.")],
) -> StoredImageOut:
    """Put an image into the ``incoming`` bucket for the next ingest run (validated first)."""
    return StoredImageOut.model_validate(store_incoming(settings, _read(file), store=store))
