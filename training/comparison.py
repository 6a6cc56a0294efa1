"""Held-out images where champion and challenger differ most, drawn side by side.

A person trusts a verdict sooner after seeing what changed: for a few held-out images, the
champion's boxes on the left and the challenger's on the right, the reviewed boxes (the
truth the mAP was computed against) drawn thin in both.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from PIL import Image as PILImage

from training.evaluation import ImageResult
from training.interval import image_map
from visionloop.boxes import corners, parse_yolo_labels
from visionloop.drawing import caption, draw_boxes, fit_within, side_by_side
from visionloop.images import decode_image

EXAMPLES = 4
CHAMPION_COLOUR = "#e8710a"
CHALLENGER_COLOUR = "#1a73e8"
TRUTH_COLOUR = "#1e8e3e"
SIDE = 320  # longest side of each half, in pixels: two fit a report page side by side


def pick_examples(
    champion: Sequence[ImageResult], challenger: Sequence[ImageResult], count: int = EXAMPLES
) -> list[dict[str, Any]]:
    """The ``count`` images whose own mAP50-95 differs most between the two models (then those
    whose shown boxes differ most in number), with both models' boxes; both lists are the
    same images, in any order."""
    theirs = {r.image_hash: r for r in challenger}
    rows = []
    for old in champion:
        new = theirs.get(old.image_hash)
        if new is None:
            continue
        before, after = image_map(old.stats), image_map(new.stats)
        rows.append(
            {
                "image_hash": old.image_hash,
                "champion_map": round(before, 4),
                "challenger_map": round(after, 4),
                "champion_boxes": old.boxes,
                "challenger_boxes": new.boxes,
                "_rank": (
                    -abs(after - before),
                    -abs(len(new.boxes) - len(old.boxes)),
                    old.image_hash,
                ),
            }
        )
    rows.sort(key=lambda row: row["_rank"])
    return [{k: v for k, v in row.items() if k != "_rank"} for row in rows[:count]]


def truth_boxes(label_text: str, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """A YOLO label file's boxes as normalised corners, named by class."""
    labels = parse_yolo_labels(label_text)
    boxes = []
    for label, (x1, y1, x2, y2) in zip(labels, corners(b._asdict() for b in labels)):
        name = class_names[label.cls] if 0 <= label.cls < len(class_names) else str(label.cls)
        boxes.append({"cls": 0, "name": name, "x1": x1, "y1": y1, "x2": x2, "y2": y2})
    return boxes


def render(
    image: bytes, label_text: str, example: dict[str, Any], class_names: Sequence[str]
) -> bytes:
    """The example as a PNG: champion left, challenger right, the truth in both."""
    rgb = fit_within(decode_image(image, max_side=SIDE).rgb, SIDE)
    truth = truth_boxes(label_text, class_names)
    halves = []
    for role, colour in (("champion", CHAMPION_COLOUR), ("challenger", CHALLENGER_COLOUR)):
        half = rgb.copy()
        draw_boxes(half, truth, [TRUTH_COLOUR])
        draw_boxes(half, [{**b, "cls": 0} for b in example[f"{role}_boxes"]], [colour])
        halves.append(caption(half, f"{role}  mAP50-95 {example[f'{role}_map']:.2f}"))
    buffer = io.BytesIO()
    PILImage.fromarray(side_by_side(*halves)).save(buffer, format="PNG")
    return buffer.getvalue()
