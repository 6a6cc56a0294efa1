"""Calls to Prefect's API that wait a bounded time and name Prefect when it is away."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from visionloop.settings import Settings


class PrefectUnavailable(ConnectionError):
    """The Prefect API did not take a call within the service timeout and retries."""


@contextmanager
def bounded_prefect_calls(settings: Settings) -> Iterator[None]:
    """Prefect client calls inside wait at most ``VISIONLOOP_SERVICE_TIMEOUT_S`` each and are
    retried ``VISIONLOOP_SERVICE_RETRIES`` times (Prefect's own defaults: 60 s, 5 retries);
    a failure to reach the API is raised as ``PrefectUnavailable`` naming it."""
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import (
        PREFECT_API_REQUEST_TIMEOUT,
        PREFECT_CLIENT_MAX_RETRIES,
        temporary_settings,
    )

    bounds = {
        PREFECT_API_REQUEST_TIMEOUT: settings.service_timeout_s,
        PREFECT_CLIENT_MAX_RETRIES: settings.service_retries,
    }
    try:
        with temporary_settings(updates=bounds):
            yield
    except (httpx.TransportError, PrefectHTTPStatusError) as exc:
        if isinstance(exc, PrefectHTTPStatusError) and exc.response.status_code < 500:
            raise
        raise PrefectUnavailable(
            f"the Prefect API at {settings.prefect_api} is unavailable ({type(exc).__name__}: "
            f"{exc}); check VISIONLOOP_PREFECT_API_URL or run `visionloop up`"
        ) from exc
