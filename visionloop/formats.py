"""Reviewed labels as datasets: YOLO files, COCO JSON and Label Studio JSON, plus the manifest.

The boxes themselves (``YoloBox``, the reviewed-box format of ``ReviewedLabel.boxes`` and
the Label Studio rectangle conversion) live in ``visionloop.boxes``.

Splits and the manifest
-----------------------
An image's split depends only on its content hash (``split_of``), so an image never moves
between the held-out test split and training as labels come and go, and exporting the same
labels twice gives the same manifest and hash (``manifest_hash``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PureWindowsPath
from typing import Any

import yaml

from visionloop.boxes import YoloBox, format_yolo_labels, ls_results_from_boxes

MANIFEST_FORMAT = "visionloop.snapshot/1"
SPLITS = ("train", "val", "test")
DEFAULT_TEST_PERCENT = 20
"""Share of images (by hash bucket) held out for evaluation; changing it re-partitions the set."""
DEFAULT_VAL_PERCENT = 15
"""Share of images (by hash bucket) ultralytics validates on while training."""


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


class ManifestError(ValueError):
    """A manifest entry that is missing, malformed, or a path that would leave its snapshot."""


_SHA256 = re.compile(r"[0-9a-f]{64}")


def path_problem(path: object) -> str | None:
    """Why ``path`` is not a plain relative path inside a snapshot folder; None when it is.

    A manifest is read back from the object store, where anyone with write access to the
    bucket can change it, so its paths are treated as hostile before one becomes a local file.
    """
    if not isinstance(path, str) or not path:
        return "is not a non-empty string"
    if "\x00" in path:
        return "contains a NUL character"
    if "\\" in path:
        return "contains a backslash"
    if path.startswith("/"):
        return "is an absolute path"
    if PureWindowsPath(path).drive or ":" in path.split("/", 1)[0]:
        return "names a drive"
    parts = path.split("/")
    if ".." in parts:
        return "has a '..' component"
    if any(part in ("", ".") for part in parts):
        return "has an empty or '.' component"
    return None


def _check_path(where: str, field: str, path: object, folder: str) -> None:
    problem = path_problem(path)
    if problem is None and not str(path).startswith(folder):
        problem = f"is not under {folder}"
    if problem is not None:
        raise ManifestError(f"{where} {field} {path!r}: {problem}")


def _check_item(index: int, item: object) -> None:
    if not isinstance(item, dict):
        raise ManifestError(f"images[{index}]: is not an object")
    where = f"images[{index}]"
    for field in ("image_hash", "label_hash"):
        if not isinstance(item.get(field), str) or not _SHA256.fullmatch(item[field]):
            raise ManifestError(f"{where} {field} {item.get(field)!r}: is not a sha256 hex digest")
    where = f"images[{index}] ({item['image_hash'][:12]})"
    split = item.get("split")
    if split not in SPLITS:
        raise ManifestError(f"{where} split {split!r}: is not one of {', '.join(SPLITS)}")
    _check_path(where, "image", item.get("image"), f"images/{split}/")
    _check_path(where, "label", item.get("label"), f"labels/{split}/")


def check_manifest(manifest: object) -> None:
    """Raise ``ManifestError`` naming the first entry that is malformed or an unsafe path.

    Every file a manifest names must sit in its split's ``images/`` or ``labels/`` folder,
    as ``build_manifest`` writes them, so a downloaded copy cannot reach outside its folder.
    """
    if not isinstance(manifest, dict):
        raise ManifestError("the manifest is not a JSON object")
    names = manifest.get("class_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ManifestError(f"class_names {names!r}: is not a list of strings")
    items = manifest.get("images")
    if not isinstance(items, list):
        raise ManifestError(f"images {type(items).__name__}: is not a list")
    for index, item in enumerate(items):
        _check_item(index, item)


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
