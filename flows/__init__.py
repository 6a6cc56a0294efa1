"""Prefect flows, one per stage of the loop."""

from __future__ import annotations

from typing import Any

from visionloop.settings import load_settings


def server_retries() -> dict[str, Any]:
    """Task options for a task that talks to a server: Prefect retries it
    ``VISIONLOOP_TASK_RETRIES`` times, ``VISIONLOOP_TASK_RETRY_DELAY_S`` apart.

    Decorators run when a flow module is imported, which the worker does in each flow run's
    own process with that run's environment; reading the settings afresh here (not the
    cached ``get_settings``) lets that environment decide.
    """
    settings = load_settings()
    return {"retries": settings.task_retries, "retry_delay_seconds": settings.task_retry_delay_s}
