"""Reviewed labels as datasets: YOLO files, COCO JSON and Label Studio JSON, plus the manifest.

The reviewed-box format
-----------------------
``ReviewedLabel.boxes`` (written by ``labeling/sync.py`` from Label Studio annotations, read
here) is a list of dicts, one per box::

    {"cls": 0, "name": "scratch", "cx": 0.52, "cy": 0.31, "w": 0.20, "h": 0.05}

``cx``/``cy`` are the box centre and ``w``/``h`` its size, normalised to 0..1 of the image's
width and height (YOLO's convention, axis aligned). ``name`` is the class name (``label`` is
read as a synonym) and wins over ``cls`` whenever present: the class id is looked up in the
*current* class map (``VISIONLOOP_CLASS_NAMES``), so a box stored under an older map still
gets the right id. ``cls`` is only used for a box without a name. ``ls_results_to_boxes``
turns Label Studio rectangle results into exactly this format.

Splits and the manifest
-----------------------
An image's split depends only on its content hash (``split_of``), so an image never moves
between the held-out test split and training as labels come and go, and exporting the same
labels twice gives the same manifest and hash (``manifest_hash``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import yaml

from visionloop.synthetic import format_yolo_labels

FROM_NAME = "label"
"""Name of the ``RectangleLabels`` control tag of the review project's label config (``from_name`` of every region)."""
TO_NAME = "image"
"""Name of the ``Image`` object tag (``to_name`` of every region)."""

MANIFEST_FORMAT = "visionloop.snapshot/1"
SPLITS = ("train", "val", "test")
DEFAULT_TEST_PERCENT = 20
"""Share of images (by hash bucket) held out for evaluation; changing it re-partitions the set."""
DEFAULT_VAL_PERCENT = 15
"""Share of images (by hash bucket) ultralytics validates on while training."""


class LabelError(ValueError):
    """A reviewed box that cannot be exported (bad coordinates or no class)."""


class YoloBox(NamedTuple):
    """One box as a YOLO label line has it: class id, centre and size normalised to 0..1."""

    cls: int
    cx: float
    cy: float
    w: float
    h: float


@dataclass(frozen=True)
class LabeledImage:
    """An image and its reviewed boxes, as an export sees them."""

    image_hash: str  # sha256 of the bytes (Image.content_hash)
    suffix: str  # file extension with the dot, e.g. ".jpg"
    width: int
    height: int
    boxes: tuple[YoloBox, ...]
    split: str | None = None  # a given split (bootstrap sets); None: decided by hash

    @property
    def label_text(self) -> str:
        return format_yolo_labels(self.boxes)


@dataclass(frozen=True)
class SplitPolicy:
    """Deterministic split by image hash: bucket ``int(hash[:8], 16) % 100``.

    Buckets ``[0, test)`` are test, ``[test, test + val)`` val, the rest train. Test is the
    lowest range so changing ``val_percent`` never moves an image into or out of the held-out
    set.
    """

    test_percent: int = DEFAULT_TEST_PERCENT
    val_percent: int = DEFAULT_VAL_PERCENT

    def __post_init__(self) -> None:
        if not (
            self.test_percent >= 0
            and self.val_percent >= 0
            and self.test_percent + self.val_percent < 100
        ):
            raise ValueError(
                f"need test and val percentages >= 0 summing below 100, got {self.test_percent} "
                f"and {self.val_percent}"
            )

    def split_of(self, image_hash: str) -> str:
        bucket = int(image_hash[:8], 16) % 100
        if bucket < self.test_percent:
            return "test"
        if bucket < self.test_percent + self.val_percent:
            return "val"
        return "train"

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": "sha256-bucket",
            "test_percent": self.test_percent,
            "val_percent": self.val_percent,
        }


# --- reviewed boxes -------------------------------------------------------------------------


def _unit(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LabelError(f"box {name}={value!r} is not a number") from None
    if not math.isfinite(number):
        raise LabelError(f"box {name}={value!r} is not finite")
    return number


def clip_box(cls: int, cx: float, cy: float, w: float, h: float) -> YoloBox | None:
    """The part of a box inside the image (boxes drawn to the edge overshoot); None if empty."""
    x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    if w > 0 and h > 0 and x0 >= 0 and y0 >= 0 and x1 <= 1 and y1 <= 1:
        return YoloBox(cls, cx, cy, w, h)  # inside already: keep the exact values
    x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(1.0, x1), min(1.0, y1)
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return None
    return YoloBox(cls, (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0)


def normalise_boxes(
    raw: Iterable[Mapping[str, Any]], class_names: Sequence[str]
) -> tuple[tuple[YoloBox, ...], list[str]]:
    """Reviewed boxes (module docstring format) as YOLO boxes, plus the labels it had to drop.

    A box whose class is not in ``class_names`` is dropped (its class was removed from the
    map, so to the detector it is background now) and its label returned, for the profile.
    """
    index = {name: i for i, name in enumerate(class_names)}
    boxes: list[YoloBox] = []
    dropped: list[str] = []
    for box in raw:
        label = box.get("name", box.get("label"))
        if label is not None:
            cls = index.get(str(label))
            if cls is None:
                dropped.append(str(label))
                continue
        else:
            try:
                cls = int(box["cls"])
            except (KeyError, TypeError, ValueError):
                raise LabelError(
                    f"box {dict(box)} has neither a label nor an integer cls"
                ) from None
            if not 0 <= cls < len(class_names):
                dropped.append(f"cls {cls}")
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


# --- Label Studio rectangles ------------------------------------------------------------------


def _enclosing_box(
    value: Mapping[str, Any], width: float, height: float
) -> tuple[float, float, float, float]:
    """Axis-aligned (x0, y0, x1, y1) in pixels of a Label Studio rectangle.

    Label Studio keeps a rotated rectangle as its unrotated top-left corner, size and a
    clockwise rotation in degrees about that corner, all in percent of the image.
    """
    x, y = value["x"] / 100 * width, value["y"] / 100 * height
    w, h = value["width"] / 100 * width, value["height"] / 100 * height
    angle = math.radians(float(value.get("rotation") or 0.0))
    if angle == 0:
        return x, y, x + w, y + h
    cos, sin = math.cos(angle), math.sin(angle)
    xs = [x + u * cos - v * sin for u, v in ((0, 0), (w, 0), (w, h), (0, h))]
    ys = [y + u * sin + v * cos for u, v in ((0, 0), (w, 0), (w, h), (0, h))]
    return min(xs), min(ys), max(xs), max(ys)


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
    boxes: list[dict[str, Any]] = []
    for result in results:
        if result.get("type") != "rectanglelabels":
            continue
        value = result["value"]
        # Only the size ratio matters, so percent units work when the original size is missing.
        width = float(result.get("original_width") or 100.0)
        height = float(result.get("original_height") or 100.0)
        x0, y0, x1, y1 = _enclosing_box(value, width, height)
        for label in value.get("rectanglelabels") or []:
            if label not in index:
                raise LabelError(f"label {label!r} is not one of the classes {list(class_names)}")
            box = clip_box(
                index[label],
                (x0 + x1) / 2 / width,
                (y0 + y1) / 2 / height,
                (x1 - x0) / width,
                (y1 - y0) / height,
            )
            if box is not None:
                boxes.append(box_dicts([box], class_names)[0])
    return boxes


def ls_results_from_boxes(
    boxes: Iterable[YoloBox], class_names: Sequence[str], width: int, height: int
) -> list[dict[str, Any]]:
    """YOLO boxes as Label Studio ``rectanglelabels`` results (percent units, no rotation)."""
    return [
        {
            "type": "rectanglelabels",
            "from_name": FROM_NAME,
            "to_name": TO_NAME,
            "original_width": width,
            "original_height": height,
            "image_rotation": 0,
            "value": {
                "x": (b.cx - b.w / 2) * 100,
                "y": (b.cy - b.h / 2) * 100,
                "width": b.w * 100,
                "height": b.h * 100,
                "rotation": 0,
                "rectanglelabels": [class_names[b.cls]],
            },
        }
        for b in boxes
    ]


# --- the dataset: splits, files, manifest ----------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """An image placed in a split, with the file names it has inside a snapshot."""

    image: LabeledImage
    split: str

    @property
    def image_file(self) -> str:
        return f"images/{self.split}/{self.image.image_hash}{self.image.suffix}"

    @property
    def label_file(self) -> str:
        return f"labels/{self.split}/{self.image.image_hash}.txt"


def assign_splits(images: Iterable[LabeledImage], policy: SplitPolicy) -> list[Entry]:
    """Every image in its split (a given one, else by hash), ordered by hash for stable output."""
    entries = [Entry(img, img.split or policy.split_of(img.image_hash)) for img in images]
    for entry in entries:
        if entry.split not in SPLITS:
            raise ValueError(f"unknown split {entry.split!r} for image {entry.image.image_hash}")
    return sorted(entries, key=lambda e: e.image.image_hash)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def build_manifest(
    entries: Sequence[Entry],
    class_names: Sequence[str],
    *,
    kind: str,
    split_method: Mapping[str, Any],
) -> dict[str, Any]:
    """Everything that defines the dataset's content, and nothing else (no times, no keys).

    Each image carries its image hash and the hash of its YOLO label file, so two manifests
    are equal exactly when the datasets would train identically.
    """
    counts = {split: sum(1 for e in entries if e.split == split) for split in SPLITS}
    return {
        "format": MANIFEST_FORMAT,
        "kind": kind,
        "class_names": list(class_names),
        "split": dict(split_method),
        "counts": counts,
        "images": [
            {
                "image_hash": e.image.image_hash,
                "split": e.split,
                "image": e.image_file,
                "label": e.label_file,
                "label_hash": sha256_text(e.image.label_text),
                "width": e.image.width,
                "height": e.image.height,
                "boxes": len(e.image.boxes),
            }
            for e in entries
        ],
    }


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def manifest_hash(manifest: Mapping[str, Any]) -> str:
    """The dataset's content hash: sha256 of the manifest's canonical JSON."""
    return sha256_text(canonical_json(manifest))


def data_yaml(class_names: Sequence[str], splits: Mapping[str, str]) -> str:
    """An ultralytics data.yaml with paths relative to the yaml's own folder.

    ``path`` is left out on purpose: ultralytics then resolves the splits against the folder
    holding the yaml, so the snapshot works wherever it is downloaded.
    """
    spec = {**splits, "names": dict(enumerate(class_names))}
    return yaml.safe_dump(spec, sort_keys=False)


# --- COCO and Label Studio JSON ---------------------------------------------------------------


def to_coco(entries: Sequence[Entry], class_names: Sequence[str]) -> dict[str, Any]:
    """COCO detection JSON; category ids are the class ids of the class map (0-based, like
    Label Studio's COCO export), boxes ``[x, y, w, h]`` in pixels, and each image says its split."""
    images, annotations = [], []
    for image_id, entry in enumerate(entries):
        img = entry.image
        images.append(
            {
                "id": image_id,
                "file_name": entry.image_file,
                "width": img.width,
                "height": img.height,
                "split": entry.split,
                "sha256": img.image_hash,
            }
        )
        for box in img.boxes:
            w, h = box.w * img.width, box.h * img.height
            annotations.append(
                {
                    "id": len(annotations),
                    "image_id": image_id,
                    "category_id": box.cls,
                    "bbox": [
                        round((box.cx - box.w / 2) * img.width, 4),
                        round((box.cy - box.h / 2) * img.height, 4),
                        round(w, 4),
                        round(h, 4),
                    ],
                    "area": round(w * h, 4),
                    "iscrowd": 0,
                }
            )
    return {
        "info": {"description": "visionloop dataset snapshot", "version": MANIFEST_FORMAT},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i, "name": name, "supercategory": "defect"} for i, name in enumerate(class_names)
        ],
    }


def to_label_studio(
    entries: Sequence[Entry], class_names: Sequence[str], image_url: Callable[[Entry], str]
) -> list[dict[str, Any]]:
    """Label Studio import JSON: one task per image with its reviewed boxes as an annotation."""
    return [
        {
            "data": {"image": image_url(entry)},
            "meta": {"image_hash": entry.image.image_hash, "split": entry.split},
            "annotations": [
                {
                    "result": ls_results_from_boxes(
                        entry.image.boxes, class_names, entry.image.width, entry.image.height
                    )
                }
            ],
        }
        for entry in entries
    ]
