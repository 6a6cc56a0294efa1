"""Boxes drawn on an image: the one way the platform shows a model's boxes to a person.

Used for the queue gallery's previews and the retrain report's side-by-side comparisons; the
caller picks the colours (the gallery uses the Label Studio project's class colours).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np


def hex_rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def fit_within(rgb: np.ndarray, side: int) -> np.ndarray:
    """A writable copy of ``rgb`` whose longest side is at most ``side`` pixels."""
    scale = side / max(rgb.shape[:2])
    if scale < 1:
        size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    return np.array(rgb)  # a copy: the decoder's array may be read-only


def draw_boxes(rgb: np.ndarray, boxes: Sequence[Mapping[str, Any]], colours: Sequence[str]) -> None:
    """Draw the normalised ``boxes`` (``x1 y1 x2 y2``) on ``rgb`` in place, in the colour of
    their class (``colours[cls]``, cycled), each with its class and confidence when it has one."""
    height, width = rgb.shape[:2]
    thickness = max(1, round(max(height, width) / 200))
    for box in boxes:
        cls = int(box.get("cls", 0))
        colour = hex_rgb(colours[cls % len(colours)])
        x1, y1 = round(box["x1"] * width), round(box["y1"] * height)
        x2, y2 = round(box["x2"] * width), round(box["y2"] * height)
        cv2.rectangle(rgb, (x1, y1), (x2, y2), colour, thickness)
        text = str(box.get("name", cls))
        if box.get("conf") is not None:
            text += f" {float(box['conf']):.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
        top = max(0, y1 - th - base - 2)
        cv2.rectangle(rgb, (x1, top), (x1 + tw + 4, top + th + base + 2), colour, -1)
        cv2.putText(
            rgb, text, (x1 + 2, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1
        )


def caption(rgb: np.ndarray, text: str, height: int = 22) -> np.ndarray:
    """``rgb`` with a dark band on top holding ``text``."""
    band = np.full((height, rgb.shape[1], 3), 32, dtype=np.uint8)
    cv2.putText(band, text, (4, height - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1)
    return np.vstack([band, rgb])


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 6) -> np.ndarray:
    """Two images of the same height next to each other, a white gap between them."""
    spacer = np.full((left.shape[0], gap, 3), 255, dtype=np.uint8)
    return np.hstack([left, spacer, right])
