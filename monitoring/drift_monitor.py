"""One drift measurement: compare, store the result and the HTML report, announce level changes."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlmodel import select

from monitoring.drift import DriftError, compute_drift
from monitoring.drift_data import current_frame, reference_frame
from visionloop.db import session_scope
from visionloop.events import EventKind, emit
from visionloop.models import DriftLevel, DriftResult
from visionloop.registry import CHAMPION, get_alias
from visionloop.settings import Settings
from visionloop.storage import ObjectStore


def latest_result() -> DriftResult | None:
    with session_scope() as session:
        return session.exec(select(DriftResult).order_by(DriftResult.id.desc()).limit(1)).first()


def measure_drift(
    settings: Settings, *, now: datetime | None = None, stat_test: str | None = None
) -> DriftResult | None:
    """Measure the current window against the champion's reference; None when too few images."""
    now = now or datetime.now(UTC)
    champion = get_alias(settings, CHAMPION)
    if champion is None:
        raise DriftError(
            "there is no champion model, so there is no reference to measure drift against"
        )
    current = current_frame(settings, champion.version, now)
    if len(current) < settings.drift_min_window:
        emit(
            EventKind.DRIFT_SKIPPED,
            f"drift not measured: {len(current)} recent images, {settings.drift_min_window} needed",
            {"window_size": len(current), "needed": settings.drift_min_window},
        )
        return None
    reference = reference_frame(settings, champion)
    outcome = compute_drift(
        reference,
        current,
        stat_test=stat_test or settings.drift_stat_test,
        yellow=settings.drift_yellow,
        red=settings.drift_red,
        with_html=True,
    )
    report_key = f"drift/{now:%Y/%m/%d}/{now:%H%M%S}-{outcome.stat_test}.html"
    ObjectStore(settings).put_bytes(
        settings.bucket_reports, report_key, outcome.html.encode(), "text/html"
    )

    previous = latest_result()
    result = DriftResult(
        created_at=now,
        model_version=champion.version,
        stat_test=outcome.stat_test,
        drift_score=outcome.drift_score,
        drift_share=outcome.drift_share,
        dataset_drift=outcome.dataset_drift,
        level=outcome.level,
        window_size=outcome.current_size,
        reference_size=outcome.reference_size,
        features={**outcome.features_dict(), "_p_value": outcome.p_value},
        report_key=report_key,
    )
    with session_scope() as session:
        session.add(result)
    previous_level = DriftLevel(previous.level) if previous else None
    if previous_level != outcome.level:
        shifted = ", ".join(outcome.drifted_features[:3]) or "no feature"
        emit(
            EventKind.DRIFT_LEVEL_CHANGED,
            f"drift level {previous_level.value if previous_level else 'unknown'} -> {outcome.level.value} "
            f"(score {outcome.drift_score:.2f}; drifted: {shifted})",
            {
                "level": outcome.level.value,
                "previous": previous_level.value if previous_level else None,
                "score": outcome.drift_score,
                "drifted": outcome.drifted_features,
                "result_id": result.id,
            },
            level="warning" if outcome.level != DriftLevel.green else "info",
        )
    return result
