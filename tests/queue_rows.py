"""A queued image with a stored file and a prediction, for the tests of what shows queue items."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from sqlmodel import col, delete

from visionloop.db import session_scope
from visionloop.models import Image, LabelingQueueItem, Prediction
from visionloop.settings import get_settings
from visionloop.storage import ObjectStore
from visionloop.synthetic import encode_jpeg


@contextmanager
def queued_item() -> Iterator[int]:
    """A grey 1280x960 image in the images bucket, queued with one predicted box of class 0."""
    settings = get_settings()
    key = f"test-preview/{uuid.uuid4().hex}.jpg"
    ObjectStore(settings).put_bytes(
        settings.bucket_images, key, encode_jpeg(np.full((960, 1280, 3), 128, np.uint8))
    )
    with session_scope() as session:
        image = Image(content_hash=uuid.uuid4().hex * 2, object_key=key, width=1280, height=960)
        session.add(image)
        session.flush()
        box = {"cls": 0, "name": settings.class_names[0], "conf": 0.87}
        prediction = Prediction(
            image_id=image.id,
            model_version="preview-test",
            boxes=[box | {"x1": 0.25, "y1": 0.25, "x2": 0.75, "y2": 0.75}],
        )
        session.add(prediction)
        session.flush()
        item = LabelingQueueItem(
            image_id=image.id,
            prediction_id=prediction.id,
            image_path=key,
            flagged_reason="uncertain",
        )
        session.add(item)
        session.flush()
        ids = (item.id, prediction.id, image.id)
    try:
        yield ids[0]
    finally:
        with session_scope() as session:
            session.exec(delete(LabelingQueueItem).where(col(LabelingQueueItem.id) == ids[0]))
            session.exec(delete(Prediction).where(col(Prediction.id) == ids[1]))
            session.exec(delete(Image).where(col(Image.id) == ids[2]))
