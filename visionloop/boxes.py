"""Boxes: the one box type, the reviewed-box format, overlap and matching, Label Studio rectangles.

The box forms in use
--------------------
- ``YoloBox``: class id, centre and size normalised to 0..1 of the image (a YOLO label line).
- Reviewed boxes (``ReviewedLabel.boxes``): dicts ``{"cls", "name", "cx", "cy", "w", "h"}``
  in the same units; ``name`` (``label`` is read as a synonym) wins over ``cls``, so a box
  stored under an older class map still gets the right id. ``box_dicts`` writes them and
  ``normalise_boxes`` reads them back.
- Predicted boxes (``Prediction.boxes``): dicts with corners ``x1, y1, x2, y2`` normalised.
- Label Studio rectangles: top-left corner and size in percent of the image, with a
  clockwise rotation about that corner. ``ls_rectangle`` writes one, ``ls_extent`` reads one.

Overlap works on corners (``corners`` reads either dict form): ``iou_matrix`` is their IoU,
``greedy_match`` pairs boxes one to one, best overlaps first; ``matched_by_class`` does it per
class on one image (the review statistics' matching).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

FROM_NAME = "label"
"""Name of the review config's ``RectangleLabels`` control tag (``from_name`` of every region)."""
TO_NAME = "image"
"""Name of the ``Image`` object tag (``to_name`` of every region)."""
RECTANGLE = "rectanglelabels"
"""Label Studio's result type of a labelled rectangle."""

MATCH_IOU = 0.5
"""A predicted box overlapping a reviewed box of its class this much is the same box."""

Extent = tuple[float, float, float, float]
"""An upright box by its corners: x0, y0, x1, y1 (in the units the function names)."""


class LabelError(ValueError):
    """A reviewed box that cannot be exported (bad coordinates or no class)."""


class YoloBox(NamedTuple):
    """One box as a YOLO label line has it: class id, centre and size normalised to 0..1."""

    cls: int
    cx: float
    cy: float
    w: float
    h: float


def format_yolo_labels(boxes: Iterable[Sequence[float]]) -> str:
    """One ``cls cx cy w h`` line per box, 6 decimals, as YOLO label files expect."""
    return "".join(f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n" for c, cx, cy, w, h in boxes)


def parse_yolo_labels(text: str) -> tuple[YoloBox, ...]:
    """A YOLO label file's boxes: what ``format_yolo_labels`` wrote, read back."""
    return tuple(
        YoloBox(int(row[0]), *(float(v) for v in row[1:5]))
        for row in (line.split() for line in text.splitlines())
        if row
    )


# --- clipping ---------------------------------------------------------------------------------


def clip_extent(extent: Extent, limit: float = 1.0) -> Extent:
    """``extent`` cut to the image, ``[0, limit]`` on both axes; it may come out empty."""
    x0, y0, x1, y1 = extent
    return max(0.0, x0), max(0.0, y0), min(limit, x1), min(limit, y1)


def clip_box(cls: int, cx: float, cy: float, w: float, h: float) -> YoloBox | None:
    """The part of a box inside the image (boxes drawn to the edge overshoot); None if empty."""
    extent = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    if w > 0 and h > 0 and clip_extent(extent) == extent:
        return YoloBox(cls, cx, cy, w, h)  # inside already: keep the exact values
    x0, y0, x1, y1 = clip_extent(extent)
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return None
    return YoloBox(cls, (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0)


# --- the reviewed-box format ------------------------------------------------------------------


def _unit(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LabelError(f"box {name}={value!r} is not a number") from None
    if not math.isfinite(number):
        raise LabelError(f"box {name}={value!r} is not finite")
    return number


def _class_id(box: Mapping[str, Any], index: Mapping[str, int], n_classes: int) -> int | str:
    """The box's class id in the current map, or the label to report when it has none there."""
    label = box.get("name", box.get("label"))
    if label is not None:
        return index.get(str(label), str(label))
    try:
        cls = int(box["cls"])
    except (KeyError, TypeError, ValueError):
        raise LabelError(f"box {dict(box)} has neither a label nor an integer cls") from None
    return cls if 0 <= cls < n_classes else f"cls {cls}"


def normalise_boxes(
    raw: Iterable[Mapping[str, Any]], class_names: Sequence[str]
) -> tuple[tuple[YoloBox, ...], list[str]]:
    """Reviewed boxes as YOLO boxes, plus the labels it had to drop.

    A box whose class is not in ``class_names`` is dropped (its class was removed from the
    map, so to the detector it is background now) and its label returned, for the profile.
    """
    index = {name: i for i, name in enumerate(class_names)}
    boxes: list[YoloBox] = []
    dropped: list[str] = []
    for box in raw:
        cls = _class_id(box, index, len(class_names))
        if isinstance(cls, str):
            dropped.append(cls)
            continue
        clipped = clip_box(cls, *(_unit(box.get(k), k) for k in ("cx", "cy", "w", "h")))
        if clipped is not None:
            boxes.append(clipped)
    return tuple(boxes), dropped


def box_dicts(boxes: Iterable[YoloBox], class_names: Sequence[str]) -> list[dict[str, Any]]:
    """YOLO boxes in the reviewed-box format."""
    return [
        {"cls": b.cls, "name": class_names[b.cls], "cx": b.cx, "cy": b.cy, "w": b.w, "h": b.h}
        for b in boxes
    ]


# --- overlap and matching ---------------------------------------------------------------------


def corners(boxes: Iterable[Mapping[str, Any]]) -> np.ndarray:
    """Box dicts of one form, predicted (``x1..y2``) or reviewed (``cx, cy, w, h``), as an
    (N, 4) array of corners."""
    rows = list(boxes)
    if rows and "x1" not in rows[0]:
        centres = np.array([[box["cx"], box["cy"], box["w"], box["h"]] for box in rows], np.float64)
        half = centres[:, 2:] / 2
        return np.hstack([centres[:, :2] - half, centres[:, :2] + half])
    return np.array([[b["x1"], b["y1"], b["x2"], b["y2"]] for b in rows], np.float64).reshape(-1, 4)


def iou_matrix(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> np.ndarray:
    """IoU of every corner box of ``a`` with every one of ``b``, an (N, M) array; 0 where the
    union is empty.

    A few lines of numpy rather than ultralytics' box ops: those bring torch into every process
    that reads a review (the API's queue stats, the label-sync flow) for a handful of boxes.
    """
    a_array = np.asarray(a, np.float64).reshape(-1, 1, 4)
    b_array = np.asarray(b, np.float64).reshape(1, -1, 4)
    width = np.minimum(a_array[..., 2], b_array[..., 2]) - np.maximum(
        a_array[..., 0], b_array[..., 0]
    )
    height = np.minimum(a_array[..., 3], b_array[..., 3]) - np.maximum(
        a_array[..., 1], b_array[..., 1]
    )
    inter = np.clip(width, 0.0, None) * np.clip(height, 0.0, None)

    def area(boxes: np.ndarray) -> np.ndarray:
        return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])

    union = area(a_array) + area(b_array) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def greedy_pairs(ious: np.ndarray, min_iou: float = MATCH_IOU) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matches of rows to columns, best overlaps first, as ``(row, column,
    IoU)``.

    Pairs below ``min_iou`` never match (mark a pair that must not match with -1); on equal
    overlaps the later row, then the later column, goes first.
    """
    pairs = sorted(
        ((float(ious[i, j]), i, j) for i in range(ious.shape[0]) for j in range(ious.shape[1])),
        reverse=True,
    )
    used_rows: set[int] = set()
    used_cols: set[int] = set()
    matched: list[tuple[int, int, float]] = []
    for iou, i, j in pairs:
        if iou < min_iou:
            break
        if i not in used_rows and j not in used_cols:
            used_rows.add(i)
            used_cols.add(j)
            matched.append((i, j, iou))
    return matched


def greedy_match(ious: np.ndarray, min_iou: float = MATCH_IOU) -> list[float]:
    """The IoUs of ``greedy_pairs``."""
    return [iou for _, _, iou in greedy_pairs(ious, min_iou)]


def match_count(
    predicted: Sequence[Sequence[float]],
    reviewed: Sequence[Sequence[float]],
    min_iou: float = MATCH_IOU,
) -> int:
    """Greedy one-to-one matches (best overlaps first) with IoU of at least ``min_iou``."""
    return len(greedy_match(iou_matrix(predicted, reviewed), min_iou))


def box_class_name(box: Mapping[str, Any], class_names: Sequence[str]) -> str:
    """The class a box counts under: its ``name`` (or ``label``), else its ``cls`` in
    ``class_names``, else ``cls <id>``."""
    name = box.get("name") or box.get("label")
    if name:
        return str(name)
    cls = int(box.get("cls", -1))
    return class_names[cls] if 0 <= cls < len(class_names) else f"cls {cls}"


def matched_by_class(
    predicted: Sequence[Mapping[str, Any]],
    reviewed: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
) -> Iterator[tuple[str, int, int, int]]:
    """Per class on one image, in name order: (name, predicted boxes, reviewed boxes, matched
    pairs), the pairs by ``match_count``."""
    names = {box_class_name(b, class_names) for b in (*predicted, *reviewed)}
    for name in sorted(names):
        p = corners(b for b in predicted if box_class_name(b, class_names) == name)
        r = corners(b for b in reviewed if box_class_name(b, class_names) == name)
        yield name, len(p), len(r), match_count(p, r)


# --- Label Studio rectangles ------------------------------------------------------------------


def ls_rectangle(
    label: str,
    top_left_size: tuple[float, float, float, float],
    width: int,
    height: int,
    *,
    region_id: str | None = None,
    score: float | None = None,
) -> dict[str, Any]:
    """An upright box (top-left x, y and w, h normalised) as a Label Studio rectangle region.

    With ``region_id`` (and ``score``) it is a prediction region, else an annotation result.
    The two keep their own key orders so that stored tasks and exports stay byte for byte
    what they were.
    """
    x, y, w, h = top_left_size
    value = {
        "x": x * 100.0,
        "y": y * 100.0,
        "width": w * 100.0,
        "height": h * 100.0,
        "rotation": 0,
        "rectanglelabels": [label],
    }
    names = {"from_name": FROM_NAME, "to_name": TO_NAME}
    image = {"original_width": width, "original_height": height, "image_rotation": 0}
    if region_id is None:
        return {"type": RECTANGLE, **names, **image, "value": value}
    return {"id": region_id, **names, "type": RECTANGLE, **image, "score": score, "value": value}


def ls_extent(value: Mapping[str, Any], width: float, height: float) -> Extent:
    """Percent corners of the upright box enclosing a Label Studio rectangle's ``value``.

    Label Studio keeps a rotated rectangle as its unrotated top-left corner, size and a
    clockwise rotation in degrees about that corner; the corners are rotated in pixels
    (``width`` x ``height``), where the angle is true.
    """
    x, y, w, h = (float(value[k]) for k in ("x", "y", "width", "height"))
    angle = math.radians(float(value.get("rotation") or 0.0))
    if angle == 0:
        return x, y, x + w, y + h
    sx, sy = width / 100, height / 100
    cos, sin = math.cos(angle), math.sin(angle)
    offsets = ((0, 0), (w * sx, 0), (w * sx, h * sy), (0, h * sy))
    xs = [(x * sx + u * cos - v * sin) / sx for u, v in offsets]
    ys = [(y * sy + u * sin + v * cos) / sy for u, v in offsets]
    return min(xs), min(ys), max(xs), max(ys)


def extent_box(cls: int, extent: Extent) -> YoloBox:
    """A percent extent (already inside the image) as a YOLO box."""
    x0, y0, x1, y1 = extent
    return YoloBox(cls, (x0 + x1) / 200, (y0 + y1) / 200, (x1 - x0) / 100, (y1 - y0) / 100)


def ls_results_to_boxes(
    results: Iterable[Mapping[str, Any]], class_names: Sequence[str]
) -> list[dict[str, Any]]:
    """Label Studio annotation results (``rectanglelabels``) as reviewed boxes.

    Rotated rectangles become the axis-aligned box that encloses them (Label Studio's own YOLO
    export ignores rotation; for unrotated boxes the two agree). A rectangle with several
    labels yields one box per label, as Label Studio's export does. Labels outside
    ``class_names`` raise ``LabelError``: the review project's config is built from the same
    class map, so one means the project and the settings disagree.
    """
    index = {name: i for i, name in enumerate(class_names)}
    boxes: list[YoloBox] = []
    for result in results:
        if result.get("type") != RECTANGLE:
            continue
        # Only the size ratio matters, so percent units work when the original size is missing.
        width = float(result.get("original_width") or 100.0)
        height = float(result.get("original_height") or 100.0)
        x0, y0, x1, y1 = clip_extent(ls_extent(result["value"], width, height), 100.0)
        for label in result["value"].get("rectanglelabels") or []:
            if label not in index:
                raise LabelError(f"label {label!r} is not one of the classes {list(class_names)}")
            if x1 - x0 > 0 and y1 - y0 > 0:
                boxes.append(extent_box(index[label], (x0, y0, x1, y1)))
    return box_dicts(boxes, class_names)


def ls_results_from_boxes(
    boxes: Iterable[YoloBox], class_names: Sequence[str], width: int, height: int
) -> list[dict[str, Any]]:
    """YOLO boxes as Label Studio ``rectanglelabels`` results (percent units, no rotation)."""
    return [
        ls_rectangle(class_names[b.cls], (b.cx - b.w / 2, b.cy - b.h / 2, b.w, b.h), width, height)
        for b in boxes
    ]
