"""One drift measurement: compare, store the result and the HTML report, announce level changes."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlmodel import Session, select

from monitoring.drift import DriftError, DriftOutcome, compute_drift
from monitoring.drift_data import current_frame, reference_frame
from visionloop.events import EventKind, emit
from visionloop.models import DriftLevel, DriftResult
from visionloop.registry import CHAMPION, ModelRef, get_alias
from visionloop.settings import Settings
from visionloop.storage import ObjectStore


def latest_result(session: Session) -> DriftResult | None:
    return session.exec(select(DriftResult).order_by(DriftResult.id.desc()).limit(1)).first()


def _champion(settings: Settings) -> ModelRef:
    champion = get_alias(settings, CHAMPION)
    if champion is None:
        raise DriftError(
            "there is no champion model, so there is no reference to measure drift against"
        )
    return champion


def _announce_skipped(window_size: int, needed: int) -> None:
    emit(
        EventKind.DRIFT_SKIPPED,
        f"drift not measured: {window_size} recent images, {needed} needed",
        {"window_size": window_size, "needed": needed},
    )


def _store_report(settings: Settings, outcome: DriftOutcome, now: datetime) -> str:
    """Uploads the HTML report; returns its key in the reports bucket."""
    report_key = f"drift/{now:%Y/%m/%d}/{now:%H%M%S}-{outcome.stat_test}.html"
    ObjectStore(settings).put_bytes(
        settings.bucket_reports, report_key, outcome.html.encode(), "text/html"
    )
    return report_key


def _result_row(
    outcome: DriftOutcome, model_version: str, now: datetime, report_key: str
) -> DriftResult:
    return DriftResult(
        created_at=now,
        model_version=model_version,
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


def _announce_level_change(
    previous: DriftResult | None, outcome: DriftOutcome, result_id: int | None
) -> None:
    previous_level = DriftLevel(previous.level) if previous else None
    if previous_level == outcome.level:
        return
    shifted = ", ".join(outcome.drifted_features[:3]) or "no feature"
    was = previous_level.value if previous_level else None
    emit(
        EventKind.DRIFT_LEVEL_CHANGED,
        f"drift level {was or 'unknown'} -> {outcome.level.value} "
        f"(score {outcome.drift_score:.2f}; drifted: {shifted})",
        {
            "level": outcome.level.value,
            "previous": was,
            "score": outcome.drift_score,
            "drifted": outcome.drifted_features,
            "result_id": result_id,
        },
        level="warning" if outcome.level != DriftLevel.green else "info",
    )


def measure_drift(
    session: Session,
    settings: Settings,
    *,
    now: datetime | None = None,
    stat_test: str | None = None,
) -> DriftResult | None:
    """Measure the current window against the champion's reference; None when too few images."""
    now = now or datetime.now(UTC)
    champion = _champion(settings)
    current = current_frame(session, settings, champion.version, now)
    if len(current) < settings.drift_min_window:
        _announce_skipped(len(current), settings.drift_min_window)
        return None
    outcome = compute_drift(
        reference_frame(session, settings, champion),
        current,
        stat_test=stat_test or settings.drift_stat_test,
        yellow=settings.drift_yellow,
        red=settings.drift_red,
        with_html=True,
    )
    report_key = _store_report(settings, outcome, now)
    previous = latest_result(session)
    result = _result_row(outcome, champion.version, now, report_key)
    session.add(result)
    # Stored before it is announced: the event is written in a transaction of its own, which
    # on SQLite would wait for this one's write lock.
    session.commit()
    _announce_level_change(previous, outcome, result.id)
    return result
