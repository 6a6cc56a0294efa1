"""Predicting with the model MLflow calls `champion`, hot-swapped when the alias moves.

Which version is the champion is MLflow's fact (ARCHITECTURE.md, "Where each fact lives"): the
predictor asks the registry at most every ``recheck_s`` seconds and, when the alias points
elsewhere, downloads that version's weights (verified and cached under ``<data_dir>/models``, see
``visionloop.registry.download_weights``) and swaps the model between two batches. While the
registry is unreachable the loaded model keeps serving. Flows and the API share one
predictor per process through ``get_predictor``.

Boxes are plain dicts, coordinates normalised to 0..1 of the upright image:
``{"cls": 0, "name": "scratch", "conf": 0.83, "x1": .., "y1": .., "x2": .., "y2": ..}``.

Every prediction runs at the low ``candidate_conf``: the boxes at or above the caller's
``conf`` are shown, the ones under it are kept as ``below`` (class and confidence only),
what the model almost saw, for scoring its uncertainty. The same forward pass yields the
image's embedding (``serving.embedding``).

What runs the model is ``VISIONLOOP_INFERENCE_BACKEND``: under ``auto`` the fastest export of
the version that passed its parity check with PyTorch (OpenVINO, then ONNX Runtime, see
``serving.export``), else PyTorch; an explicit ``onnx``/``openvino`` that is not verified
falls back to PyTorch and ``backend_reason`` says why. A version loaded before its exports
were logged is loaded again once they are (its registry tag changed). Both backends give the
same ``PredictionResult``s; a call at another ``imgsz`` than the export's fixed size runs on
PyTorch, which is kept loaded for it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from serving.embedding import mirror, predict_with_features, unmirror_boxes
from serving.runtime import EXPORTED_BACKENDS, F32, TORCH, Detections, ExportedRuntime
from training.trainer import configure_ultralytics
from visionloop.registry import (
    CHAMPION,
    ModelRef,
    RegistryError,
    WeightsChecksumError,
    download_export,
    download_weights,
    export_record,
    get_alias,
)
from visionloop.settings import Settings

RECHECK_S = 10.0
"""How stale the predictor's idea of the champion may get (seconds); also how often a registry
outage is retried while the last champion keeps serving."""
PREDICT_CONF = 0.25
"""Boxes under this confidence are not shown (ultralytics' own default)."""
MAX_BELOW = 32
"""Sub-threshold candidates kept per image: the most confident ones say all scoring needs."""

log = logging.getLogger(__name__)


class NoChampionError(RegistryError):
    """No model version carries the alias yet."""


@dataclass(frozen=True)
class PredictionResult:
    boxes: list[dict[str, Any]]
    """The shown boxes (at or above the caller's ``conf``), most confident first."""
    model_version: str
    below: list[tuple[int, float]] = field(default_factory=list)
    """Candidates under ``conf`` (down to ``candidate_conf``) as ``(cls, conf)``, most
    confident first, at most ``MAX_BELOW``."""
    embedding: np.ndarray | None = field(default=None, compare=False)
    """The image's embedding (``serving.embedding``), float32, L2-normalised (None when not
    asked for, and for a mirrored prediction)."""
    confidences: list[float] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "confidences", [float(b["conf"]) for b in self.boxes])


@dataclass(frozen=True)
class LoadedModel:
    """One champion version in memory: PyTorch always, an exported runtime when one is used."""

    torch: Any
    """The ultralytics ``YOLO`` (PyTorch): the fallback, and every call at another ``imgsz``."""
    runtime: ExportedRuntime | None
    reason: str
    """Why this backend runs (what was tried and refused before it)."""

    @property
    def backend(self) -> str:
        return self.runtime.backend if self.runtime is not None else TORCH


class ChampionPredictor:
    """Batched prediction with the current holder of ``alias``; safe to share across threads.

    Two locks with one job each: ``_refresh_lock`` lets one thread at a time ask the registry
    and load weights, ``_lock`` lets one batch at a time predict and a swap wait for it.
    Nothing slow happens under ``_lock``, nothing waits for it but predicting (the loaded
    model and version are one value, read without a lock), and once a model is loaded no
    request waits for a refresh another thread is doing: it predicts with the model it has.
    A failed refresh (the registry down, weights refused) keeps the loaded model and is tried
    again ``recheck_s`` later; ``last_error`` says why it failed.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        alias: str = CHAMPION,
        recheck_s: float = RECHECK_S,
        embed: bool = True,
    ) -> None:
        self.settings = settings
        self.alias = alias
        self.recheck_s = recheck_s
        self.embed = embed
        """Keep each image's embedding; off only to measure what it costs (bench.ingest)."""
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        # The model and its version as one value, replaced whole: a reader needs no lock.
        self._loaded: tuple[LoadedModel, ModelRef] | None = None
        self._checked_at = float("-inf")
        self.last_error: str | None = None

    def _due(self) -> bool:
        return self._loaded is None or time.monotonic() - self._checked_at >= self.recheck_s

    def _refresh(self) -> None:
        """Follow the alias if the last look is stale (call with ``_refresh_lock`` held)."""
        if not self._due():
            return  # another thread refreshed while this one waited
        try:
            ref = get_alias(self.settings, self.alias)
            if ref is None:
                raise NoChampionError(
                    f"no version of model {self.settings.model_name!r} has the alias "
                    f"{self.alias!r} in MLflow at {self.settings.mlflow_uri}; run "
                    "`visionloop bootstrap` to train a first one"
                )
            if self._loaded is None or ref != self._loaded[1]:
                model = self._load(ref)
                with self._lock:  # after the batch in hand, which predicts with the old one
                    self._loaded = (model, ref)
            self.last_error = None
        except RegistryError as exc:
            if self._loaded is None:
                raise
            self.last_error = str(exc)
            log.warning("keeping model version %s: %s", self._loaded[1].version, exc)
        finally:
            self._checked_at = time.monotonic()

    @property
    def backend(self) -> str:
        """What runs the loaded champion: ``torch``, ``onnx`` or ``openvino`` (loads it)."""
        return self._current()[0].backend

    @property
    def backend_reason(self) -> str:
        """Why that backend runs: the export chosen, or why each faster one was not."""
        return self._current()[0].reason

    def _current(self) -> tuple[LoadedModel, ModelRef]:
        """The model to predict with, refreshed first when due.

        Without a model the caller waits for the load (bounded by the registry's limits);
        with one it only refreshes if no other thread is at it already.
        """
        if self._due():
            blocking = self._loaded is None
            if self._refresh_lock.acquire(blocking=blocking):
                try:
                    self._refresh()
                finally:
                    self._refresh_lock.release()
        # Not under the model's lock: a caller that only asks the input size must not wait
        # for the batch being predicted.
        loaded = self._loaded
        assert loaded is not None
        return loaded

    def _load(self, ref: ModelRef) -> LoadedModel:
        """The version's PyTorch model and, when allowed and verified, its fastest export."""
        model = self._load_torch(ref)
        wanted = self.settings.inference_backend
        if wanted == TORCH:
            return LoadedModel(model, None, "VISIONLOOP_INFERENCE_BACKEND=torch")
        candidates = EXPORTED_BACKENDS if wanted == "auto" else (wanted,)
        backends = export_record(ref).get("backends", {})
        refused: list[str] = []
        for backend in candidates:
            entry = backends.get(backend)
            if not entry:
                refused.append(f"{backend}: model version {ref.version} has no parity record")
                continue
            if not entry.get("verified"):
                refused.append(f"{backend}: refused by its parity check ({entry.get('reason')})")
                continue
            try:
                path = download_export(
                    self.settings, ref, backend, self.settings.data_dir / "models"
                )
                runtime = ExportedRuntime(
                    backend,
                    path,
                    imgsz=_imgsz(model),
                    names=dict(model.names),
                    precision=self.settings.inference_precision,
                    mode=self.settings.inference_mode,
                )
            # Refused checksums, an unreachable store, a graph the runtime cannot load: each
            # falls back to the next backend and PyTorch, which serves the version correctly.
            except Exception as exc:
                refused.append(f"{backend}: {type(exc).__name__}: {exc}")
                continue
            # Records from before the precision was recorded were verified in f32.
            verified_at = entry.get("precision") or F32
            if runtime.precision != verified_at:
                refused.append(
                    f"{backend}: verified in {verified_at}, would compute in {runtime.precision} "
                    f"(VISIONLOOP_INFERENCE_PRECISION={self.settings.inference_precision})"
                )
                continue
            chosen = f"{backend}: verified export in {runtime.precision} ({entry.get('reason')})"
            return LoadedModel(model, runtime, "; ".join([*refused, chosen]))
        reason = "; ".join(refused) + "; running PyTorch"
        if wanted != "auto":
            log.warning(
                "VISIONLOOP_INFERENCE_BACKEND=%s but model version %s runs on PyTorch: %s",
                wanted,
                ref.version,
                reason,
            )
        else:
            log.info("model version %s runs on PyTorch: %s", ref.version, reason)
        return LoadedModel(model, None, reason)

    def _load_torch(self, ref: ModelRef) -> Any:
        """The version's model, from checksum-verified weights, checked by a safe load first."""
        configure_ultralytics(self.settings.data_dir / ".ultralytics")
        from ultralytics import YOLO
        from ultralytics.nn.tasks import torch_safe_load

        weights = download_weights(self.settings, ref, self.settings.data_dir / "models")
        # A weights_only load that admits only ultralytics' and torch's own classes: a pickle
        # referring to anything else is refused before the full load below runs its code.
        try:
            torch_safe_load(str(weights), safe_only=True)
        except Exception as exc:
            raise WeightsChecksumError(
                f"the weights of model version {ref.version} are not a plain ultralytics "
                f"checkpoint ({type(exc).__name__}: {exc}): refused"
            ) from exc
        return YOLO(str(weights), task="detect")

    def model_version(self) -> str:
        """The champion's version, loading it if needed."""
        return self._current()[1].version

    def input_size(self) -> int:
        """The square size images are letterboxed to: what the champion was trained at."""
        return _imgsz(self._current()[0].torch)

    def predict_batch(
        self,
        images: Sequence[np.ndarray],
        *,
        imgsz: int | None = None,
        conf: float = PREDICT_CONF,
        flip: bool = False,
    ) -> list[PredictionResult]:
        """Predict upright ``H x W x 3`` uint8 RGB images in one batch.

        ``imgsz`` defaults to the size the champion was trained at; boxes under ``conf`` are
        not shown but kept (down to ``candidate_conf``) as ``below``. ``flip`` predicts the
        images mirrored left to right and maps the boxes back into the upright frame (the
        flip-consistency pass of selection); it keeps no embedding.
        """
        if not images:
            return []
        # ultralytics reads numpy images as OpenCV's BGR.
        bgr = [cv2.cvtColor(image, cv2.COLOR_RGB2BGR) for image in images]
        if flip:
            bgr = mirror(bgr)
        loaded, ref = self._current()
        floor = min(conf, self.settings.candidate_conf)
        embed = self.embed and not flip
        runtime = loaded.runtime
        if runtime is not None and imgsz and imgsz != runtime.imgsz:
            runtime = None  # the exported graph's size is fixed: PyTorch predicts other sizes
        embeddings: np.ndarray | None = None
        with self._lock:  # one batch at a time per model; a swap waits for it
            if runtime is not None:
                found, pooled = runtime.predict(bgr, conf=floor)
                embeddings = pooled if embed else None
                names = runtime.names
            else:
                found, embeddings, names = _torch_predict(loaded.torch, bgr, floor, imgsz, embed)
        return [
            _result(
                detections,
                names,
                ref.version,
                conf,
                flip=flip,
                embedding=None if embeddings is None else embeddings[i],
            )
            for i, detections in enumerate(found)
        ]


def _imgsz(model: Any) -> int:
    return int(model.overrides.get("imgsz") or 640)


def _torch_predict(
    model: Any, bgr: list[np.ndarray], floor: float, imgsz: int | None, embed: bool
) -> tuple[list[Detections], np.ndarray | None, dict[int, str]]:
    kwargs: dict[str, Any] = {"conf": floor, "verbose": False}
    if imgsz:
        kwargs["imgsz"] = imgsz
    embeddings: np.ndarray | None = None
    if embed:
        results, embeddings = predict_with_features(model, bgr, **kwargs)
    else:
        results = model.predict(bgr, **kwargs)
    names = dict(results[0].names) if results else dict(model.names)
    return [Detections.from_result(r) for r in results], embeddings, names


def _result(
    found: Detections,
    names: dict[int, str],
    version: str,
    conf: float,
    *,
    flip: bool,
    embedding: np.ndarray | None,
) -> PredictionResult:
    """One image's detections as shown boxes and sub-threshold candidates."""
    boxes: list[dict[str, Any]] = []
    below: list[tuple[int, float]] = []
    if len(found.conf):
        xyxyn = unmirror_boxes(found.xyxyn) if flip else found.xyxyn
        confs, classes = found.conf, found.cls
        for index in np.argsort(-confs, kind="stable"):
            # Compared as stored: a shown box never reads under ``conf``, a near miss never at it.
            score, cls = round(float(confs[index]), 6), int(classes[index])
            if score < conf:
                if len(below) < MAX_BELOW:
                    below.append((cls, score))
                continue
            x1, y1, x2, y2 = xyxyn[index]
            boxes.append(
                {
                    "cls": cls,
                    "name": str(names.get(cls, cls)),
                    "conf": score,
                    "x1": round(float(x1), 6),
                    "y1": round(float(y1), 6),
                    "x2": round(float(x2), 6),
                    "y2": round(float(y2), 6),
                }
            )
    return PredictionResult(boxes=boxes, model_version=version, below=below, embedding=embedding)


_predictors: dict[tuple[str, str, str], ChampionPredictor] = {}
_predictors_lock = threading.Lock()


def get_predictor(settings: Settings, alias: str = CHAMPION) -> ChampionPredictor:
    """This process's predictor for ``alias`` of the settings' registered model."""
    key = (settings.mlflow_uri, settings.model_name, alias)
    with _predictors_lock:
        predictor = _predictors.get(key)
        if predictor is None:
            predictor = _predictors[key] = ChampionPredictor(settings, alias=alias)
        return predictor
