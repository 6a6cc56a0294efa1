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
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

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


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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
class _Prepared:
    source: SourceFile
    data: bytes
    content_hash: str
    object_key: str
    """Where the bytes go: the images bucket, or the quarantine bucket when rejected."""
    decoded: DecodedImage | None = None
    features: dict[str, float] | None = None
    rejected: ImageRejected | None = None


def _prepare(store: ObjectStore, source: SourceFile, decode_side: int | None) -> _Prepared:
    """Read, hash, validate, decode and measure one file (runs on a worker thread)."""
    data = read_source(store, source.uri)
    digest = sha256_hex(data)
    try:
        decoded = decode_image(data, max_side=decode_side)
        features = extract_features(data)
    except ImageRejected as exc:
        # Keyed by content alone (not the file's name), like every stored image.
        key = content_key(data, prefix=QUARANTINE_PREFIX)
        return _Prepared(source, data, digest, key, rejected=exc)
    key = content_key(data, suffix=decoded.extension)
    return _Prepared(source, data, digest, key, decoded, features)


def _store(settings: Settings, store: ObjectStore, prepared: _Prepared) -> None:
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
) -> Iterator[_Prepared]:
    """Prepared files in source order, at most ``LOOKAHEAD`` in flight."""
    queue: deque[Future[_Prepared]] = deque()
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


def _image_row(prepared: _Prepared) -> Image:
    common = dict(
        content_hash=prepared.content_hash,
        object_key=prepared.object_key,
        source_key=prepared.source.uri,
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
        status=ImageStatus.ingested,
    )


def _known_hashes(session: Session, hashes: Sequence[str]) -> dict[str, Image]:
    if not hashes:
        return {}
    rows = session.exec(select(Image).where(col(Image.content_hash).in_(hashes)))
    return {row.content_hash: row for row in rows}


def _write_rows(
    new: dict[str, Image], known: dict[str, Image], predictions: dict[str, PredictionResult]
) -> tuple[dict[str, Image], list[Candidate]]:
    """Insert the new rows and their predictions in one transaction; returns the written
    rows (ids assigned) and the candidates for selection.

    Another writer (a concurrent batch, another run) may have committed some of the same
    content since ``settle`` looked: the unique content hash then refuses the insert, the
    transaction rolls back, those hashes move to ``known`` (their files become duplicates of
    the other writer's rows) and the rest is written again. What was uploaded meanwhile is
    the same bytes under the same content keys, so nothing is left behind.
    """
    while True:
        # Fresh objects every attempt: a rolled-back flush leaves ids on the old ones.
        rows = {h: Image(**template.model_dump(exclude={"id"})) for h, template in new.items()}
        candidates: list[Candidate] = []
        try:
            with session_scope() as session:
                for content_hash, row in rows.items():
                    if content_hash in predictions:
                        row.status = ImageStatus.predicted
                session.add_all(rows.values())
                session.flush()  # assigns the ids the predictions refer to
                for content_hash, row in rows.items():
                    result = predictions.get(content_hash)
                    if result is None:
                        continue
                    session.add(prediction_row(row.id, result))  # type: ignore[arg-type]
                    candidates.append(Candidate(row.id, content_hash, result.confidences))  # type: ignore[arg-type]
            return rows, candidates
        except IntegrityError:
            with session_scope() as session:
                raced = _known_hashes(session, list(new))
            if not raced:
                raise  # not a content race: a real error
            log.info("%d images were committed concurrently by another writer", len(raced))
            known.update(raced)
            new = {h: row for h, row in new.items() if h not in raced}


# --- a batch -------------------------------------------------------------------------------


def ingest_batch(
    settings: Settings,
    store: ObjectStore,
    sources: Sequence[SourceFile],
    *,
    predictor: ChampionPredictor | None,
    imgsz: int | None = None,
    conf: float = PREDICT_CONF,
) -> BatchReport:
    """Ingest ``sources``, their rows written in one transaction; ``predictor`` None skips
    prediction (no champion yet).

    ``imgsz`` is the prediction size (default: the champion's training size), JPEGs are
    decoded no larger than it needs; boxes under ``conf`` are not kept.
    """
    report = BatchReport()
    decode_side = None
    if predictor is not None:
        decode_side = imgsz or predictor.input_size()
        report.model_version = predictor.model_version()

    # Only rows and hashes outlive ``settle``: a file's bytes and pixels are freed as soon as
    # it is uploaded and predicted, so memory stays bounded by ``LOOKAHEAD``.
    new: dict[str, Image] = {}  # content hash -> its new row, in order
    known: dict[str, Image] = {}  # content hash -> row of an earlier run
    order: list[tuple[str, str]] = []  # (source uri, content hash) of every file
    predictions: dict[str, PredictionResult] = {}
    uploads: list[Future[None]] = []

    with ThreadPoolExecutor(WORKERS, thread_name_prefix="ingest") as pool:

        def settle(chunk: list[_Prepared]) -> None:
            """Sort a few prepared files into new and known; store and predict the new ones."""
            fresh = [p.content_hash for p in chunk if p.content_hash not in new]
            with session_scope() as session:
                known.update(_known_hashes(session, fresh))
            to_predict = []
            for prepared in chunk:
                order.append((prepared.source.uri, prepared.content_hash))
                if prepared.content_hash in known or prepared.content_hash in new:
                    continue
                new[prepared.content_hash] = _image_row(prepared)
                uploads.append(pool.submit(_store, settings, store, prepared))
                if prepared.decoded is not None:
                    to_predict.append(prepared)
            if predictor is not None and to_predict:
                images = [p.decoded.rgb for p in to_predict]  # type: ignore[union-attr]
                results = predictor.predict_batch(images, imgsz=imgsz, conf=conf)
                predictions.update((p.content_hash, r) for p, r in zip(to_predict, results))

        chunk: list[_Prepared] = []
        for prepared in _prepared_in_order(pool, store, sources, decode_side):
            chunk.append(prepared)
            if len(chunk) == PREDICT_CHUNK:
                settle(chunk)
                chunk = []
        if chunk:
            settle(chunk)
        for upload in uploads:  # rows only for content that is stored
            upload.result()

    new, report.candidates = _write_rows(new, known, predictions)

    reported: set[str] = set()
    for uri, content_hash in order:
        if content_hash in new and content_hash not in reported:
            reported.add(content_hash)
            row = new[content_hash]
            status = "quarantined" if row.status == ImageStatus.quarantined else "ingested"
        else:  # the same bytes came earlier in this batch or in an earlier run
            row = new.get(content_hash) or known[content_hash]
            status = "duplicate"
        report.files.append(FileOutcome(uri, status, row.id, row.quarantine_reason))
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
    report = ingest_batch(
        settings, ObjectStore(settings), files, predictor=predictor, imgsz=imgsz, conf=conf
    )
    report.unpredicted = unpredicted
    report.worker = f"{socket.gethostname()}:{os.getpid()}"
    return report
