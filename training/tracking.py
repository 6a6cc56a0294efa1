"""A training run tracked in MLflow: parameters, per-epoch metrics, weights, provenance."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from training.trainer import EpochCallback, TrainResult, resolve_device, train_yolo
from visionloop.registry import WEIGHTS_DIR, client, code_version, ensure_experiment
from visionloop.settings import Settings


def tracked_training(
    settings: Settings,
    data_yaml: Path,
    *,
    model_source: str,
    run_dir: Path,
    epochs: int,
    run_name: str,
    tags: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
    on_epoch: EpochCallback | None = None,
    on_run_created: Callable[[str], None] | None = None,
) -> tuple[str, TrainResult]:
    """Train and record it as one MLflow run; the run ends FAILED if training raises.

    ``on_run_created`` hears the MLflow run id before training starts, so a caller can record
    it while the run is live (a killed process can then still have its run ended by others).
    """
    mlflow = client(settings)
    # Resolved before the run starts, so a GPU asked for but absent fails before MLflow
    # records a run; logged because `auto` means different hardware on different workers.
    device = resolve_device(settings.device)
    run_id = _start_run(settings, mlflow, run_name, tags)
    all_params = {
        "model_source": model_source,
        "device": device,
        "epochs": epochs,
        "imgsz": settings.image_size,
        "batch": settings.train_batch,
        "seed": settings.seed,
        "class_names": ",".join(settings.class_names),
        **(params or {}),
    }
    mlflow.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in all_params.items()])
    try:
        if on_run_created:
            on_run_created(run_id)
        result = train_yolo(
            data_yaml,
            model_source=model_source,
            run_dir=run_dir,
            epochs=epochs,
            imgsz=settings.image_size,
            batch=settings.train_batch,
            seed=settings.seed,
            on_epoch=_epoch_logger(mlflow, run_id, on_epoch),
            device=device,
        )
        _log_result(mlflow, run_id, result, data_yaml)
    except BaseException as exc:
        mlflow.set_tag(run_id, "visionloop.error", f"{type(exc).__name__}: {exc}"[:5000])
        mlflow.set_terminated(
            run_id, status="FAILED" if not isinstance(exc, KeyboardInterrupt) else "KILLED"
        )
        raise
    mlflow.set_terminated(run_id, status="FINISHED")
    return run_id, result


def _start_run(
    settings: Settings, mlflow: MlflowClient, run_name: str, tags: dict[str, str] | None
) -> str:
    all_tags = {
        "mlflow.runName": run_name,
        "visionloop.code_version": code_version(),
        **(tags or {}),
    }
    run = mlflow.create_run(ensure_experiment(settings), tags=all_tags, run_name=run_name)
    return run.info.run_id


def _now_ms() -> int:
    return int(time.time() * 1000)


def _epoch_logger(
    mlflow: MlflowClient, run_id: str, on_epoch: EpochCallback | None
) -> EpochCallback:
    """An epoch callback that logs the epoch's metrics on the run, then passes it on."""

    def log_epoch(record: dict[str, Any]) -> None:
        now, step = _now_ms(), int(record["epoch"])
        metrics = [
            Metric(k, float(v), now, step)
            for k, v in record.items()
            if k not in ("epoch", "epochs")
        ]
        if metrics:
            mlflow.log_batch(run_id, metrics=metrics)
        if on_epoch:
            on_epoch(record)

    return log_epoch


def _log_result(mlflow: MlflowClient, run_id: str, result: TrainResult, data_yaml: Path) -> None:
    """The best weights, the final metrics and the dataset the run trained on."""
    mlflow.log_artifact(run_id, str(result.best_weights), artifact_path=WEIGHTS_DIR)
    if result.best_weights.name != "best.pt":
        raise RuntimeError(f"training produced no best.pt in {result.run_dir}")
    final = {f"final_{k}": v for k, v in result.metrics.items()}
    mlflow.log_batch(
        run_id,
        metrics=[Metric(k, v, _now_ms(), 0) for k, v in final.items()],
        tags=[RunTag("visionloop.data_yaml", str(data_yaml))],
    )
