"""A queued image as a reviewer first meets it: a small JPEG with the champion's boxes drawn on.

The dashboard's queue gallery shows these, so a person sees at a glance what selection picked
and what the champion made of it. Boxes are drawn in the class colours of the Label Studio
project (``labeling.label_config.class_colours``), so the two views agree.
"""

from __future__ import annotations

import io

from PIL import Image as PILImage
from sqlmodel import Session

from labeling.label_config import class_colours
from visionloop.drawing import draw_boxes, fit_within
from visionloop.images import decode_image
from visionloop.models import Image, LabelingQueueItem, Prediction
from visionloop.settings import Settings
from visionloop.storage import ObjectStore

PREVIEW_SIDE = 320
"""Longest side of a preview, in pixels: a gallery thumbnail, enlarged twice on a retina."""


class PreviewUnavailable(LookupError):
    """The queue item, its image or its stored bytes do not exist."""


def queue_preview(session: Session, settings: Settings, store: ObjectStore, item_id: int) -> bytes:
    """The queue item's image at most ``PREVIEW_SIDE`` px, with the champion's boxes, as JPEG."""
    item = session.get(LabelingQueueItem, item_id)
    if item is None:
        raise PreviewUnavailable(f"no queue item {item_id}")
    image = session.get(Image, item.image_id)
    if image is None:
        raise PreviewUnavailable(f"queue item {item_id} has no image row")
    prediction = session.get(Prediction, item.prediction_id) if item.prediction_id else None
    data = store.get_bytes(settings.bucket_images, image.object_key)
    rgb = fit_within(decode_image(data, max_side=PREVIEW_SIDE).rgb, PREVIEW_SIDE)
    colours = class_colours(max(len(settings.class_names), 1))
    draw_boxes(rgb, prediction.boxes if prediction else [], colours)
    buffer = io.BytesIO()
    PILImage.fromarray(rgb).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()
