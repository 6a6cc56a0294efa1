"""Ingest: new files in the object store (or a local folder) become images the loop knows.

A file is identified by its content (SHA-256): identical bytes under two names are one
image. A name ingested before is not even read again unless its content changed since (its
ETag, or a local file's size and modification time): new names and new versions are read,
hashed and, when their content is known, counted as duplicates; the rows of earlier versions
stay. Each file ends as exactly one of

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
and measures files ahead, and uploads the new ones, while the calling thread predicts.
On a CPU ultralytics gives inference ``cpu_count - 1`` threads (one on two cores), so the
rest of the pipeline runs beside prediction instead of adding to its time. How far ahead is
bounded by bytes, not files (``ByteBudget``): a file is decoded only while the estimated
decoded bytes in flight leave room for it.

A file that kills its batch (the process dies, or the batch times out) must not be retried
forever: every batch records an attempt per file (``ingest_attempts``) before working on it
and clears it once the file has an outcome. Files with an attempt left over are retried one
per batch, so one bad file does not take its neighbours down with it, and at
``ingest_max_attempts`` a file is quarantined as ``poison`` without being decoded again.

The batch enforces ``ingest_batch_timeout_s`` itself (``Deadline``), between files and while
waiting for one. A Prefect task timeout cannot interrupt a batch in a worker thread: it lands
only once the blocking call in hand (a decode, an upload) returns, wherever the batch then
is. A timed-out batch keeps the attempts of the files it was working on, noted "timed out
after N s".
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

import numpy as np
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from labeling.selection import Candidate, uncertainty
from monitoring.confidence_stream import watch_confidence
from monitoring.features import extract_features
from serving.embedding import to_blob
from serving.predictor import (
    PREDICT_CONF,
    ChampionPredictor,
    NoChampionError,
    PredictionResult,
    get_predictor,
)
from visionloop.db import session_scope
from visionloop.images import (
    DecodedImage,
    DecodeLimits,
    ImageRejected,
    decode_cost,
    decode_image,
)
from visionloop.models import Image, ImageStatus, IngestAttempt, Prediction, utcnow
from visionloop.registry import RegistryError
from visionloop.settings import Settings, get_settings
from visionloop.storage import ObjectStore, content_key, sha256_hex

log = logging.getLogger(__name__)
T = TypeVar("T")

QUARANTINE_PREFIX = "ingest/"
WORKERS = 2
"""Threads reading, decoding and uploading ahead of prediction."""
PREDICT_CHUNK = 4
"""Images per ultralytics call: on a CPU bigger batches are no faster, only later to start."""
_QUERY_CHUNK = 500  # keys per IN (...) query, well under every database's parameter limit


@dataclass(frozen=True)
class SourceFile:
    uri: str
    """``s3://bucket/key`` or ``file:///absolute/path``: stored as the image's ``source_key``."""
    size: int
    version: str = ""
    """What changes when the content does (S3 ETag; size and mtime of a local file)."""


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
        SourceFile(f"s3://{bucket}/{obj.key}", obj.size, obj.etag)
        for obj in store.list_objects(bucket, prefix)
        if not obj.key.endswith("/")  # folder markers some S3 consoles create
    ]


def list_folder(folder: Path) -> list[SourceFile]:
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    return [_local_file(path) for path in sorted(root.rglob("*")) if path.is_file()]


def _local_file(path: Path) -> SourceFile:
    stat = path.stat()
    return SourceFile(path.as_uri(), stat.st_size, f"{stat.st_size}:{stat.st_mtime_ns}")


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
    """The sources whose current version no image row names (new or changed since the last
    run). A row from before versions were kept counts when the size matches."""
    sources = list(sources)
    read: set[tuple[str, str]] = set()
    for chunk in _chunks([s.uri for s in sources], _QUERY_CHUNK):
        rows = session.exec(
            select(Image.source_key, Image.source_version, Image.size_bytes).where(
                col(Image.source_key).in_(chunk)
            )
        )
        for key, version, size in rows:
            read.add((key, version if version is not None else f"size:{size}"))
    return [s for s in sources if not read & {(s.uri, s.version), (s.uri, f"size:{s.size}")}]


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
    source_version: str | None = None
    weight: int = 0
    """Bytes it holds against the batch's ``ByteBudget`` until it is settled."""


def measure_image(
    data: bytes, source_key: str, decoded: DecodedImage, limits: DecodeLimits
) -> PreparedImage:
    """A decoded file's content key and image-quality features (``ImageRejected`` if the
    features cannot be measured). Features come from the bytes, so every way in (ingest or
    the API) measures an image the same way, under the same ``limits`` it was decoded with."""
    features = extract_features(data, limits=limits)
    key = content_key(data, suffix=decoded.extension)
    return PreparedImage(source_key, data, sha256_hex(data), key, decoded, features)


def quarantined(data: bytes, source_key: str, rejected: ImageRejected) -> PreparedImage:
    # Keyed by content alone (not the file's name), like every stored image.
    key = content_key(data, prefix=QUARANTINE_PREFIX)
    return PreparedImage(source_key, data, sha256_hex(data), key, rejected=rejected)


def prepare_image(
    data: bytes, source_key: str, decode_side: int | None, limits: DecodeLimits
) -> PreparedImage:
    """Validate, decode and measure one file's bytes; an unusable file is prepared for
    quarantine, with why."""
    try:
        decoded = decode_image(data, max_side=decode_side, limits=limits)
        return measure_image(data, source_key, decoded, limits)
    except ImageRejected as exc:
        return quarantined(data, source_key, exc)


class BudgetClosed(RuntimeError):
    """The batch stopped taking files (an error elsewhere): the waiting ones give up."""


class ByteBudget:
    """Estimated bytes of the files being decoded or waiting to be settled, admitted in
    source order: a file waits until its bytes fit, and a file alone always fits, however
    large.

    Admission in order keeps the files the consumer waits for (it takes them in order) from
    being starved by later ones; ``peak`` is the most bytes ever in flight.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.peak = 0
        self._next = 0
        self._closed = False
        self._changed = threading.Condition()

    def _fits(self, ticket: int, weight: int) -> bool:
        room = self.in_flight == 0 or self.in_flight + weight <= self.limit
        return ticket == self._next and room

    def acquire(self, ticket: int, weight: int) -> None:
        """Wait for the turn of the ``ticket``-th file and room for its ``weight``."""
        with self._changed:
            self._changed.wait_for(lambda: self._closed or self._fits(ticket, weight))
            if self._closed:
                raise BudgetClosed("the batch stopped before this file was decoded")
            self._next += 1
            self.in_flight += weight
            self.peak = max(self.peak, self.in_flight)
            self._changed.notify_all()

    def release(self, weight: int) -> None:
        with self._changed:
            self.in_flight -= weight
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()


class BatchTimedOut(TimeoutError):
    """The batch ran past ``ingest_batch_timeout_s``."""


@dataclass(frozen=True)
class Deadline:
    """When a batch must stop (``time.monotonic``), checked between files."""

    at: float
    timeout_s: float

    @classmethod
    def after(cls, timeout_s: float) -> Deadline:
        return cls(time.monotonic() + timeout_s, timeout_s)

    def left(self) -> float | None:
        """Seconds left (None: no deadline; waits take no infinite timeout)."""
        return None if math.isinf(self.at) else max(0.0, self.at - time.monotonic())

    def expired(self) -> BatchTimedOut:
        return BatchTimedOut(f"timed out after {self.timeout_s:g} s")

    def check(self) -> None:
        if time.monotonic() >= self.at:
            raise self.expired()

    def result(self, future: Future[T]) -> T:
        """``future``'s result, or ``BatchTimedOut`` once the deadline passes first (the
        future's own errors, a ``TimeoutError`` of a socket among them, pass unchanged)."""
        done, _ = wait([future], timeout=self.left())
        if not done:
            raise self.expired()
        return future.result()


NO_DEADLINE = Deadline(math.inf, math.inf)


@dataclass(frozen=True)
class PrepareOptions:
    decode_side: int | None
    limits: DecodeLimits
    refused: dict[str, ImageRejected] = field(default_factory=dict)
    """Files quarantined without decoding (by uri), with why."""


def _prepare(
    store: ObjectStore,
    source: SourceFile,
    ticket: int,
    options: PrepareOptions,
    budget: ByteBudget,
) -> PreparedImage:
    """Read and prepare one file (runs on a worker thread), its decode admitted by ``budget``."""
    data = read_source(store, source.uri)
    refused = options.refused.get(source.uri)
    # A file over the decode limit is refused before decoding: it holds no more than that.
    cost = 0 if refused else decode_cost(data, max_side=options.decode_side)
    weight = len(data) + min(cost, options.limits.max_bytes)
    budget.acquire(ticket, weight)
    try:
        if refused is not None:
            prepared = quarantined(data, source.uri, refused)
        else:
            prepared = prepare_image(data, source.uri, options.decode_side, options.limits)
    except BaseException:
        budget.release(weight)
        raise
    prepared.source_version = source.version
    prepared.weight = weight
    return prepared


def _store(
    store: ObjectStore, bucket: str, key: str, data: bytes, content_type: str | None
) -> None:
    """Upload new content; a plain put, as the database has just said the content is new
    (a leftover of a failed run under the same content key holds the same bytes anyway)."""
    store.put_bytes(bucket, key, data, content_type or "application/octet-stream")


def prepared_chunks(
    pool: ThreadPoolExecutor,
    store: ObjectStore,
    sources: Sequence[SourceFile],
    options: PrepareOptions,
    budget: ByteBudget,
    deadline: Deadline = NO_DEADLINE,
) -> Iterator[list[PreparedImage]]:
    """Prepared files in source order, in chunks of up to ``PREDICT_CHUNK``; the caller
    releases each file's ``weight`` from ``budget`` once it is done with it.

    A chunk is handed over early when the next file is not ready yet: that file may be
    waiting for the bytes this chunk holds. ``BatchTimedOut`` once ``deadline`` passes, even
    while a file is still being decoded.
    """
    futures = [
        pool.submit(_prepare, store, source, i, options, budget) for i, source in enumerate(sources)
    ]
    try:
        chunk: list[PreparedImage] = []
        for future in futures:
            if chunk and (len(chunk) == PREDICT_CHUNK or not future.done()):
                yield chunk
                chunk = []
            chunk.append(deadline.result(future))
            deadline.check()
        if chunk:
            yield chunk
    finally:
        budget.close()  # an error upstream: files still waiting give up
        for future in futures:
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
        below=[[cls, conf] for cls, conf in result.below],
        embedding=None if result.embedding is None else to_blob(result.embedding),
        source=source,
    )


def box_tuples(result: PredictionResult) -> list[tuple[float, ...]]:
    """The shown boxes as selection compares them: ``(cls, conf, x1, y1, x2, y2)``, normalised."""
    return [(int(b["cls"]), b["conf"], b["x1"], b["y1"], b["x2"], b["y2"]) for b in result.boxes]


def candidate(image_id: int, content_hash: str, result: PredictionResult) -> Candidate:
    """What selection knows of a predicted image: its boxes shown and almost shown, and its
    embedding."""
    return Candidate(
        image_id,
        content_hash,
        result.confidences,
        classes=[int(b["cls"]) for b in result.boxes],
        below=list(result.below),
        embedding=result.embedding,
        boxes=box_tuples(result),
    )


def image_row(prepared: PreparedImage, status: ImageStatus = ImageStatus.ingested) -> Image:
    """The ``images`` row of a prepared file: ``status`` if usable, else quarantined with why."""
    common = dict(
        content_hash=prepared.content_hash,
        object_key=prepared.object_key,
        source_key=prepared.source_key,
        source_version=prepared.source_version,
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
        candidates.append(candidate(row.id, content_hash, result))
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

    Only rows and hashes are kept: a file's pixels are freed, and its bytes given back to
    the ``budget``, once it is predicted (an upload keeps only the file's bytes).
    """

    def __init__(
        self,
        settings: Settings,
        session: Session,
        store: ObjectStore,
        pool: ThreadPoolExecutor,
        predict: Callable[[list[np.ndarray]], list[PredictionResult]] | None,
        budget: ByteBudget,
    ) -> None:
        self._settings, self._session, self._store, self._pool = settings, session, store, pool
        self._predict = predict
        self._budget = budget
        self.new: dict[str, Image] = {}  # content hash -> its new row, in order
        self.known: dict[str, Image] = {}  # content hash -> row of an earlier run
        self.order: list[tuple[str, str]] = []  # (source key, content hash) of every file
        self.predictions: dict[str, PredictionResult] = {}
        self._uploads: list[Future[None]] = []

    def settle(self, chunk: list[PreparedImage]) -> None:
        try:
            self._settle(chunk)
        finally:
            for prepared in chunk:
                self._budget.release(prepared.weight)

    def _upload(self, prepared: PreparedImage) -> None:
        if prepared.decoded is None:
            bucket, content_type = self._settings.bucket_quarantine, None
        else:
            bucket, content_type = self._settings.bucket_images, prepared.decoded.content_type
        args = (self._store, bucket, prepared.object_key, prepared.data, content_type)
        self._uploads.append(self._pool.submit(_store, *args))

    def _settle(self, chunk: list[PreparedImage]) -> None:
        fresh = [p.content_hash for p in chunk if p.content_hash not in self.new]
        self.known.update(_known_hashes(self._session, fresh))
        to_predict = []
        for prepared in chunk:
            self.order.append((prepared.source_key, prepared.content_hash))
            if prepared.content_hash in self.known or prepared.content_hash in self.new:
                continue
            self.new[prepared.content_hash] = image_row(prepared)
            self._upload(prepared)
            if prepared.decoded is not None:
                to_predict.append(prepared)
        if self._predict is not None and to_predict:
            results = self._predict([p.decoded.rgb for p in to_predict])  # type: ignore[union-attr]
            self.predictions.update((p.content_hash, r) for p, r in zip(to_predict, results))

    def wait_for_uploads(self, deadline: Deadline) -> None:
        """Raise if an upload failed: rows are only written for content that is stored."""
        for upload in self._uploads:
            deadline.result(upload)


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
    refused: dict[str, ImageRejected] | None = None,
    budget: ByteBudget | None = None,
    deadline: Deadline = NO_DEADLINE,
) -> BatchReport:
    """Ingest ``sources``, their rows written and committed in one transaction (see
    ``_write_rows``); ``predictor`` None skips prediction (no champion yet).

    ``imgsz`` is the prediction size (default: the champion's training size), JPEGs are
    decoded no larger than it needs; boxes under ``conf`` are not kept. ``refused`` files
    are quarantined with the given reason, without being decoded. ``budget`` bounds the
    decoded bytes in flight (default: ``decode_budget_bytes``). Past ``deadline`` the batch
    stops with ``BatchTimedOut`` and writes no rows.
    """
    report = BatchReport()
    decode_side = None
    predict = None
    if predictor is not None:
        decode_side = imgsz or predictor.input_size()
        report.model_version = predictor.model_version()
        predict = partial(predictor.predict_batch, imgsz=imgsz, conf=conf)

    options = PrepareOptions(decode_side, DecodeLimits.from_settings(settings), refused or {})
    budget = budget or ByteBudget(settings.decode_budget_bytes)
    pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="ingest")
    timed_out = False
    try:
        settler = _Settler(settings, session, store, pool, predict, budget)
        for chunk in prepared_chunks(pool, store, sources, options, budget, deadline):
            settler.settle(chunk)
            deadline.check()
        settler.wait_for_uploads(deadline)
    except BatchTimedOut:
        timed_out = True
        raise
    finally:
        # Past the deadline nobody waits for the file still being decoded: its thread ends
        # on its own, and its result is dropped.
        pool.shutdown(wait=not timed_out, cancel_futures=True)

    new, report.candidates = _write_rows(session, settler.new, settler.known, settler.predictions)
    report.files = _outcomes(settler.order, new, settler.known)
    watch_confidence(
        session, settings, report.model_version, [c.image_id for c in report.candidates]
    )
    return report


# --- attempts: files whose batch crashed or timed out ---------------------------------------

POISON = "poison"
CRASHED = "the process running it ended without a result"


def _attempt_rows(session: Session, sources: Sequence[SourceFile]) -> dict[str, IngestAttempt]:
    """The attempt rows of ``sources`` (for their current versions), by uri."""
    wanted = {(s.uri, s.version) for s in sources}
    rows: dict[str, IngestAttempt] = {}
    for chunk in _chunks([s.uri for s in sources], _QUERY_CHUNK):
        found = session.exec(select(IngestAttempt).where(col(IngestAttempt.source_key).in_(chunk)))
        rows.update((r.source_key, r) for r in found if (r.source_key, r.source_version) in wanted)
    return rows


def start_attempts(session: Session, sources: Sequence[SourceFile]) -> None:
    """Count one more attempt of each of ``sources`` and commit it before any work starts:
    if the process dies in the batch, the count stays."""
    rows = _attempt_rows(session, sources)
    for source in sources:
        row = rows.get(source.uri) or IngestAttempt(
            source_key=source.uri, source_version=source.version
        )
        row.attempts += 1
        row.updated_at = utcnow()
        session.add(row)
    session.commit()


def end_attempts(session: Session, sources: Sequence[SourceFile], *, counted: bool) -> None:
    """The batch of ``sources`` ended: with an outcome for each (``counted``: the attempts
    are cleared) or with an ordinary error, which is no crash (the attempt is taken back)."""
    rows = _attempt_rows(session, sources)
    for row in rows.values():
        if counted or row.attempts <= 1:
            session.delete(row)
        else:
            row.attempts -= 1
            session.add(row)
    session.commit()


def record_failure(session: Session, sources: Sequence[SourceFile], error: str) -> None:
    """Remember why the batch of ``sources`` ended without outcomes (a timeout, a lost
    worker): the quarantine reason quotes the last one."""
    for row in _attempt_rows(session, sources).values():
        row.last_error = error
        row.updated_at = utcnow()
        session.add(row)
    session.commit()


def poison_reason(row: IngestAttempt) -> ImageRejected:
    return ImageRejected(
        POISON,
        f"its ingest batch crashed or timed out {row.attempts} times; "
        f"last: {row.last_error or CRASHED}",
    )


@dataclass(frozen=True)
class BatchPlan:
    """A batch's files in the groups it ingests them in."""

    poison: dict[str, ImageRejected]
    """Files at the attempt limit: quarantined without being decoded."""
    groups: list[list[SourceFile]]
    """The rest: the files with no earlier attempt together, each suspect alone."""


def plan_attempts(session: Session, sources: Sequence[SourceFile], max_attempts: int) -> BatchPlan:
    rows = _attempt_rows(session, sources)
    poison = {uri: poison_reason(row) for uri, row in rows.items() if row.attempts >= max_attempts}
    fresh = [s for s in sources if s.uri not in rows]
    suspects = [[s] for s in sources if s.uri in rows and s.uri not in poison]
    poisoned = [s for s in sources if s.uri in poison]
    groups = ([poisoned] if poisoned else []) + ([fresh] if fresh else []) + suspects
    return BatchPlan(poison, groups)


def _merge(reports: Sequence[BatchReport]) -> BatchReport:
    merged = BatchReport()
    for report in reports:
        merged.files += report.files
        merged.candidates += report.candidates
        merged.model_version = merged.model_version or report.model_version
    return merged


# --- the batch task ----------------------------------------------------------------------


class MLflowUnavailable(RegistryError):
    """The champion could not be looked up: MLflow did not answer."""


def _champion(settings: Settings) -> tuple[ChampionPredictor | None, str | None]:
    """This process's predictor and, when there is no champion yet, why not."""
    try:
        predictor = get_predictor(settings)
        predictor.model_version()
    except NoChampionError as exc:
        return None, str(exc)
    except Exception as exc:
        if "MLflow" in str(exc):
            raise
        raise MLflowUnavailable(
            f"MLflow at {settings.mlflow_uri} is unavailable: {type(exc).__name__}: {exc}"
        ) from exc
    return predictor, None


def _ingest_group(
    settings: Settings,
    store: ObjectStore,
    group: Sequence[SourceFile],
    plan: BatchPlan,
    predict: dict[str, Any],
    deadline: Deadline,
) -> BatchReport:
    """One group of a batch, its attempts counted before and settled after, each in a session
    of its own (the one that counts must be committed whatever happens next)."""
    poisoned = all(s.uri in plan.poison for s in group)
    if not poisoned:
        with session_scope() as session:
            start_attempts(session, group)
    try:
        with session_scope() as session:
            report = ingest_batch(
                session,
                settings,
                store,
                group,
                refused=plan.poison,
                deadline=deadline,
                **predict,
            )
    except BatchTimedOut as exc:
        # A timeout counts like a crash: the attempts stay, noted with why.
        if not poisoned:
            _note_failure(group, str(exc))
        raise
    except Exception:
        # An error that reached here is no crash: the attempt does not count.
        with contextlib.suppress(Exception), session_scope() as session:
            end_attempts(session, group, counted=False)
        raise
    with session_scope() as session:
        end_attempts(session, group, counted=True)
    return report


def _note_failure(group: Sequence[SourceFile], error: str) -> None:
    try:
        with session_scope() as session:
            record_failure(session, group, error)
    except Exception as exc:  # the database away too: the attempts still count, unexplained
        log.warning("why %d files timed out was not recorded: %s", len(group), exc)


def ingest_sources(
    files: Sequence[SourceFile], imgsz: int | None = None, conf: float = PREDICT_CONF
) -> BatchReport:
    """One batch as a self-contained unit of work: the ingest flow's task, on whatever
    thread, process or Dask worker runs it.

    Settings, object store and champion come from this process's environment, and the
    arguments and result are plain picklable dataclasses. It lives here rather than in
    ``flows/ingest.py`` so that a worker imports it by name wherever the project is
    installed (Prefect loads a deployment's flow file under a module name of its own).

    ``BatchTimedOut`` once the work on its files takes longer than ``ingest_batch_timeout_s``
    (finding the champion is not counted: loading it has its own timeouts).
    """
    settings = get_settings()
    # The batch's own sessions: on a Dask worker this process is the edge of the run, with
    # nothing of the flow's to share; ``ingest_batch`` commits its rows in them.
    with session_scope() as session:
        plan = plan_attempts(session, files, settings.ingest_max_attempts)
    predictor, unpredicted = _champion(settings)
    predict = {"predictor": predictor, "imgsz": imgsz, "conf": conf}
    store = ObjectStore(settings)
    deadline = Deadline.after(settings.ingest_batch_timeout_s)
    reports: list[BatchReport] = []
    for group in plan.groups:
        if reports:
            # Between groups: a group past the deadline is not started, so not counted.
            deadline.check()
        reports.append(_ingest_group(settings, store, group, plan, predict, deadline))
    report = _merge(reports)
    report.unpredicted = unpredicted
    report.worker = f"{socket.gethostname()}:{os.getpid()}"
    return report
