"""Predicting with the model MLflow calls `champion`, hot-swapped when the alias moves.

Which version is the champion is MLflow's fact (ARCHITECTURE.md, "Where each fact lives"): the
predictor asks the registry at most every ``recheck_s`` seconds and, when the alias points
elsewhere, downloads that version's weights (cached per version under
``<data_dir>/models``) and swaps the model between two batches. Flows and the API share one
predictor per process through ``get_predictor``.

Boxes are plain dicts, coordinates normalised to 0..1 of the upright image:
``{"cls": 0, "name": "scratch", "conf": 0.83, "x1": .., "y1": .., "x2": .., "y2": ..}``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from training.trainer import configure_ultralytics
from visionloop.registry import CHAMPION, ModelRef, RegistryError, download_weights, get_alias
from visionloop.settings import Settings

RECHECK_S = 30.0
"""How stale the predictor's idea of the champion may get (seconds)."""
PREDICT_CONF = 0.25
"""Boxes under this confidence are dropped (ultralytics' own default)."""


class NoChampionError(RegistryError):
    """No model version carries the alias yet."""


@dataclass(frozen=True)
class PredictionResult:
    boxes: list[dict[str, Any]]
    model_version: str
    confidences: list[float] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "confidences", [float(b["conf"]) for b in self.boxes])


class ChampionPredictor:
    """Batched prediction with the current holder of ``alias``; safe to share across threads."""

    def __init__(
        self,
        settings: Settings,
        *,
        alias: str = CHAMPION,
        recheck_s: float = RECHECK_S,
    ) -> None:
        self.settings = settings
        self.alias = alias
        self.recheck_s = recheck_s
        self._lock = threading.Lock()
        self._model: Any = None
        self._ref: ModelRef | None = None
        self._checked_at = float("-inf")

    def _current(self) -> tuple[Any, ModelRef]:
        """The loaded model, reloaded first if the alias moved (call with the lock held)."""
        now = time.monotonic()
        if self._model is None or now - self._checked_at >= self.recheck_s:
            ref = get_alias(self.settings, self.alias)
            if ref is None:
                raise NoChampionError(
                    f"no version of model {self.settings.model_name!r} has the alias "
                    f"{self.alias!r} in MLflow at {self.settings.mlflow_uri}; run "
                    "`visionloop bootstrap` to train a first one"
                )
            if self._ref is None or ref.version != self._ref.version:
                self._model = self._load(ref)
                self._ref = ref
            self._checked_at = now
        assert self._ref is not None
        return self._model, self._ref

    def _load(self, ref: ModelRef) -> Any:
        configure_ultralytics(self.settings.data_dir / ".ultralytics")
        from ultralytics import YOLO

        weights = download_weights(self.settings, ref, self.settings.data_dir / "models")
        return YOLO(str(weights), task="detect")

    def model_version(self) -> str:
        """The champion's version, loading it if needed."""
        with self._lock:
            return self._current()[1].version

    def input_size(self) -> int:
        """The square size images are letterboxed to: what the champion was trained at."""
        with self._lock:
            model, _ = self._current()
            return int(model.overrides.get("imgsz") or 640)

    def predict_batch(
        self, images: Sequence[np.ndarray], *, imgsz: int | None = None, conf: float = PREDICT_CONF
    ) -> list[PredictionResult]:
        """Predict upright ``H x W x 3`` uint8 RGB images in one batch.

        ``imgsz`` defaults to the size the champion was trained at; boxes under ``conf`` are
        dropped.
        """
        if not images:
            return []
        # ultralytics reads numpy images as OpenCV's BGR.
        bgr = [cv2.cvtColor(image, cv2.COLOR_RGB2BGR) for image in images]
        with self._lock:
            model, ref = self._current()
            kwargs: dict[str, Any] = {"conf": conf, "verbose": False}
            if imgsz:
                kwargs["imgsz"] = imgsz
            results = model.predict(bgr, **kwargs)
        names = results[0].names if results else {}
        out = []
        for result in results:
            boxes = []
            if result.boxes is not None and len(result.boxes):
                xyxyn = result.boxes.xyxyn.cpu().numpy().astype(float)
                confs = result.boxes.conf.cpu().numpy().astype(float)
                classes = result.boxes.cls.cpu().numpy().astype(int)
                for (x1, y1, x2, y2), conf, cls in zip(xyxyn, confs, classes):
                    boxes.append(
                        {
                            "cls": int(cls),
                            "name": str(names.get(int(cls), cls)),
                            "conf": round(float(conf), 6),
                            "x1": round(float(x1), 6),
                            "y1": round(float(y1), 6),
                            "x2": round(float(x2), 6),
                            "y2": round(float(y2), 6),
                        }
                    )
            out.append(PredictionResult(boxes=boxes, model_version=ref.version))
        return out


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
