"""What one selection cycle knows besides its candidates (``labeling.selection.SelectionContext``),
gathered with the champion that predicted them.

- class weights from the champion's last per-class evaluation (``labeling.reference``);
- reference embeddings of its training images, embedded by the champion itself the first time
  a cycle needs them (then read from the object store);
- the flip pass: a shortlist's images read back from the images bucket and predicted mirrored,
  each image's boxes compared with the ones it was selected on.

Everything is tied to the model version that predicted the candidates: embeddings and boxes of
another version are not comparable, so when the champion moved since, the cycle goes without
reference and flip pass rather than mix versions. A service that is away (MLflow, the object
store) costs the cycle the piece it serves, never the queueing itself. The champion's lock is
held one predict call at a time, so requests served by the same predictor interleave with this
work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import TypeVar

import numpy as np
from sqlmodel import Session, col, select

from ingestion.pipeline import box_tuples
from labeling.reference import Embed, champion_class_weights, reference_embeddings
from labeling.scoring import flip_disagreement
from labeling.selection import Candidate, SelectionContext
from serving.predictor import PREDICT_CONF, ChampionPredictor
from visionloop.images import DecodeLimits, ImageRejected, decode_image
from visionloop.models import Image
from visionloop.registry import CHAMPION, get_alias
from visionloop.settings import Settings
from visionloop.storage import ObjectStore, StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")

EMBED_CHUNK = 4
"""Training images per predict call (as ingest: on a CPU bigger batches are no faster)."""
FLIP_CHUNK = 16
"""Shortlisted images per mirrored predict call: one lock hold stays short, memory small."""

OpenSession = Callable[[], AbstractContextManager[Session]]


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _decode(settings: Settings, data: bytes, side: int) -> np.ndarray:
    return decode_image(data, max_side=side, limits=DecodeLimits.from_settings(settings)).rgb


def embedder(
    settings: Settings, predictor: ChampionPredictor, version: str, imgsz: int | None = None
) -> Embed:
    """Encoded images -> their embeddings by ``version``, decoded and predicted as ingest does;
    None once the predictor answers with another version (or keeps no embeddings)."""

    def embed(images: Sequence[bytes]) -> np.ndarray | None:
        side = imgsz or predictor.input_size()
        rows: list[np.ndarray] = []
        for chunk in _chunks(images, EMBED_CHUNK):
            results = predictor.predict_batch(
                [_decode(settings, d, side) for d in chunk], imgsz=imgsz
            )
            if any(r.model_version != version or r.embedding is None for r in results):
                return None
            rows += [r.embedding for r in results if r.embedding is not None]
        return np.stack(rows) if rows else None

    return embed


def object_keys(session: Session, image_ids: Sequence[int]) -> dict[int, str]:
    rows = session.exec(select(Image.id, Image.object_key).where(col(Image.id).in_(image_ids)))
    return {image_id: key for image_id, key in rows if image_id is not None}


def flip_pass(
    settings: Settings,
    store: ObjectStore,
    predictor: ChampionPredictor,
    version: str,
    open_session: OpenSession,
    *,
    imgsz: int | None = None,
    conf: float = PREDICT_CONF,
) -> Callable[[Sequence[Candidate]], Mapping[int, float]]:
    """The flip signal of ``SelectionContext``: a shortlist -> image id -> disagreement between
    its boxes and those found on its mirror image (``labeling.scoring.flip_disagreement``).

    An image that cannot be read back (gone from the bucket) or that another version would
    predict gets no score: selection treats it as unknown, not as agreeing.
    """

    def flip(shortlist: Sequence[Candidate]) -> Mapping[int, float]:
        if not shortlist:
            return {}
        with open_session() as session:
            keys = object_keys(session, [c.image_id for c in shortlist])
        side = imgsz or predictor.input_size()

        def load(chunk: Sequence[Candidate]) -> tuple[list[Candidate], list[np.ndarray]]:
            """The chunk's candidates that could be read back, and their images."""
            readable, images = [], []
            for candidate in chunk:
                try:
                    data = store.get_bytes(settings.bucket_images, keys[candidate.image_id])
                    images.append(_decode(settings, data, side))
                except (KeyError, StorageError, ImageRejected) as exc:
                    log.warning("image %d has no flip score: %s", candidate.image_id, exc)
                    continue
                readable.append(candidate)
            return readable, images

        scores: dict[int, float] = {}
        chunks = list(_chunks(shortlist, FLIP_CHUNK))
        with ThreadPoolExecutor(1, thread_name_prefix="flip-read") as reader:
            # The next chunk is read back and decoded while this one is predicted.
            loading = reader.submit(load, chunks[0])
            for index in range(len(chunks)):
                readable, images = loading.result()
                if index + 1 < len(chunks):
                    loading = reader.submit(load, chunks[index + 1])
                if not images:
                    continue
                try:
                    results = predictor.predict_batch(images, imgsz=imgsz, conf=conf, flip=True)
                except Exception as exc:  # the champion unavailable: the rest stays unscored
                    log.warning("flip pass stopped after %d images: %r", len(scores), exc)
                    break
                for candidate, result in zip(readable, results):
                    if result.model_version == version:
                        scores[candidate.image_id] = flip_disagreement(
                            candidate.boxes, box_tuples(result)
                        )
        return scores

    return flip


def _reference(
    session: Session,
    settings: Settings,
    store: ObjectStore,
    predictor: ChampionPredictor,
    version: str,
    imgsz: int | None,
) -> np.ndarray | None:
    """The champion's reference embeddings; None (and why, logged) without them."""
    try:
        ref = get_alias(settings, CHAMPION)
        if ref is None or ref.version != version:
            log.info("no reference embeddings: the champion is no longer version %s", version)
            return None
        embed = embedder(settings, predictor, version, imgsz)
        reference = reference_embeddings(session, settings, ref, embed, store)
    except Exception as exc:  # a service away: this cycle selects without novelty
        log.warning(
            "no reference embeddings for version %s: %s: %s", version, type(exc).__name__, exc
        )
        return None
    if reference is None:
        log.info("no reference embeddings: version %s has no known training set", version)
    return reference


def selection_context(
    session: Session,
    settings: Settings,
    store: ObjectStore,
    predictor: ChampionPredictor | None,
    version: str | None,
    cycle: str,
    open_session: OpenSession,
    *,
    imgsz: int | None = None,
    conf: float = PREDICT_CONF,
) -> SelectionContext:
    """The context of one cycle whose candidates ``version`` predicted (None: nothing was
    predicted, so nothing is known beyond the cycle)."""
    if predictor is None or version is None:
        return SelectionContext(cycle=cycle)
    weights = champion_class_weights(session, settings, version)
    try:
        current = predictor.model_version()
    except Exception as exc:  # no model in this process and MLflow away: queueing goes on
        log.warning("no reference or flip pass: the champion is unavailable: %r", exc)
        return SelectionContext(class_weights=weights, cycle=cycle)
    if current != version:
        log.info("no reference or flip pass: the champion is no longer version %s", version)
        return SelectionContext(class_weights=weights, cycle=cycle)
    return SelectionContext(
        class_weights=weights,
        reference=_reference(session, settings, store, predictor, version, imgsz),
        flip=flip_pass(settings, store, predictor, version, open_session, imgsz=imgsz, conf=conf),
        cycle=cycle,
    )
