"""A dataset snapshot's profile: class balance, boxes per image, box and image sizes, duplicates.

Seed 003's dataset profiling. Everything is computed from the snapshot's entries plus one
perceptual hash per image, so a profile is as reproducible as the snapshot itself.
"""

from __future__ import annotations

import io
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from statistics import mean, median
from typing import Any

import numpy as np
from PIL import Image as PILImage

from labeling.export import Entry

NEAR_DUPLICATE_BITS = 4  # dHash bits two images may differ in and still be the same picture
# COCO's object-size buckets, on the original image's pixels.
_SMALL_AREA = 32**2
_LARGE_AREA = 96**2


def dhash(data: bytes, size: int = 8) -> str:
    """64-bit difference hash: re-encodes, resizes and small edits change only a few bits."""
    with PILImage.open(io.BytesIO(data)) as img:
        grey = np.asarray(
            img.convert("L").resize((size + 1, size), PILImage.Resampling.BILINEAR), dtype=np.int16
        )
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):0{size * size // 4}x}"


def near_duplicate_groups(
    dhashes: Mapping[str, str], max_bits: int = NEAR_DUPLICATE_BITS
) -> list[list[str]]:
    """Groups of keys whose dHashes differ in at most ``max_bits`` bits.

    Pigeonhole: split the 64 bits into ``max_bits + 1`` bands; two hashes that close agree
    exactly on at least one band, so only keys sharing a band value are compared.
    """
    values = {key: int(value, 16) for key, value in dhashes.items()}
    bands = max_bits + 1
    edges = [round(i * 64 / bands) for i in range(bands + 1)]
    buckets: dict[tuple[int, int], list[str]] = defaultdict(list)
    for key, value in values.items():
        for band, (lo, hi) in enumerate(zip(edges, edges[1:])):
            buckets[(band, (value >> lo) & ((1 << (hi - lo)) - 1))].append(key)
    parent = {key: key for key in values}

    def root(key: str) -> str:
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for members in buckets.values():
        for i, a in enumerate(members):
            for b in members[i + 1 :]:
                if (values[a] ^ values[b]).bit_count() <= max_bits:
                    parent[root(a)] = root(b)
    groups: dict[str, list[str]] = defaultdict(list)
    for key in sorted(values):
        groups[root(key)].append(key)
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


def profile_entries(
    entries: Sequence[Entry],
    class_names: Sequence[str],
    image_dhashes: Mapping[str, str],
    dropped_labels: Iterable[str] = (),
) -> dict[str, Any]:
    """The profile of a snapshot; ``image_dhashes`` maps image hash to ``dhash``."""
    splits = Counter(e.split for e in entries)
    class_boxes: dict[str, Counter[str]] = {name: Counter() for name in class_names}
    class_images: Counter[str] = Counter()
    per_image: list[int] = []
    widths, heights, areas, aspect = [], [], [], []
    size_buckets: Counter[str] = Counter()
    image_sizes: Counter[str] = Counter()
    duplicate_boxes = 0
    for entry in entries:
        img = entry.image
        per_image.append(len(img.boxes))
        image_sizes[f"{img.width}x{img.height}"] += 1
        duplicate_boxes += len(img.boxes) - len(set(img.boxes))
        for name in {class_names[b.cls] for b in img.boxes}:
            class_images[name] += 1
        for box in img.boxes:
            class_boxes[class_names[box.cls]][entry.split] += 1
            widths.append(box.w)
            heights.append(box.h)
            areas.append(box.w * box.h)
            aspect.append(box.w * img.width / (box.h * img.height))
            pixels = box.w * img.width * box.h * img.height
            size_buckets[
                "small" if pixels < _SMALL_AREA else "large" if pixels >= _LARGE_AREA else "medium"
            ] += 1
    total_boxes = sum(per_image)

    # Near-duplicates: perceptual hashes a few bits apart. Ingest already drops byte-identical
    # files, so what is left is re-encodes and re-shoots; one spanning test and train is a leak.
    by_hash = {e.image.image_hash: e for e in entries}
    dup_groups = [
        [by_hash[h] for h in group]
        for group in near_duplicate_groups({h: d for h, d in image_dhashes.items() if h in by_hash})
    ]
    return {
        "images": len(entries),
        "splits": {split: splits.get(split, 0) for split in ("train", "val", "test")},
        "boxes": total_boxes,
        "background_images": sum(1 for n in per_image if n == 0),
        "class_balance": {
            name: {
                "boxes": sum(counts.values()),
                "images": class_images.get(name, 0),
                "share": round(sum(counts.values()) / total_boxes, 6) if total_boxes else 0.0,
                "by_split": {split: counts.get(split, 0) for split in ("train", "val", "test")},
            }
            for name, counts in class_boxes.items()
        },
        "boxes_per_image": {
            **(_stats([float(n) for n in per_image]) or {}),
            "histogram": {
                str(k): v for k, v in sorted(Counter(min(n, 5) for n in per_image).items())
            },
        },
        "box_sizes": {
            "width": _stats(widths),
            "height": _stats(heights),
            "area": _stats(areas),
            "aspect_ratio": _stats(aspect),
            "coco_size": {k: size_buckets.get(k, 0) for k in ("small", "medium", "large")},
        },
        "image_sizes": {
            "width": _stats([float(e.image.width) for e in entries]),
            "height": _stats([float(e.image.height) for e in entries]),
            "most_common": [{"size": s, "images": n} for s, n in image_sizes.most_common(5)],
        },
        "duplicates": {
            "near_duplicate_groups": len(dup_groups),
            "near_duplicate_images": sum(len(g) - 1 for g in dup_groups),
            "groups_across_test": sum(1 for g in dup_groups if _leaks({e.split for e in g})),
            "examples": [sorted(e.image.image_hash for e in g)[:5] for g in dup_groups[:5]],
            "duplicate_boxes": duplicate_boxes,
        },
        "dropped_boxes": dict(Counter(dropped_labels)),
    }
