"""A synthetic production line: rounds of camera images dropped into the incoming bucket.

Stands in for a real camera feed in the demo and the end-to-end test. Each round uploads
generated images (and, now and then, a broken file, as real feeds have) under its own prefix;
from ``shift_round`` on, every image carries an acquisition drift (the line's lighting
changed). The generator's boxes for every uploaded image are kept by content hash, so the
simulated reviewer can answer the review queue with the ground truth.

The stream continues where the previous run on the same data dir stopped (``next_index`` in
its state file), so running the demo again brings new images rather than duplicates.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from visionloop.boxes import YoloBox
from visionloop.settings import Settings
from visionloop.storage import ObjectStore, sha256_hex
from visionloop.synthetic import DriftParams, encode_jpeg, generate_sample

STREAM_SEED_OFFSET = 1_000
"""The stream draws from ``settings.seed + STREAM_SEED_OFFSET``: never the bootstrap's images."""
LIGHTING_CHANGE = DriftParams(brightness=-0.25, color_cast=(1.15, 1.0, 0.75))
"""The default shift: the line's lamps replaced by dimmer, warmer ones (halves the bootstrap
champion's mAP50 on the synthetic scenes)."""


@dataclass(frozen=True)
class StreamPlan:
    rounds: int = 5
    images_per_round: int = 40
    shift_round: int = 2
    """First round (0-based) whose images carry ``drift``."""
    drift: DriftParams = LIGHTING_CHANGE
    broken_every: int = 2
    """Every ``broken_every``-th round also uploads two broken files (0: never)."""

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.images_per_round < 1:
            raise ValueError(
                f"rounds and images_per_round must be >= 1, got {self.rounds} and "
                f"{self.images_per_round}"
            )
        if not 0 <= self.shift_round <= self.rounds:
            raise ValueError(f"shift_round must be in 0..{self.rounds}, got {self.shift_round}")

    def drifted(self, round_index: int) -> bool:
        return round_index >= self.shift_round


@dataclass
class RoundUpload:
    round_index: int
    prefix: str
    drifted: bool
    image_keys: list[str] = field(default_factory=list)
    broken_keys: list[str] = field(default_factory=list)


class GroundTruth:
    """The generator's boxes of every streamed image, by content hash, kept in a JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        state = json.loads(path.read_text()) if path.exists() else {}
        self.next_index: int = state.get("next_index", 0)
        self.boxes: dict[str, list[list[float]]] = state.get("boxes", {})

    def add(self, content_hash: str, boxes: Sequence[YoloBox]) -> None:
        self.boxes[content_hash] = [list(box) for box in boxes]

    def get(self, content_hash: str) -> list[YoloBox] | None:
        boxes = self.boxes.get(content_hash)
        return None if boxes is None else [YoloBox(int(b[0]), *map(float, b[1:])) for b in boxes]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"next_index": self.next_index, "boxes": self.boxes}))
        tmp.replace(self.path)


def ground_truth(settings: Settings) -> GroundTruth:
    return GroundTruth(settings.data_dir / "demo" / "ground_truth.json")


def broken_files(round_index: int) -> dict[str, bytes]:
    """Files a real feed delivers now and then: a cut-off upload and a web page saved as .jpg."""
    sample = encode_jpeg(generate_sample(round_index, seed=STREAM_SEED_OFFSET - 1).image)
    return {
        f"truncated-{round_index:02d}.jpg": sample[: len(sample) // 3],
        # A real error page carries its request's id: two rounds' pages are different files,
        # not one file delivered twice (which ingest would rightly count as a duplicate).
        f"error-page-{round_index:02d}.jpg": (
            f"<!DOCTYPE html><html><body>502 Bad Gateway (request {round_index})</body></html>"
        ).encode(),
    }


def upload_round(
    settings: Settings,
    plan: StreamPlan,
    round_index: int,
    truth: GroundTruth,
    *,
    run_tag: str,
    store: ObjectStore | None = None,
    progress: Callable[[int], None] | None = None,
) -> RoundUpload:
    """Generate and upload round ``round_index``'s images; record their ground truth."""
    store = store or ObjectStore(settings)
    drifted = plan.drifted(round_index)
    upload = RoundUpload(round_index, f"demo/{run_tag}/round-{round_index:02d}/", drifted)
    seed = settings.seed + STREAM_SEED_OFFSET
    for n in range(plan.images_per_round):
        index = truth.next_index
        sample = generate_sample(
            index,
            seed=seed,
            size=settings.image_size,
            class_names=settings.class_names,
            drift=plan.drift if drifted else None,
        )
        data = encode_jpeg(sample.image)
        key = f"{upload.prefix}cam-{index:06d}.jpg"
        store.put_bytes(settings.bucket_incoming, key, data, "image/jpeg")
        truth.add(sha256_hex(data), sample.boxes)
        truth.next_index = index + 1
        upload.image_keys.append(key)
        if progress is not None:
            progress(n + 1)
    if plan.broken_every and round_index % plan.broken_every == plan.broken_every - 1:
        for name, data in broken_files(round_index).items():
            key = f"{upload.prefix}{name}"
            store.put_bytes(settings.bucket_incoming, key, data, "image/jpeg")
            upload.broken_keys.append(key)
    truth.save()
    return upload
