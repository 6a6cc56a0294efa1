"""The latest drift verdict, for code that must react to it without importing Evidently."""

from __future__ import annotations

from sqlmodel import Session, col, select

from visionloop.models import DriftResult


def latest_drift_level(session: Session) -> str | None:
    """Level of the most recent drift measurement (green, yellow, red); None if never measured."""
    level = session.exec(
        select(DriftResult.level).order_by(col(DriftResult.id).desc()).limit(1)
    ).first()
    return None if level is None else str(getattr(level, "value", level))
