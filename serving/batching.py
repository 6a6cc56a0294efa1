"""Dynamic batching in front of ``ChampionPredictor.predict_batch``, as inference servers do it.

A model on a CPU predicts a batch of 8 images in far less than 8 times one image, but an API
request brings one image. Concurrent callers therefore ``submit`` their image to a
``MicroBatcher`` and get a ``Future``; one worker thread gathers what arrives within
``max_wait_ms`` of the first request (or until ``max_batch``) and runs a single
``predict_batch``. Only requests with the same options (``imgsz``, ``conf``, ``flip``) share a
batch, since those are arguments of the whole batch. Each caller gets the result at its own
index; an exception fails exactly the requests of the batch that raised it.

The queue is bounded: a request that finds it full is refused at once (``BatcherOverloaded``)
instead of waiting behind minutes of work, so an overloaded server answers quickly and the
client can retry or go elsewhere.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from serving.predictor import PREDICT_CONF, PredictionResult

log = logging.getLogger(__name__)

SERVICE = "the prediction batcher"
"""How errors name this service (for the 503 a caller reads)."""


class BatchPredictor(Protocol):
    """What the batcher needs of a predictor: ``ChampionPredictor`` is one."""

    def predict_batch(
        self,
        images: Sequence[np.ndarray],
        *,
        imgsz: int | None = None,
        conf: float = PREDICT_CONF,
        flip: bool = False,
    ) -> list[PredictionResult]: ...


class BatcherUnavailable(RuntimeError):
    """The batcher cannot take the request now; the message says why and what to change."""


class BatcherOverloaded(BatcherUnavailable):
    """Every queue slot is taken: the server is behind, so the request is refused at once."""


class BatcherClosed(BatcherUnavailable):
    """The batcher was shut down (the API process is stopping)."""


@dataclass(frozen=True)
class PredictOptions:
    """Arguments of ``predict_batch`` that apply to a whole batch: only equal ones share one."""

    imgsz: int | None = None
    conf: float = PREDICT_CONF
    flip: bool = False


@dataclass(frozen=True)
class _Request:
    image: np.ndarray
    options: PredictOptions
    future: Future[PredictionResult]


@dataclass(frozen=True)
class BatchStats:
    batches: int
    images: int
    largest: int
    failed_batches: int

    @property
    def mean_size(self) -> float:
        return self.images / self.batches if self.batches else 0.0


_STOP = object()
"""Put on the queue by ``close`` so a worker blocked on ``get`` wakes up and ends."""


class MicroBatcher:
    """Gathers concurrent single-image requests into batches for one predictor; thread-safe."""

    def __init__(
        self,
        predictor: BatchPredictor,
        *,
        max_batch: int = 16,
        max_wait_ms: float = 5.0,
        max_queue: int = 64,
        name: str = "predict-batcher",
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("need max_batch >= 1, max_queue >= 1 and max_wait_ms >= 0")
        self.predictor = predictor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self._queue: queue.Queue[_Request | object] = queue.Queue(maxsize=max_queue)
        # Requests taken off the queue that did not fit the batch being gathered (other
        # options, or over max_batch): they start the next batches, in arrival order.
        self._held: deque[_Request] = deque()
        self._closed = threading.Event()
        self._submit_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._batches = self._images = self._largest = self._failed = 0
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()

    # --- callers ------------------------------------------------------------------------------

    def submit(
        self,
        image: np.ndarray,
        *,
        imgsz: int | None = None,
        conf: float = PREDICT_CONF,
        flip: bool = False,
    ) -> Future[PredictionResult]:
        """Queue one upright RGB image; the future holds its ``PredictionResult``."""
        request = _Request(image, PredictOptions(imgsz, conf, flip), Future())
        # Under the lock that ``close`` sets the flag with: a request is either queued before
        # the worker's final drain or refused, never left behind in a queue nobody reads.
        with self._submit_lock:
            if self._closed.is_set():
                raise BatcherClosed(f"{SERVICE} is shut down: the API process is stopping")
            try:
                self._queue.put_nowait(request)
            except queue.Full:
                raise BatcherOverloaded(
                    f"{SERVICE} is overloaded: {self.max_queue} predictions are already "
                    "waiting (VISIONLOOP_BATCH_QUEUE); try again shortly"
                ) from None
        return request.future

    def predict(
        self,
        image: np.ndarray,
        *,
        imgsz: int | None = None,
        conf: float = PREDICT_CONF,
        flip: bool = False,
    ) -> PredictionResult:
        """``submit`` and wait for the result (or the batch's exception)."""
        return self.submit(image, imgsz=imgsz, conf=conf, flip=flip).result()

    def stats(self) -> BatchStats:
        with self._stats_lock:
            return BatchStats(self._batches, self._images, self._largest, self._failed)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop taking requests, finish the batch in flight, fail what still waits."""
        with self._submit_lock:
            if self._closed.is_set():
                return
            self._closed.set()
            # A full queue: the worker is busy, and sees ``_closed`` after its current batch.
            with suppress(queue.Full):
                self._queue.put_nowait(_STOP)
        self._worker.join(timeout_s)

    # --- the worker ---------------------------------------------------------------------------

    def _next(self) -> _Request | None:
        """The oldest held request, else the next one queued (None: stopping)."""
        if self._held:
            return self._held.popleft()
        item = self._queue.get()
        return item if isinstance(item, _Request) else None

    def _gather(self, first: _Request) -> list[_Request]:
        """``first`` and what joins it within ``max_wait_s``, up to ``max_batch``."""
        batch = [first]
        # Held requests arrived before anything still queued: they join first.
        rest: deque[_Request] = deque()
        for held in self._held:
            fits = held.options == first.options and len(batch) < self.max_batch
            (batch if fits else rest).append(held)
        self._held = rest
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch and not self._closed.is_set():
            remaining = deadline - time.monotonic()
            try:
                item = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if item is _STOP:
                break
            assert isinstance(item, _Request)
            if item.options == first.options:
                batch.append(item)
            else:
                self._held.append(item)
        return batch

    def _run(self) -> None:
        try:
            while not self._closed.is_set():
                first = self._next()
                if first is not None:
                    self._predict(self._gather(first))
        finally:
            # Also when the worker dies of a BaseException: nobody may wait for it forever.
            with self._submit_lock:
                self._closed.set()
            self._fail_waiting()

    def _predict(self, batch: list[_Request]) -> None:
        live = [r for r in batch if r.future.set_running_or_notify_cancel()]
        if not live:
            return
        options = live[0].options
        try:
            results = self.predictor.predict_batch(
                [r.image for r in live], imgsz=options.imgsz, conf=options.conf, flip=options.flip
            )
            if len(results) != len(live):
                raise RuntimeError(
                    f"the predictor returned {len(results)} results for {len(live)} images"
                )
        except Exception as exc:  # the batch's callers get the error, the worker goes on
            with self._stats_lock:
                self._failed += 1
            for request in live:
                request.future.set_exception(exc)
            return
        except BaseException as exc:
            for request in live:
                request.future.set_exception(exc)
            raise
        with self._stats_lock:
            self._batches += 1
            self._images += len(live)
            self._largest = max(self._largest, len(live))
        for request, result in zip(live, results, strict=True):
            request.future.set_result(result)

    def _fail_waiting(self) -> None:
        """Fail every request nobody will predict now (the worker's last act)."""
        waiting = list(self._held)
        self._held.clear()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Request):
                waiting.append(item)
        for request in waiting:
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(
                    BatcherClosed(f"{SERVICE} shut down before predicting this image")
                )


class BatcherPool:
    """One ``MicroBatcher`` per predictor for an API process, all closed at its shutdown.

    Keyed by the predictor object (held, so its identity stays unique): a test or a benchmark
    that hands the API a predictor of its own gets a batcher of its own in front of it.
    """

    def __init__(self, *, max_batch: int, max_wait_ms: float, max_queue: int) -> None:
        self.max_batch, self.max_wait_ms, self.max_queue = max_batch, max_wait_ms, max_queue
        self._lock = threading.Lock()
        self._batchers: dict[int, tuple[BatchPredictor, MicroBatcher]] = {}

    def get(self, predictor: BatchPredictor) -> MicroBatcher:
        with self._lock:
            entry = self._batchers.get(id(predictor))
            if entry is None:
                batcher = MicroBatcher(
                    predictor,
                    max_batch=self.max_batch,
                    max_wait_ms=self.max_wait_ms,
                    max_queue=self.max_queue,
                )
                entry = self._batchers[id(predictor)] = (predictor, batcher)
            return entry[1]

    def close(self) -> None:
        with self._lock:
            batchers = [batcher for _, batcher in self._batchers.values()]
            self._batchers.clear()
        for batcher in batchers:
            batcher.close()
