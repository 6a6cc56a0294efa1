"""A streaming change detector (ADWIN) on the champion's per-image confidence.

The hourly drift check compares feature distributions in windows; between two checks a camera
that goes dark shows first as a champion that is suddenly less sure. ADWIN (river) watches the
stream of per-image mean box confidence (0 for an image without a box) as predictions are
written, at ingest and at ``/api/predict``. Flows and the API are separate processes, so the
detector is not kept in memory: it is replayed over the champion's newest predictions in the
database (``VISIONLOOP_ADWIN_WINDOW`` of them, well under a millisecond per thousand) and a
change counts when ADWIN finds it at one of the predictions just written, so each is reported
once. A change is recorded as a drift result (``stat_test`` ``adwin``) that raises the drift
level to at least yellow until the next full check writes its own result.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Collection
from dataclasses import dataclass

from sqlmodel import Session, col, select

from visionloop.events import EventKind, emit
from visionloop.models import DriftLevel, DriftResult, Prediction
from visionloop.settings import Settings

log = logging.getLogger(__name__)

STAT_TEST = "adwin"
DETECTOR_MODULE = "river.drift"
"""Imported when first needed: river pulls in scikit-learn and SciPy, seconds of start-up a
process that never watches the stream should not pay, and one that will should pay beside
its other work (``warm_detector``), not in the middle of it."""
_ORDER = [DriftLevel.green, DriftLevel.yellow, DriftLevel.red]


@dataclass(frozen=True)
class ConfidenceChange:
    model_version: str
    prediction_id: int
    """The prediction at which ADWIN saw the change."""
    mean_before: float
    mean_after: float
    window: int
    """Predictions replayed."""
    recent: int
    """How many of the newest predictions ADWIN kept as the new regime."""

    @property
    def shift(self) -> float:
        return round(self.mean_after - self.mean_before, 6)


def warm_detector() -> threading.Thread:
    """Import the detector's library on a background thread, started now: a flow run's first
    batch then does not stop for seconds to import it while the cores predict nothing."""
    thread = threading.Thread(
        target=importlib.import_module, args=(DETECTOR_MODULE,), name="warm-detector", daemon=True
    )
    thread.start()
    return thread


def confidence_change(
    session: Session,
    settings: Settings,
    model_version: str,
    new_image_ids: Collection[int],
) -> ConfidenceChange | None:
    """A change in ``model_version``'s confidence stream found at one of the predictions of
    ``new_image_ids``, or None."""
    if not new_image_ids:
        return None
    from river.drift import ADWIN

    rows = session.exec(
        select(Prediction.id, Prediction.image_id, Prediction.mean_confidence)
        .where(Prediction.model_version == model_version)
        .order_by(col(Prediction.id).desc())
        .limit(settings.adwin_window)
    ).all()
    rows = list(reversed(rows))
    values = [float(conf or 0.0) for _, _, conf in rows]
    new = set(new_image_ids)
    detector = ADWIN(delta=settings.adwin_delta)
    for i, (prediction_id, image_id, _) in enumerate(rows):
        detector.update(values[i])
        if detector.drift_detected and image_id in new:
            kept = int(detector.width)
            earlier = values[: i + 1 - kept]
            if not earlier:
                continue
            return ConfidenceChange(
                model_version=model_version,
                prediction_id=int(prediction_id),
                mean_before=round(sum(earlier) / len(earlier), 6),
                mean_after=round(float(detector.estimation), 6),
                window=len(rows),
                recent=kept,
            )
    return None


def record_change(session: Session, change: ConfidenceChange) -> DriftResult:
    """The change as a drift result at least yellow (a red level stays red), and its events."""
    latest = session.exec(
        select(DriftResult).order_by(col(DriftResult.created_at).desc(), col(DriftResult.id).desc())
    ).first()
    before = DriftLevel(latest.level) if latest is not None else DriftLevel.green
    level = max(before, DriftLevel.yellow, key=_ORDER.index)
    row = DriftResult(
        model_version=change.model_version,
        stat_test=STAT_TEST,
        drift_score=abs(change.shift),
        drift_share=0.0,
        dataset_drift=True,
        level=level,
        window_size=change.recent,
        reference_size=change.window - change.recent,
        features={
            "confidence": {
                "name": "confidence",
                "statistic": abs(change.shift),
                "p_value": None,
                "threshold": 0.0,
                "drifted": True,
                "severity": abs(change.shift),
                "mean_before": change.mean_before,
                "mean_after": change.mean_after,
                "prediction_id": change.prediction_id,
            }
        },
    )
    session.add(row)
    session.commit()
    message = (
        f"the champion's confidence changed: mean {change.mean_before:.3f} before, "
        f"{change.mean_after:.3f} over the last {change.recent} images (ADWIN)"
    )
    emit(
        EventKind.DRIFT_STREAM_CHANGE,
        message,
        {"result_id": row.id, "shift": change.shift, "model_version": change.model_version},
        level="warning",
        engine=session.get_bind(),  # type: ignore[arg-type]
    )
    if level != before:
        was = before.value if latest is not None else None
        emit(
            EventKind.DRIFT_LEVEL_CHANGED,
            f"drift level {was or 'unknown'} -> {level.value} ({message})",
            {
                "level": level.value,
                "previous": was,
                "score": abs(change.shift),
                "drifted": ["confidence"],
                "result_id": row.id,
            },
            level="warning",
            engine=session.get_bind(),  # type: ignore[arg-type]
        )
    return row


def watch_confidence(
    session: Session, settings: Settings, model_version: str | None, new_image_ids: Collection[int]
) -> DriftResult | None:
    """Look for a change after predictions were written; never fails the caller (the stream is
    a warning light, not part of ingesting or serving an image)."""
    if not model_version or not new_image_ids or settings.adwin_window <= 0:
        return None
    try:
        change = confidence_change(session, settings, model_version, new_image_ids)
        return record_change(session, change) if change is not None else None
    except Exception as exc:
        session.rollback()
        log.warning("confidence stream not checked: %s: %s", type(exc).__name__, exc)
        return None
