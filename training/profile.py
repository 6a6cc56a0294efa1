"""A dataset snapshot's profile: class balance, boxes per image, box and image sizes, duplicates.

Seed 003's dataset profiling. Everything is computed from the snapshot's entries plus one
fingerprint per image, so a profile is as reproducible as the snapshot itself.
"""

from __future__ import annotations

import io
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from statistics import mean, median
from typing import Any

import cv2
import numpy as np
from PIL import Image as PILImage

from visionloop.formats import Entry

NEAR_DUPLICATE_CORRELATION = 0.85
"""Fingerprint correlation from which two images count as the same picture. Measured on the
synthetic inspection images: distinct scenes stay below 0.55; the same scene re-encoded at
JPEG quality 85, resized 0.8-2x or brightened by 10% stays above 0.89."""
_FINGERPRINT_PX = 32
_CHUNK = 512  # fingerprint rows compared at once: bounds memory for large snapshots
# COCO's object-size buckets, on the original image's pixels.
_SMALL_AREA = 32**2
_LARGE_AREA = 96**2


def fingerprint(data: bytes) -> np.ndarray:
    """An image's fine structure: a 32x32 grey thumbnail minus its blur, at unit length.

    Removing the blur removes illumination (gradients, exposure), which dominates
    low-contrast inspection images and makes average or difference hashes of different
    scenes collide; texture and defects are left, and survive re-encoding and resizing.
    """
    with PILImage.open(io.BytesIO(data)) as img:
        grey = img.convert("L").resize((_FINGERPRINT_PX, _FINGERPRINT_PX), PILImage.Resampling.BOX)
        thumb = np.asarray(grey, dtype=np.float32)
    detail = (thumb - cv2.GaussianBlur(thumb, (0, 0), 2.0)).ravel()
    detail -= detail.mean()
    norm = float(np.linalg.norm(detail))
    return detail / norm if norm > 0 else detail  # a flat image matches nothing


def near_duplicate_groups(
    fingerprints: Mapping[str, np.ndarray], threshold: float = NEAR_DUPLICATE_CORRELATION
) -> list[list[str]]:
    """Groups of keys whose fingerprints correlate at ``threshold`` or more (transitively)."""
    keys = sorted(fingerprints)
    if len(keys) < 2:
        return []
    matrix = np.stack([fingerprints[k] for k in keys])
    parent = list(range(len(keys)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, len(keys), _CHUNK):
        scores = matrix[start : start + _CHUNK] @ matrix.T
        for i, j in zip(*np.nonzero(scores >= threshold)):
            if start + i < j:
                parent[root(start + int(i))] = root(int(j))
    groups: dict[int, list[str]] = defaultdict(list)
    for i, key in enumerate(keys):
        groups[root(i)].append(key)
    return [g for g in groups.values() if len(g) > 1]


def _stats(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "min": round(ordered[0], 6),
        "p10": round(pick(0.1), 6),
        "median": round(median(ordered), 6),
        "mean": round(mean(ordered), 6),
        "p90": round(pick(0.9), 6),
        "max": round(ordered[-1], 6),
    }


def _leaks(splits: set[str]) -> bool:
    """A near-duplicate group with a held-out image and a training one."""
    return "test" in splits and len(splits) > 1


_SPLITS = ("train", "val", "test")


def profile_entries(
    entries: Sequence[Entry],
    class_names: Sequence[str],
    fingerprints: Mapping[str, np.ndarray],
    dropped_labels: Iterable[str] = (),
) -> dict[str, Any]:
    """The profile of a snapshot; ``fingerprints`` maps image hash to ``fingerprint``."""
    splits = Counter(e.split for e in entries)
    per_image = [len(e.image.boxes) for e in entries]
    return {
        "images": len(entries),
        "splits": {split: splits.get(split, 0) for split in _SPLITS},
        "boxes": sum(per_image),
        "background_images": sum(1 for n in per_image if n == 0),
        "class_balance": _class_balance(entries, class_names),
        "boxes_per_image": {
            **(_stats([float(n) for n in per_image]) or {}),
            "histogram": {
                str(k): v for k, v in sorted(Counter(min(n, 5) for n in per_image).items())
            },
        },
        "box_sizes": _box_sizes(entries),
        "image_sizes": _image_sizes(entries),
        "duplicates": _duplicates(entries, fingerprints),
        "dropped_boxes": dict(Counter(dropped_labels)),
    }


def _class_balance(entries: Sequence[Entry], class_names: Sequence[str]) -> dict[str, Any]:
    """Per class: its boxes (in all and per split), the images showing it, its share of boxes."""
    class_boxes: dict[str, Counter[str]] = {name: Counter() for name in class_names}
    class_images: Counter[str] = Counter()
    for entry in entries:
        boxes = entry.image.boxes
        for name in {class_names[b.cls] for b in boxes}:
            class_images[name] += 1
        for box in boxes:
            class_boxes[class_names[box.cls]][entry.split] += 1
    total_boxes = sum(sum(counts.values()) for counts in class_boxes.values())
    return {
        name: {
            "boxes": sum(counts.values()),
            "images": class_images.get(name, 0),
            "share": round(sum(counts.values()) / total_boxes, 6) if total_boxes else 0.0,
            "by_split": {split: counts.get(split, 0) for split in _SPLITS},
        }
        for name, counts in class_boxes.items()
    }


def _size_bucket(pixels: float) -> str:
    return "small" if pixels < _SMALL_AREA else "large" if pixels >= _LARGE_AREA else "medium"


def _box_sizes(entries: Sequence[Entry]) -> dict[str, Any]:
    """Box width, height and area (fractions of the image), aspect ratio (in pixels) and COCO
    size bucket (on the original image's pixels)."""
    widths, heights, areas, aspect = [], [], [], []
    size_buckets: Counter[str] = Counter()
    for entry in entries:
        img = entry.image
        for box in img.boxes:
            widths.append(box.w)
            heights.append(box.h)
            areas.append(box.w * box.h)
            aspect.append(box.w * img.width / (box.h * img.height))
            size_buckets[_size_bucket(box.w * img.width * box.h * img.height)] += 1
    return {
        "width": _stats(widths),
        "height": _stats(heights),
        "area": _stats(areas),
        "aspect_ratio": _stats(aspect),
        "coco_size": {k: size_buckets.get(k, 0) for k in ("small", "medium", "large")},
    }


def _image_sizes(entries: Sequence[Entry]) -> dict[str, Any]:
    image_sizes = Counter(f"{e.image.width}x{e.image.height}" for e in entries)
    return {
        "width": _stats([float(e.image.width) for e in entries]),
        "height": _stats([float(e.image.height) for e in entries]),
        "most_common": [{"size": s, "images": n} for s, n in image_sizes.most_common(5)],
    }


def _duplicates(entries: Sequence[Entry], fingerprints: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Near-duplicate images and boxes repeated within one image.

    Ingest already drops byte-identical files, so what is left is re-encodes and re-shoots of
    one scene; a group spanning test and train leaks the held-out set.
    """
    by_hash = {e.image.image_hash: e for e in entries}
    dup_groups = [
        [by_hash[h] for h in group]
        for group in near_duplicate_groups({h: f for h, f in fingerprints.items() if h in by_hash})
    ]
    return {
        "near_duplicate_groups": len(dup_groups),
        "near_duplicate_images": sum(len(g) - 1 for g in dup_groups),
        "groups_across_test": sum(1 for g in dup_groups if _leaks({e.split for e in g})),
        "examples": [sorted(e.image.image_hash for e in g)[:5] for g in dup_groups[:5]],
        "duplicate_boxes": sum(len(e.image.boxes) - len(set(e.image.boxes)) for e in entries),
    }
