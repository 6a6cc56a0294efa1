"""Serving a new champion: its ONNX and OpenVINO exports, behind the parity check.

One task for every path that makes a champion (bootstrap, a retrain's promotion).
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from visionloop.settings import get_settings


@task(cache_policy=NO_CACHE)
def export_for_serving(version: str) -> list[str]:
    """Export the champion to ONNX/OpenVINO behind a parity check; the verified backends.
    Never fails the flow: without exports the champion serves on PyTorch."""
    from serving.export import export_version

    outcome = export_version(get_settings(), version)
    if outcome.error:
        get_run_logger().warning("version %s not exported: %s", version, outcome.error)
    return outcome.verified
