"""The MLflow model registry: which model version is `champion` is MLflow's fact, read from it.

A model version's source is the run's ``weights`` artifact folder (``best.pt``), so any
ultralytics process can load it without MLflow-specific flavours.

Weights are pickles, so only the bytes the platform registered are loaded: registration
records the file's sha256 as a version tag, and ``download_weights`` refuses a file that does
not match it (``WeightsChecksumError``). Downloaded weights are cached per version and
checksum, written whole into place or not at all.

Every call to MLflow is bounded by ``service_timeout_s`` and ``service_retries``; an
unreachable server is a ``RegistryUnavailable`` that names it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException, RestException
from requests.exceptions import RequestException

from visionloop.settings import Settings

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous"
WEIGHTS_DIR = "weights"
WEIGHTS_FILE = "best.pt"
SHA256_TAG = "visionloop.weights_sha256"
"""Model-version tag: the sha256 of the ``best.pt`` the platform registered."""
EXPORTS_TAG = "visionloop.exports"
"""Model-version tag: the exports' parity verdicts and the sha256 of every file of a verified
export (JSON, ``log_exports``). Only a backend listed here as verified is ever loaded."""
EXPORTS_DIR = "exports"
"""The run's artifact folder of exported models: ``exports/v<version>/<backend>/``."""
PARITY_FILE = "parity.json"
_TAG_REASON_CHARS = 300
"""MLflow caps a tag value at 5000 characters: each reason in the tag is cut to this."""
_BACKOFF_FACTOR = 1
"""Seconds before the second retry of a failed MLflow call (doubling after)."""


class RegistryError(RuntimeError):
    pass


class RegistryUnavailable(RegistryError):
    """MLflow did not answer within the configured timeout and retries."""


class WeightsChecksumError(RegistryError):
    """A version's weights are not the bytes the platform registered."""


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    run_id: str | None
    source: str
    sha256: str | None = None
    """The registered weights' checksum (``SHA256_TAG``); None for a version without it."""
    exports: str | None = None
    """The ``EXPORTS_TAG`` (JSON) once the version was exported; None before. Part of the
    identity: a predictor that loaded the version before its exports were logged sees a
    changed reference and loads it again, this time on the exported backend."""

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def apply_http_limits(settings: Settings) -> None:
    """Bound MLflow's HTTP calls by the settings' timeout and retries.

    MLflow's client reads its limits from the environment on every request and offers no
    per-client knob, so they are set for the process (which has one set of settings).
    """
    limits = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(settings.service_timeout_s))),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(settings.service_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(_BACKOFF_FACTOR),
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    }
    # Called for every client: the process environment is written only when a limit changed.
    if any(os.environ.get(name) != value for name, value in limits.items()):
        os.environ.update(limits)


def client(settings: Settings) -> MlflowClient:
    apply_http_limits(settings)
    return MlflowClient(tracking_uri=settings.mlflow_uri, registry_uri=settings.mlflow_uri)


@contextmanager
def reaching_mlflow(settings: Settings) -> Iterator[None]:
    """Turn a connection failure into ``RegistryUnavailable`` naming the server."""
    try:
        yield
    except (RequestException, OSError) as exc:
        raise RegistryUnavailable(_unreachable(settings, exc)) from exc
    except MlflowException as exc:
        if isinstance(exc, RestException) or "API request" not in str(exc):
            raise
        raise RegistryUnavailable(_unreachable(settings, exc)) from exc


def _unreachable(settings: Settings, exc: BaseException) -> str:
    return (
        f"MLflow at {settings.mlflow_uri} is unreachable (timeout {settings.service_timeout_s:g}"
        f" s, {settings.service_retries} retries): {type(exc).__name__}: {exc}"
    )


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
    return ModelRef(
        version.name,
        str(version.version),
        version.run_id,
        version.source,
        (version.tags or {}).get(SHA256_TAG),
        (version.tags or {}).get(EXPORTS_TAG),
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _run_weights_sha256(settings: Settings, source: str) -> str:
    """The checksum of the ``best.pt`` under ``source``, read back from the artifact store."""
    import mlflow.artifacts

    with tempfile.TemporaryDirectory() as scratch:
        with reaching_mlflow(settings):
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{source}/{WEIGHTS_FILE}",
                dst_path=scratch,
                tracking_uri=settings.mlflow_uri,
            )
        weights = Path(scratch) / WEIGHTS_FILE
        if not weights.exists():
            raise RegistryError(f"{source} has no {WEIGHTS_FILE} to register")
        return file_sha256(weights)


def register_weights(settings: Settings, run_id: str, alias: str | None = None) -> ModelRef:
    """Register the run's ``weights/`` artifact folder as a new version of the platform's model.

    The weights' sha256 is recorded on the version before any alias points at it, so no
    process is ever told to load a version it cannot verify.
    """
    mlflow = client(settings)
    with reaching_mlflow(settings):
        try:
            mlflow.get_registered_model(settings.model_name)
        except RestException:
            mlflow.create_registered_model(
                settings.model_name, description="visionloop's YOLO detector (weights/best.pt)"
            )
        source = f"{mlflow.get_run(run_id).info.artifact_uri}/{WEIGHTS_DIR}"
    checksum = _run_weights_sha256(settings, source)
    with reaching_mlflow(settings):
        version = mlflow.create_model_version(
            settings.model_name, source=source, run_id=run_id, tags={SHA256_TAG: checksum}
        )
        if alias:
            mlflow.set_registered_model_alias(settings.model_name, alias, version.version)
    return ModelRef(version.name, str(version.version), version.run_id, version.source, checksum)


def trust_weights(settings: Settings, version: str, expected_sha256: str) -> ModelRef:
    """Record the checksum of a version registered without one (before checksums were kept),
    once a person has vetted its weights and names their sha256.

    The stored file must hash to ``expected_sha256``: the registry and the artifact store
    alone are what an intruder could have written, so they cannot vouch for themselves.
    """
    expected = expected_sha256.strip().lower()
    ref = get_version(settings, version)
    if ref.sha256 and ref.sha256 != expected:
        raise WeightsChecksumError(
            f"model version {version} is already recorded with sha256 {ref.sha256}"
        )
    actual = _run_weights_sha256(settings, ref.source)
    if actual != expected:
        raise WeightsChecksumError(
            f"the stored weights of model version {version} have sha256 {actual}, not the "
            f"{expected} you vetted: not trusted"
        )
    with reaching_mlflow(settings):
        client(settings).set_model_version_tag(
            settings.model_name, str(version), SHA256_TAG, actual
        )
    return get_version(settings, version)


def get_alias(settings: Settings, alias: str) -> ModelRef | None:
    try:
        with reaching_mlflow(settings):
            return _ref(client(settings).get_model_version_by_alias(settings.model_name, alias))
    except RestException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def get_version(settings: Settings, version: str) -> ModelRef:
    try:
        with reaching_mlflow(settings):
            return _ref(client(settings).get_model_version(settings.model_name, str(version)))
    except RestException as exc:
        raise RegistryError(
            f"model {settings.model_name} has no version {version}: {exc.message}"
        ) from exc


def set_alias(settings: Settings, alias: str, version: str) -> None:
    client(settings).set_registered_model_alias(settings.model_name, alias, version)


def weights_cache_dir(dst: Path, ref: ModelRef) -> Path:
    """The cache folder of a version's weights: a re-created registry reusing version numbers
    has other checksums, so it never meets the old files."""
    return dst / f"{ref.version}-{(ref.sha256 or 'unverified')[:16]}"


def _verified(weights: Path, ref: ModelRef) -> bool:
    return weights.is_file() and file_sha256(weights) == ref.sha256


def download_weights(settings: Settings, ref: ModelRef, dst: Path) -> Path:
    """Fetch ``best.pt`` of a model version into the cache under ``dst``, verified.

    ``WeightsChecksumError`` unless the file's sha256 is the one recorded at registration. A
    cached file is checked again before use; a partial or foreign one is downloaded anew into
    a scratch folder beside the cache and moved into place only once verified.
    """
    import mlflow.artifacts

    if not ref.sha256:
        raise WeightsChecksumError(
            f"model version {ref.version} has no {SHA256_TAG} tag: its weights were not "
            "registered by visionloop and are not loaded"
        )
    target = weights_cache_dir(dst, ref)
    weights = target / WEIGHTS_FILE
    if _verified(weights, ref):
        return weights
    target.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".download-", dir=target))
    try:
        with reaching_mlflow(settings):
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{ref.source}/{WEIGHTS_FILE}",
                dst_path=str(scratch),
                tracking_uri=settings.mlflow_uri,
            )
        fetched = scratch / WEIGHTS_FILE
        if not fetched.exists():
            raise RegistryError(f"model version {ref.version} has no {WEIGHTS_DIR}/{WEIGHTS_FILE}")
        actual = file_sha256(fetched)
        if actual != ref.sha256:
            raise WeightsChecksumError(
                f"the weights of model version {ref.version} have sha256 {actual}, not the "
                f"{ref.sha256} recorded at registration: refused"
            )
        os.replace(fetched, weights)  # atomic: a reader sees the old file or the whole new one
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return weights


# --- exported models --------------------------------------------------------------------------


def _exports_uri(ref: ModelRef) -> str:
    """Where the version's exports lie: beside its weights, in the same run."""
    base = ref.source.removesuffix(f"/{WEIGHTS_DIR}")
    return f"{base}/{EXPORTS_DIR}/v{ref.version}"


def export_record(ref: ModelRef) -> dict[str, Any]:
    """The version's ``EXPORTS_TAG`` as a dict (``{}`` when it was never exported)."""
    if not ref.exports:
        return {}
    try:
        record = json.loads(ref.exports)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def log_exports(
    settings: Settings,
    ref: ModelRef,
    folders: dict[str, Path],
    entry_files: dict[str, str],
    parity: dict[str, Any],
) -> ModelRef:
    """Log each verified export folder and the parity record as artifacts of the version's run,
    then tag the version with the verdicts and the sha256 of every logged file.

    ``folders`` holds only verified exports (backend -> folder); ``entry_files`` names the
    file of each folder a runtime loads. The tag is written last, so no process is told to
    load files that are not all stored yet.
    """
    if not ref.run_id:
        raise RegistryError(f"model version {ref.version} has no run to log its exports to")
    mlflow = client(settings)
    backends: dict[str, Any] = {}
    for backend, parity_entry in (parity.get("backends") or {}).items():
        backends[backend] = {
            "verified": bool(parity_entry.get("verified")) and backend in folders,
            "reason": str(parity_entry.get("reason", ""))[:_TAG_REASON_CHARS],
            # The precision it was compared in: the only one it may serve at.
            "precision": parity_entry.get("precision"),
        }
    prefix = f"{EXPORTS_DIR}/v{ref.version}"
    with tempfile.TemporaryDirectory() as scratch:
        record_path = Path(scratch) / PARITY_FILE
        record_path.write_text(json.dumps(parity, indent=2, sort_keys=True))
        with reaching_mlflow(settings):
            mlflow.log_artifact(ref.run_id, str(record_path), prefix)
        for backend, folder in folders.items():
            files = {
                str(path.relative_to(folder)): file_sha256(path)
                for path in sorted(folder.rglob("*"))
                if path.is_file()
            }
            with reaching_mlflow(settings):
                mlflow.log_artifacts(ref.run_id, str(folder), f"{prefix}/{backend}")
            backends[backend].update(entry=entry_files[backend], files=files)
        tag = {
            "backends": backends,
            PARITY_FILE: file_sha256(record_path),
            "imgsz": parity.get("imgsz"),
        }
    with reaching_mlflow(settings):
        mlflow.set_model_version_tag(
            settings.model_name, ref.version, EXPORTS_TAG, json.dumps(tag, sort_keys=True)
        )
    return get_version(settings, ref.version)


def download_export(settings: Settings, ref: ModelRef, backend: str, dst: Path) -> Path:
    """A verified export of the version, cached under ``dst``; the path of its entry file.

    ``WeightsChecksumError`` unless the backend is recorded as verified and every file hashes
    to what ``log_exports`` recorded: an exported graph is code a runtime executes.
    """
    import mlflow.artifacts

    entry = export_record(ref).get("backends", {}).get(backend) or {}
    if not entry.get("verified") or not entry.get("files") or not entry.get("entry"):
        raise WeightsChecksumError(
            f"model version {ref.version} has no verified {backend} export"
            + (f" ({entry['reason']})" if entry.get("reason") else "")
        )
    files: dict[str, str] = entry["files"]
    target = weights_cache_dir(dst, ref) / EXPORTS_DIR / backend
    if all(
        (target / name).is_file() and file_sha256(target / name) == sha
        for name, sha in files.items()
    ):
        return target / entry["entry"]
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        with reaching_mlflow(settings):
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{_exports_uri(ref)}/{backend}",
                dst_path=str(scratch),
                tracking_uri=settings.mlflow_uri,
            )
        fetched = scratch / backend
        for name, sha in files.items():
            path = fetched / name
            if not path.resolve().is_relative_to(fetched.resolve()) or not path.is_file():
                raise WeightsChecksumError(
                    f"the {backend} export of model version {ref.version} lacks {name}"
                )
            actual = file_sha256(path)
            if actual != sha:
                raise WeightsChecksumError(
                    f"{name} of the {backend} export of model version {ref.version} has "
                    f"sha256 {actual}, not the {sha} recorded when it was verified: refused"
                )
        shutil.rmtree(target, ignore_errors=True)
        os.replace(fetched, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target / entry["entry"]


def download_parity(settings: Settings, ref: ModelRef) -> dict[str, Any]:
    """The version's parity record (``parity.json``), refused unless it is the one tagged."""
    import mlflow.artifacts

    expected = export_record(ref).get(PARITY_FILE)
    if not expected:
        raise RegistryError(f"model version {ref.version} has no parity record")
    with tempfile.TemporaryDirectory() as scratch:
        with reaching_mlflow(settings):
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{_exports_uri(ref)}/{PARITY_FILE}",
                dst_path=scratch,
                tracking_uri=settings.mlflow_uri,
            )
        path = Path(scratch) / PARITY_FILE
        if not path.is_file() or file_sha256(path) != expected:
            raise WeightsChecksumError(
                f"the parity record of model version {ref.version} is not the one tagged"
            )
        return json.loads(path.read_text())
