"""Drift flow: the recent production window against the champion's training reference."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows import server_retries
from monitoring.drift_monitor import measure_drift
from visionloop.db import session_scope
from visionloop.models import DriftLevel
from visionloop.settings import get_settings


@task(**server_retries())
def measure(stat_test: str | None) -> dict[str, Any] | None:
    with session_scope() as session:
        result = measure_drift(session, get_settings(), stat_test=stat_test)
    if result is None:
        return None
    return {
        "id": result.id,
        "level": DriftLevel(result.level).value,
        "score": result.drift_score,
        "share": result.drift_share,
        "report_key": result.report_key,
        "drifted": sorted(
            (k for k, v in result.features.items() if isinstance(v, dict) and v["drifted"])
        ),
    }


@flow(name="drift", log_prints=True)
def drift_flow(stat_test: str | None = None) -> dict[str, Any] | None:
    """Measure drift once; ``stat_test`` overrides VISIONLOOP_DRIFT_STAT_TEST (ks, psi, ...)."""
    summary = measure(stat_test)
    logger = get_run_logger()
    if summary is None:
        logger.info("too few recent images for a drift verdict")
        return None
    logger.info(
        "drift %s (score %.2f, share %.2f)", summary["level"], summary["score"], summary["share"]
    )
    create_markdown_artifact(
        key="drift",
        markdown=(
            f"**Drift {summary['level']}** - score {summary['score']:.2f}, drift share "
            f"{summary['share']:.0%}; drifted features: {', '.join(summary['drifted']) or 'none'}. "
            f"Report: `s3://{get_settings().bucket_reports}/{summary['report_key']}`"
        ),
    )
    return summary
