"""The MLflow model registry: which model version is `champion` is MLflow's fact, read from it.

A model version's source is the run's ``weights`` artifact folder (``best.pt``), so any
ultralytics process can load it without MLflow-specific flavours.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException, RestException

from visionloop.settings import Settings

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous"
WEIGHTS_DIR = "weights"
WEIGHTS_FILE = "best.pt"


class RegistryError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    run_id: str | None
    source: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def client(settings: Settings) -> MlflowClient:
    return MlflowClient(tracking_uri=settings.mlflow_uri, registry_uri=settings.mlflow_uri)


def code_version() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).parent,
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def ensure_experiment(settings: Settings) -> str:
    mlflow = client(settings)
    experiment = mlflow.get_experiment_by_name(settings.mlflow_experiment)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(settings.mlflow_experiment)
    except MlflowException:
        # Lost a creation race: the other creator's experiment is as good.
        return mlflow.get_experiment_by_name(settings.mlflow_experiment).experiment_id


def _ref(version: ModelVersion) -> ModelRef:
    return ModelRef(version.name, str(version.version), version.run_id, version.source)


def register_weights(settings: Settings, run_id: str, alias: str | None = None) -> ModelRef:
    """Register the run's ``weights/`` artifact folder as a new version of the platform's model."""
    mlflow = client(settings)
    try:
        mlflow.get_registered_model(settings.model_name)
    except MlflowException:
        mlflow.create_registered_model(
            settings.model_name, description="visionloop's YOLO detector (weights/best.pt)"
        )
    source = f"{mlflow.get_run(run_id).info.artifact_uri}/{WEIGHTS_DIR}"
    version = mlflow.create_model_version(settings.model_name, source=source, run_id=run_id)
    if alias:
        mlflow.set_registered_model_alias(settings.model_name, alias, version.version)
    return _ref(version)


def get_alias(settings: Settings, alias: str) -> ModelRef | None:
    try:
        return _ref(client(settings).get_model_version_by_alias(settings.model_name, alias))
    except RestException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def get_version(settings: Settings, version: str) -> ModelRef:
    try:
        return _ref(client(settings).get_model_version(settings.model_name, str(version)))
    except RestException as exc:
        raise RegistryError(
            f"model {settings.model_name} has no version {version}: {exc.message}"
        ) from exc


def set_alias(settings: Settings, alias: str, version: str) -> None:
    client(settings).set_registered_model_alias(settings.model_name, alias, version)


def download_weights(settings: Settings, ref: ModelRef, dst: Path) -> Path:
    """Fetch ``best.pt`` of a model version into ``dst`` (a cache folder keyed by version)."""
    import mlflow.artifacts

    target = dst / ref.version
    weights = target / WEIGHTS_FILE
    if weights.exists():
        return weights
    target.mkdir(parents=True, exist_ok=True)
    mlflow.artifacts.download_artifacts(
        artifact_uri=f"{ref.source}/{WEIGHTS_FILE}",
        dst_path=str(target),
        tracking_uri=settings.mlflow_uri,
    )
    if not weights.exists():
        raise RegistryError(f"model version {ref.version} has no {WEIGHTS_DIR}/{WEIGHTS_FILE}")
    return weights
