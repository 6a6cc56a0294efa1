"""The registered model's versions as a person compares them: aliases, metrics and training data.

MLflow owns all of it (ARCHITECTURE.md, "Where each fact lives"): versions and aliases from
the registry, metrics and the training snapshot's hash from each version's run, read on every
call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from mlflow.exceptions import MlflowException, RestException

from training.snapshots import SNAPSHOT_HASH_TAG
from visionloop.registry import CHAMPION, client
from visionloop.settings import Settings

_MISSING = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


class UnknownModelVersion(LookupError):
    pass


@dataclass(frozen=True)
class VersionInfo:
    version: str
    aliases: list[str]
    created_at: datetime
    status: str
    run_id: str | None
    source: str
    trigger: str | None
    snapshot_hash: str | None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Catalog:
    model_name: str
    champion: str | None
    aliases: dict[str, str]  # alias -> version
    versions: list[VersionInfo]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def require_version(settings: Settings, version: str) -> None:
    """``UnknownModelVersion`` unless the registered model has ``version``."""
    try:
        client(settings).get_model_version(settings.model_name, version)
    except RestException as exc:
        if exc.error_code in _MISSING:
            raise UnknownModelVersion(
                f"model {settings.model_name!r} has no version {version!r}"
            ) from None
        raise


def catalog(settings: Settings, limit: int = 20) -> Catalog:
    """The newest ``limit`` versions, with every alias of the model."""
    mlflow = client(settings)
    try:
        registered = mlflow.get_registered_model(settings.model_name)
    except RestException as exc:
        if exc.error_code in _MISSING:
            return Catalog(settings.model_name, None, {}, [])  # nothing trained yet
        raise
    aliases = {alias: str(version) for alias, version in (registered.aliases or {}).items()}
    by_version: dict[str, list[str]] = {}
    for alias, version in sorted(aliases.items()):
        by_version.setdefault(version, []).append(alias)

    found = mlflow.search_model_versions(f"name='{_escape(settings.model_name)}'")
    newest = sorted(found, key=lambda v: int(v.version), reverse=True)[:limit]
    versions = []
    for mv in newest:
        metrics: dict[str, float] = {}
        tags: dict[str, str] = {}
        if mv.run_id:
            try:
                run = mlflow.get_run(mv.run_id)
                metrics, tags = dict(run.data.metrics), dict(run.data.tags)
            except MlflowException:
                pass  # the run was deleted: the version still exists, without its metrics
        versions.append(
            VersionInfo(
                version=str(mv.version),
                aliases=by_version.get(str(mv.version), []),
                created_at=datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=UTC),
                status=str(mv.status),
                run_id=mv.run_id,
                source=mv.source,
                trigger=tags.get("visionloop.trigger"),
                snapshot_hash=tags.get(SNAPSHOT_HASH_TAG),
                metrics=metrics,
            )
        )
    return Catalog(settings.model_name, aliases.get(CHAMPION), aliases, versions)
