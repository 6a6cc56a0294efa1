"""Service probes: is each part of the platform up, and how fast does it answer?

`visionloop status`, `visionloop up` and the API's health endpoint all use these, so "healthy"
means the same thing everywhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import httpx
from sqlalchemy import text

from visionloop.settings import Settings


@dataclass(frozen=True)
class ServiceHealth:
    name: str
    url: str
    ok: bool
    latency_ms: float
    detail: str = ""
    setting: str = ""  # the setting to look at when it is down

    def as_dict(self) -> dict:
        return asdict(self)


def _timed(name: str, url: str, setting: str, check: Callable[[], str]) -> ServiceHealth:
    start = time.perf_counter()
    try:
        detail = check()
        ok = True
    except Exception as exc:  # a probe reports every failure, it never raises
        detail = f"{type(exc).__name__}: {exc}"
        ok = False
    return ServiceHealth(
        name, url, ok, round((time.perf_counter() - start) * 1000, 1), detail, setting
    )


def _http_ok(url: str, timeout: float, headers: dict | None = None) -> str:
    response = httpx.get(url, timeout=timeout, headers=headers)
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code} from {url}: {response.text[:200]}")
    return "ok"


def probe_database(settings: Settings, timeout: float = 3.0) -> ServiceHealth:
    """Connects to ``settings.db_url`` itself rather than taking a session: the probe asks
    whether that URL answers, which a session handed in by a caller would not show."""
    from visionloop.db import current_revision, engine_for

    def check() -> str:
        with engine_for(settings.db_url).connect() as conn:
            conn.execute(text("SELECT 1"))
        revision = current_revision(settings.db_url)
        if revision is None:
            raise RuntimeError("schema not migrated; run `visionloop up` or `visionloop migrate`")
        return f"schema {revision}"

    url = settings.db_url.split("@")[-1]  # never show a password
    return _timed("database", url, "VISIONLOOP_DATABASE_URL", check)


def probe_s3(settings: Settings, timeout: float = 3.0) -> ServiceHealth:
    from visionloop.storage import ObjectStore

    def check() -> str:
        # A probe asks once and waits no longer than it was told to.
        bounded = settings.model_copy(update={"service_timeout_s": timeout})
        store = ObjectStore(bounded, retries=0)
        store.ping()
        missing = [b for b in settings.all_buckets if not store.client.bucket_exists(b)]
        return f"missing buckets: {', '.join(missing)}" if missing else "buckets ok"

    setting = "VISIONLOOP_S3_ENDPOINT" if settings.s3_endpoint else "VISIONLOOP_S3_PORT"
    return _timed("s3", settings.s3_url, setting, check)


def probe_prefect(settings: Settings, timeout: float = 3.0) -> ServiceHealth:
    setting = (
        "VISIONLOOP_PREFECT_API_URL" if settings.prefect_api_url else "VISIONLOOP_PREFECT_PORT"
    )
    return _timed(
        "prefect",
        settings.prefect_api,
        setting,
        lambda: _http_ok(f"{settings.prefect_api}/health", timeout),
    )


def probe_mlflow(settings: Settings, timeout: float = 3.0) -> ServiceHealth:
    setting = (
        "VISIONLOOP_MLFLOW_TRACKING_URI"
        if settings.mlflow_tracking_uri
        else "VISIONLOOP_MLFLOW_PORT"
    )
    return _timed(
        "mlflow",
        settings.mlflow_uri,
        setting,
        lambda: _http_ok(f"{settings.mlflow_uri}/health", timeout),
    )


def probe_label_studio(settings: Settings, timeout: float = 3.0) -> ServiceHealth:
    def check() -> str:
        _http_ok(f"{settings.label_studio}/health", timeout)
        token = settings.label_studio_token.get_secret_value()
        if not token:
            return "up (no token provisioned yet)"
        from labeling.provision import check_token

        check_token(settings.label_studio, token)
        return "token ok"

    setting = (
        "VISIONLOOP_LABEL_STUDIO_URL"
        if settings.label_studio_url
        else "VISIONLOOP_LABEL_STUDIO_PORT"
    )
    return _timed("label-studio", settings.label_studio, setting, check)


def probe_api(settings: Settings, timeout: float = 3.0) -> ServiceHealth:
    return _timed(
        "api",
        settings.api_url,
        "VISIONLOOP_API_PORT",
        lambda: _http_ok(f"{settings.api_url}/api/health", timeout),
    )


def probe_worker(settings: Settings, timeout: float = 3.0) -> ServiceHealth:
    """The worker is healthy when the Prefect API sees it polling the platform's work pool."""

    def check() -> str:
        response = httpx.post(
            f"{settings.prefect_api}/work_pools/{settings.prefect_work_pool}/workers/filter",
            json={},
            timeout=timeout,
        )
        if response.status_code == 404:
            raise RuntimeError(f"work pool {settings.prefect_work_pool!r} does not exist")
        response.raise_for_status()
        online = [w["name"] for w in response.json() if w.get("status") == "ONLINE"]
        if not online:
            raise RuntimeError(f"no online worker polls work pool {settings.prefect_work_pool!r}")
        return f"{len(online)} online"

    return _timed(
        "worker",
        f"{settings.prefect_api}/work_pools/{settings.prefect_work_pool}",
        "VISIONLOOP_PREFECT_WORK_POOL",
        check,
    )


PROBES: dict[str, Callable[[Settings, float], ServiceHealth]] = {
    "database": probe_database,
    "s3": probe_s3,
    "prefect": probe_prefect,
    "mlflow": probe_mlflow,
    "label-studio": probe_label_studio,
    "api": probe_api,
    "worker": probe_worker,
}


def check_all(
    settings: Settings, names: list[str] | None = None, timeout: float = 3.0
) -> list[ServiceHealth]:
    return [PROBES[name](settings, timeout) for name in (names or list(PROBES))]
