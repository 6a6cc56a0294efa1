"""Ingest: new files in the object store (or a local folder) become images the loop knows.

A file is identified by its content (SHA-256): identical bytes under two names are one
image. A name ingested before is not even read again; new names are read, hashed and, when
their content is known, counted as duplicates. Each file ends as exactly one of

- ``ingested``: decoded, stored in the images bucket under its content key, image-quality
  features computed and, when a champion exists, predicted;
- ``quarantined``: not usable, its bytes kept in the quarantine bucket (``ingest/`` prefix)
  and an ``images`` row with status ``quarantined`` and the precise reason;
- ``duplicate``: its bytes are already known under another name (nothing is written).

Batches may run at the same time (the ingest flow fans them out over threads or a Dask
cluster): ``plan_batches`` keeps files that could be identical (equal sizes) in one batch,
and a batch that still meets content another writer committed since it looked (a run of
equal sizes longer than a batch, or two runs at once) turns those files into duplicates
when the database's unique content hash refuses its rows, so identical bytes stay one image.

``ingest_batch`` overlaps the work: a small thread pool reads, hashes, validates, decodes
and measures a few files ahead, and uploads the new ones, while the calling thread predicts.
On a CPU ultralytics gives inference ``cpu_count - 1`` threads (one on two cores), so the
rest of the pipeline runs beside prediction instead of adding to its time.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlparse

import numpy as np
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from labeling.selection import Candidate, uncertainty
from monitoring.features import extract_features
from serving.predictor import (
    PREDICT_CONF,
    ChampionPredictor,
    NoChampionError,
    PredictionResult,
    get_predictor,
)
from visionloop.db import session_scope
from visionloop.images import DecodedImage, ImageRejected, decode_image
from visionloop.models import Image, ImageStatus, Prediction
from visionloop.settings import Settings, get_settings
from visionloop.storage import ObjectStore, content_key, sha256_hex

log = logging.getLogger(__name__)
T = TypeVar("T")

QUARANTINE_PREFIX = "ingest/"
WORKERS = 2
"""Threads reading, decoding and uploading ahead of prediction."""
LOOKAHEAD = 16
"""Files prepared ahead of prediction at most: bounds memory whatever the batch size."""
PREDICT_CHUNK = 4
"""Images per ultralytics call: on a CPU bigger batches are no faster, only later to start."""
_QUERY_CHUNK = 500  # keys per IN (...) query, well under every database's parameter limit


@dataclass(frozen=True)
class SourceFile:
    uri: str
    """``s3://bucket/key`` or ``file:///absolute/path``: stored as the image's ``source_key``."""
    size: int


@dataclass(frozen=True)
class FileOutcome:
    uri: str
    status: str  # ingested | quarantined | duplicate
    image_id: int | None
    reason: str | None = None
    """Why it was quarantined (for a duplicate: the original's reason, if quarantined)."""


@dataclass
class BatchReport:
    files: list[FileOutcome] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    """Newly ingested images with a prediction: what selection chooses from."""
    model_version: str | None = None
    unpredicted: str | None = None
    """Why nothing was predicted (no champion yet), for the flow to say once."""
    worker: str = ""
    """Where the batch ran: ``host:pid`` of the process (``ingest_sources``)."""

    def count(self, status: str) -> int:
        return sum(1 for f in self.files if f.status == status)


# --- sources -------------------------------------------------------------------------------


def list_bucket(store: ObjectStore, bucket: str, prefix: str = "") -> list[SourceFile]:
    return [
        SourceFile(f"s3://{bucket}/{obj.key}", obj.size)
        for obj in store.list_objects(bucket, prefix)
        if not obj.key.endswith("/")  # folder markers some S3 consoles create
    ]


def list_folder(folder: Path) -> list[SourceFile]:
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    return [
        SourceFile(path.as_uri(), path.stat().st_size)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    ]


def read_source(store: ObjectStore, uri: str) -> bytes:
    scheme, _, rest = uri.partition("://")
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        return store.get_bytes(bucket, key)
    if scheme == "file":
        return Path(unquote(urlparse(uri).path)).read_bytes()
    raise ValueError(f"unsupported source {uri!r}: need s3:// or file://")


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last one shorter), pulled only as each fills."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def unseen(sources: Iterable[SourceFile], session: Session) -> list[SourceFile]:
    """The sources no image row names as its source (new since the last run)."""
    sources = list(sources)
    known: set[str] = set()
    for chunk in _chunks([s.uri for s in sources], _QUERY_CHUNK):
        known.update(session.exec(select(Image.source_key).where(col(Image.source_key).in_(chunk))))
    return [s for s in sources if s.uri not in known]


def plan_batches(sources: Sequence[SourceFile], batch_size: int) -> list[list[SourceFile]]:
    """``sources`` in ``ceil(n / batch_size)`` batches that may run concurrently.

    Identical bytes have equal sizes, so files are grouped by size (the groups in the order
    of their first file, each group in listing order: with distinct sizes, exactly the
    listing order) and every cut between batches moves to the nearest change of size that
    leaves no batch empty. Would-be duplicates then share a batch, where the first name in
    listing order is ingested and the others are its duplicates, just as when batches ran
    one after another. Only a run of equal sizes that no cut can avoid is split; the
    database's unique content hash settles that race (``ingest_batch``).
    """
    size = max(1, batch_size)
    groups: dict[int, list[SourceFile]] = {}
    for source in sources:
        groups.setdefault(source.size, []).append(source)
    ordered = [source for group in groups.values() for source in group]
    total = len(ordered)
    if not total:
        return []
    count = math.ceil(total / size)
    # Positions where the size changes: cutting there separates no equal sizes.
    changes = [i for i in range(1, total) if ordered[i - 1].size != ordered[i].size]
    cuts = [0]
    for i in range(1, count):
        low, high = cuts[-1] + 1, total - (count - i)  # every batch keeps at least one file
        target = min(max(i * size, low), high)
        at = bisect_left(changes, target)
        options = [c for c in changes[max(at - 1, 0) : at + 1] if low <= c <= high]
        cuts.append(min(options, key=lambda c: (abs(c - target), c)) if options else target)
    cuts.append(total)
    return [ordered[a:b] for a, b in zip(cuts, cuts[1:])]


# --- one file ------------------------------------------------------------------------------


@dataclass
class PreparedImage:
    """One file's bytes, read, hashed, validated, decoded and measured: what its row needs."""

    source_key: str
    data: bytes
    content_hash: str
    object_key: str
    """Where the bytes go: the images bucket, or the quarantine bucket when rejected."""
    decoded: DecodedImage | None = None
    features: dict[str, float] | None = None
    rejected: ImageRejected | None = None


def measure_image(data: bytes, source_key: str, decoded: DecodedImage) -> PreparedImage:
    """A decoded file's content key and image-quality features (``ImageRejected`` if the
    features cannot be measured). Features come from the bytes, so every way in (ingest or
    the API) measures an image the same way."""
    features = extract_features(data)
    key = content_key(data, suffix=decoded.extension)
    return PreparedImage(source_key, data, sha256_hex(data), key, decoded, features)


def prepare_image(data: bytes, source_key: str, decode_side: int | None) -> PreparedImage:
    """Validate, decode and measure one file's bytes; an unusable file is prepared for
    quarantine, with why."""
    try:
        return measure_image(data, source_key, decode_image(data, max_side=decode_side))
    except ImageRejected as exc:
        # Keyed by content alone (not the file's name), like every stored image.
        key = content_key(data, prefix=QUARANTINE_PREFIX)
        return PreparedImage(source_key, data, sha256_hex(data), key, rejected=exc)


def _prepare(store: ObjectStore, source: SourceFile, decode_side: int | None) -> PreparedImage:
    """Read and prepare one file (runs on a worker thread)."""
    return prepare_image(read_source(store, source.uri), source.uri, decode_side)


def _store(settings: Settings, store: ObjectStore, prepared: PreparedImage) -> None:
    """Upload new content; a plain put, as the database has just said the content is new
    (a leftover of a failed run under the same content key holds the same bytes anyway)."""
    if prepared.decoded is None:
        store.put_bytes(settings.bucket_quarantine, prepared.object_key, prepared.data)
    else:
        content_type = prepared.decoded.content_type
        store.put_bytes(settings.bucket_images, prepared.object_key, prepared.data, content_type)


def _prepared_in_order(
    pool: ThreadPoolExecutor,
    store: ObjectStore,
    sources: Sequence[SourceFile],
    decode_side: int | None,
) -> Iterator[PreparedImage]:
    """Prepared files in source order, at most ``LOOKAHEAD`` in flight."""
    queue: deque[Future[PreparedImage]] = deque()
    remaining = iter(sources)

    def top_up() -> None:
        while len(queue) < LOOKAHEAD:
            source = next(remaining, None)
            if source is None:
                return
            queue.append(pool.submit(_prepare, store, source, decode_side))

    top_up()
    try:
        while queue:
            prepared = queue.popleft().result()
            top_up()
            yield prepared
    finally:
        for future in queue:  # an error upstream: do not leave work running
            future.cancel()


# --- rows ----------------------------------------------------------------------------------


def prediction_row(image_id: int, result: PredictionResult, source: str = "ingest") -> Prediction:
    confs = result.confidences
    return Prediction(
        image_id=image_id,
        model_version=result.model_version,
        boxes=result.boxes,
        num_boxes=len(confs),
        mean_confidence=sum(confs) / len(confs) if confs else None,
        max_confidence=max(confs, default=None),
        min_confidence=min(confs, default=None),
        uncertainty=uncertainty(confs),
        source=source,
    )


def image_row(prepared: PreparedImage, status: ImageStatus = ImageStatus.ingested) -> Image:
    """The ``images`` row of a prepared file: ``status`` if usable, else quarantined with why."""
    common = dict(
        content_hash=prepared.content_hash,
        object_key=prepared.object_key,
        source_key=prepared.source_key,
        size_bytes=len(prepared.data),
    )
    if prepared.rejected is not None:
        return Image(
            **common,
            status=ImageStatus.quarantined,
            quarantine_reason=str(prepared.rejected),
        )
    decoded = prepared.decoded
    assert decoded is not None
    return Image(
        **common,
        width=decoded.width,
        height=decoded.height,
        format=decoded.format,
        features=prepared.features,
        status=status,
    )


def _known_hashes(session: Session, hashes: Sequence[str]) -> dict[str, Image]:
    if not hashes:
        return {}
    rows = session.exec(select(Image).where(col(Image.content_hash).in_(hashes)))
    return {row.content_hash: row for row in rows}


def _add_rows(
    session: Session, new: dict[str, Image], predictions: dict[str, PredictionResult]
) -> tuple[dict[str, Image], list[Candidate]]:
    """Add fresh copies of the ``new`` rows and their predictions to ``session`` (flushed,
    not committed); returns the added rows (ids assigned) and the candidates for selection."""
    # Fresh objects every attempt: a rolled-back flush leaves ids on the old ones.
    rows = {h: Image(**template.model_dump(exclude={"id"})) for h, template in new.items()}
    for content_hash, row in rows.items():
        if content_hash in predictions:
            row.status = ImageStatus.predicted
    session.add_all(rows.values())
    session.flush()  # assigns the ids the predictions refer to
    candidates: list[Candidate] = []
    for content_hash, row in rows.items():
        result = predictions.get(content_hash)
        if result is None:
            continue
        assert row.id is not None
        session.add(prediction_row(row.id, result))
        candidates.append(Candidate(row.id, content_hash, result.confidences))
    return rows, candidates


def _write_rows(
    session: Session,
    new: dict[str, Image],
    known: dict[str, Image],
    predictions: dict[str, PredictionResult],
) -> tuple[dict[str, Image], list[Candidate]]:
    """Insert the new rows and their predictions in one transaction and commit it; returns
    the written rows (ids assigned) and the candidates for selection.

    The commit is the batch's own: another writer (a concurrent batch, another run) may have
    committed some of the same content since ``settle`` looked, the unique content hash then
    refuses the insert and only a rollback of the whole transaction lets the batch go on.
    Those hashes move to ``known`` (their files become duplicates of the other writer's rows)
    and the rest is written again. What was uploaded meanwhile is the same bytes under the
    same content keys, so nothing is left behind.
    """
    while True:
        try:
            rows, candidates = _add_rows(session, new, predictions)
            session.commit()
            return rows, candidates
        except IntegrityError:
            session.rollback()
            raced = _known_hashes(session, list(new))
            if not raced:
                raise  # not a content race: a real error
            log.info("%d images were committed concurrently by another writer", len(raced))
            known.update(raced)
            new = {h: row for h, row in new.items() if h not in raced}


# --- a batch -------------------------------------------------------------------------------


class _Settler:
    """A batch's files sorted into new and known content, a few at a time; the new ones are
    uploaded (on the pool) and predicted (on the calling thread).

    Only rows and hashes are kept: a file's bytes and pixels are freed as soon as it is
    uploaded and predicted, so memory stays bounded by ``LOOKAHEAD``.
    """

    def __init__(
        self,
        settings: Settings,
        session: Session,
        store: ObjectStore,
        pool: ThreadPoolExecutor,
        predict: Callable[[list[np.ndarray]], list[PredictionResult]] | None,
    ) -> None:
        self._settings, self._session, self._store, self._pool = settings, session, store, pool
        self._predict = predict
        self.new: dict[str, Image] = {}  # content hash -> its new row, in order
        self.known: dict[str, Image] = {}  # content hash -> row of an earlier run
        self.order: list[tuple[str, str]] = []  # (source key, content hash) of every file
        self.predictions: dict[str, PredictionResult] = {}
        self._uploads: list[Future[None]] = []

    def settle(self, chunk: list[PreparedImage]) -> None:
        fresh = [p.content_hash for p in chunk if p.content_hash not in self.new]
        self.known.update(_known_hashes(self._session, fresh))
        to_predict = []
        for prepared in chunk:
            self.order.append((prepared.source_key, prepared.content_hash))
            if prepared.content_hash in self.known or prepared.content_hash in self.new:
                continue
            self.new[prepared.content_hash] = image_row(prepared)
            self._uploads.append(self._pool.submit(_store, self._settings, self._store, prepared))
            if prepared.decoded is not None:
                to_predict.append(prepared)
        if self._predict is not None and to_predict:
            results = self._predict([p.decoded.rgb for p in to_predict])  # type: ignore[union-attr]
            self.predictions.update((p.content_hash, r) for p, r in zip(to_predict, results))

    def wait_for_uploads(self) -> None:
        """Raise if an upload failed: rows are only written for content that is stored."""
        for upload in self._uploads:
            upload.result()


def _outcomes(
    order: Sequence[tuple[str, str]], new: dict[str, Image], known: dict[str, Image]
) -> list[FileOutcome]:
    """Each file's outcome: the first name of new content is ingested (or quarantined), the
    others are duplicates."""
    outcomes: list[FileOutcome] = []
    reported: set[str] = set()
    for uri, content_hash in order:
        if content_hash in new and content_hash not in reported:
            reported.add(content_hash)
            row = new[content_hash]
            status = "quarantined" if row.status == ImageStatus.quarantined else "ingested"
        else:  # the same bytes came earlier in this batch or in an earlier run
            row = new.get(content_hash) or known[content_hash]
            status = "duplicate"
        outcomes.append(FileOutcome(uri, status, row.id, row.quarantine_reason))
    return outcomes


def ingest_batch(
    session: Session,
    settings: Settings,
    store: ObjectStore,
    sources: Sequence[SourceFile],
    *,
    predictor: ChampionPredictor | None,
    imgsz: int | None = None,
    conf: float = PREDICT_CONF,
) -> BatchReport:
    """Ingest ``sources``, their rows written and committed in one transaction (see
    ``_write_rows``); ``predictor`` None skips prediction (no champion yet).

    ``imgsz`` is the prediction size (default: the champion's training size), JPEGs are
    decoded no larger than it needs; boxes under ``conf`` are not kept.
    """
    report = BatchReport()
    decode_side = None
    predict = None
    if predictor is not None:
        decode_side = imgsz or predictor.input_size()
        report.model_version = predictor.model_version()
        predict = partial(predictor.predict_batch, imgsz=imgsz, conf=conf)

    with ThreadPoolExecutor(WORKERS, thread_name_prefix="ingest") as pool:
        settler = _Settler(settings, session, store, pool, predict)
        prepared = _prepared_in_order(pool, store, sources, decode_side)
        for chunk in _chunks(prepared, PREDICT_CHUNK):
            settler.settle(chunk)
        settler.wait_for_uploads()

    new, report.candidates = _write_rows(session, settler.new, settler.known, settler.predictions)
    report.files = _outcomes(settler.order, new, settler.known)
    return report


def ingest_sources(
    files: Sequence[SourceFile], imgsz: int | None = None, conf: float = PREDICT_CONF
) -> BatchReport:
    """One batch as a self-contained unit of work: the ingest flow's task, on whatever
    thread, process or Dask worker runs it.

    Settings, object store and champion come from this process's environment, and the
    arguments and result are plain picklable dataclasses. It lives here rather than in
    ``flows/ingest.py`` so that a worker imports it by name wherever the project is
    installed (Prefect loads a deployment's flow file under a module name of its own).
    """
    settings = get_settings()
    predictor: ChampionPredictor | None = get_predictor(settings)
    unpredicted = None
    try:
        predictor.model_version()  # type: ignore[union-attr]
    except NoChampionError as exc:
        predictor, unpredicted = None, str(exc)
    # The batch's own session: on a Dask worker this process is the edge of the run, with
    # nothing of the flow's to share; ``ingest_batch`` commits its rows in it.
    with session_scope() as session:
        report = ingest_batch(
            session,
            settings,
            ObjectStore(settings),
            files,
            predictor=predictor,
            imgsz=imgsz,
            conf=conf,
        )
    report.unpredicted = unpredicted
    report.worker = f"{socket.gethostname()}:{os.getpid()}"
    return report
