"""A queued image as a reviewer first meets it: a small JPEG with the champion's boxes drawn on.

The dashboard's queue gallery shows these, so a person sees at a glance what selection picked
and what the champion made of it. Boxes are drawn in the class colours of the Label Studio
project (``labeling.label_config.class_colours``), so the two views agree.
"""

from __future__ import annotations

import io
from typing import Any

import cv2
import numpy as np
from PIL import Image as PILImage
from sqlmodel import Session

from labeling.label_config import class_colours
from visionloop.images import decode_image
from visionloop.models import Image, LabelingQueueItem, Prediction
from visionloop.settings import Settings
from visionloop.storage import ObjectStore

PREVIEW_SIDE = 320
"""Longest side of a preview, in pixels: a gallery thumbnail, enlarged twice on a retina."""


class PreviewUnavailable(LookupError):
    """The queue item, its image or its stored bytes do not exist."""


def _rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def draw_boxes(rgb: np.ndarray, boxes: list[dict[str, Any]], class_names: list[str]) -> None:
    """Draw the normalised ``boxes`` on ``rgb`` in place, each with its class and confidence."""
    height, width = rgb.shape[:2]
    colours = class_colours(max(len(class_names), 1))
    thickness = max(1, round(max(height, width) / 200))
    for box in boxes:
        cls = int(box.get("cls", 0))
        colour = _rgb(colours[cls % len(colours)])
        x1, y1 = round(box["x1"] * width), round(box["y1"] * height)
        x2, y2 = round(box["x2"] * width), round(box["y2"] * height)
        cv2.rectangle(rgb, (x1, y1), (x2, y2), colour, thickness)
        text = f"{box.get('name', cls)} {float(box.get('conf', 0)):.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
        top = max(0, y1 - th - base - 2)
        cv2.rectangle(rgb, (x1, top), (x1 + tw + 4, top + th + base + 2), colour, -1)
        cv2.putText(
            rgb, text, (x1 + 2, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1
        )


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
    rgb = decode_image(data, max_side=PREVIEW_SIDE).rgb
    scale = PREVIEW_SIDE / max(rgb.shape[:2])
    if scale < 1:
        size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    rgb = np.array(rgb)  # a writable copy: the decoder's array may be read-only
    draw_boxes(rgb, prediction.boxes if prediction else [], list(settings.class_names))
    buffer = io.BytesIO()
    PILImage.fromarray(rgb).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()
