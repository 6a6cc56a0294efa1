"""The latest drift verdict, for code that must react to it without importing Evidently."""

from __future__ import annotations

from sqlmodel import col, select

from visionloop.db import session_scope
from visionloop.models import DriftResult


def latest_drift_level() -> str | None:
    """Level of the most recent drift measurement (green, yellow, red); None if never measured."""
    with session_scope() as session:
        level = session.exec(
            select(DriftResult.level).order_by(col(DriftResult.id).desc()).limit(1)
        ).first()
    return None if level is None else str(getattr(level, "value", level))
