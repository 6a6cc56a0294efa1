"""Synthetic reviewed labels: generated images stored like ingested ones, with exact boxes.

Lets the retraining half of the loop (export, train, evaluate, promote) run end to end
without production images or human reviewers: tests, the retrain benchmark and demos.
"""

from __future__ import annotations

from sqlmodel import Session, select

from visionloop.boxes import box_dicts
from visionloop.models import Image, ImageStatus, ReviewedLabel, Verdict
from visionloop.settings import Settings
from visionloop.storage import ObjectStore, content_key, sha256_hex
from visionloop.synthetic import SyntheticSample, encode_jpeg, generate_sample


def add_reviewed_samples(
    session: Session, settings: Settings, count: int, *, seed: int = 0, start: int = 0
) -> list[str]:
    """Store images ``start .. start + count - 1`` of stream ``seed`` as labelled; their hashes.

    Each image goes to the images bucket under its content key with an ``Image`` row and a
    ``ReviewedLabel`` carrying the generator's boxes, added to ``session``. Images already
    stored are left as they are.
    """
    store = ObjectStore(settings)
    hashes: list[str] = []
    for index in range(start, start + count):
        sample = generate_sample(
            index, seed=seed, size=settings.image_size, class_names=settings.class_names
        )
        data = encode_jpeg(sample.image)
        digest = sha256_hex(data)
        hashes.append(digest)
        key = content_key(data, ".jpg")
        store.put_if_absent(settings.bucket_images, key, data, "image/jpeg")
        if session.exec(select(Image.id).where(Image.content_hash == digest)).first() is None:
            source = f"synthetic/{seed}/{index}"
            _add_labelled_image(session, settings, sample, data, digest, key, source)
    return hashes


def _add_labelled_image(
    session: Session,
    settings: Settings,
    sample: SyntheticSample,
    data: bytes,
    digest: str,
    key: str,
    source_key: str,
) -> None:
    """The ``Image`` row of a stored sample and its ``ReviewedLabel``."""
    height, width = sample.image.shape[:2]
    image = Image(
        content_hash=digest,
        object_key=key,
        size_bytes=len(data),
        width=width,
        height=height,
        format="jpeg",
        status=ImageStatus.labeled,
        source_key=source_key,
    )
    session.add(image)
    session.flush()
    boxes = box_dicts(sample.boxes, settings.class_names)
    session.add(
        ReviewedLabel(
            image_id=image.id,
            image_path=key,
            boxes=boxes,
            verdict=Verdict.corrected,
            label=_dominant(boxes),
            reviewer="synthetic",
        )
    )


def _dominant(boxes: list[dict]) -> str | None:
    labels = [b["name"] for b in boxes]
    return max(sorted(set(labels)), key=labels.count) if labels else None
