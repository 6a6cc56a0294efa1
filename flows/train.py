"""Train flow: a challenger from a dataset snapshot, tracked in MLflow, aliased `challenger`."""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict

from training.retrain_guard import update_run
from training.snapshots import SNAPSHOT_HASH_TAG, download_snapshot, get_snapshot
from training.tracking import tracked_training
from visionloop.db import session_scope
from visionloop.events import EventKind, emit
from visionloop.models import DatasetSnapshot
from visionloop.registry import (
    CHALLENGER,
    CHAMPION,
    ModelRef,
    download_weights,
    get_alias,
    register_weights,
)
from visionloop.settings import Settings, get_settings


class TrainedChallenger(BaseModel):
    """A trained and registered challenger."""

    model_config = ConfigDict(frozen=True)

    version: str
    run_id: str  # its MLflow run
    metrics: dict[str, float]  # validation metrics after the last epoch
    base_version: str | None  # the champion it was fine-tuned from; None when from scratch
    epochs: int


@dataclass(frozen=True)
class StartingPoint:
    """What training starts from: the champion's weights, or else the configured source."""

    base: ModelRef | None
    source: str  # a weights file or the model YAML

    @property
    def base_version(self) -> str | None:
        return self.base.version if self.base else None

    def describe(self) -> str:
        return f"champion version {self.base.version}" if self.base else self.source


def starting_point(settings: Settings, from_scratch: bool) -> StartingPoint:
    base = None if from_scratch else get_alias(settings, CHAMPION)
    if base is not None:
        return StartingPoint(
            base, str(download_weights(settings, base, settings.data_dir / "models"))
        )
    return StartingPoint(None, settings.initial_weights or settings.model_yaml)


class TrainingProgress:
    """Tells the world how a training goes: ``training.*`` events, log lines, and the MLflow run
    id on the retraining run while it is live (so a killed run can still have it ended)."""

    def __init__(self, snapshot: DatasetSnapshot, retraining_run_id: int | None) -> None:
        self.logger = get_run_logger()  # here: the epoch callbacks run outside the flow's context
        self.retraining_run_id = retraining_run_id
        self.context: dict[str, Any] = {
            "retraining_run_id": retraining_run_id,
            "snapshot_id": snapshot.id,
        }
        self.snapshot_hash = snapshot.manifest_hash

    def started(self, epochs: int, start: StartingPoint) -> None:
        emit(
            EventKind.TRAINING_STARTED,
            f"training a challenger on snapshot {self.snapshot_hash[:12]} for {epochs} epochs "
            f"from {start.describe()}",
            {
                **self.context,
                "stage": "train",
                "epochs": epochs,
                "base_version": start.base_version,
            },
        )

    def run_created(self, mlflow_run_id: str) -> None:
        self.context["mlflow_run_id"] = mlflow_run_id
        if self.retraining_run_id is not None:
            with session_scope() as session:
                update_run(session, self.retraining_run_id, mlflow_run_id=mlflow_run_id)

    def epoch(self, record: dict[str, Any]) -> None:
        self.logger.info(
            "epoch %s/%s box_loss=%.3f mAP50=%.3f mAP50-95=%.3f",
            record["epoch"],
            record["epochs"],
            record.get("box_loss", 0.0),
            record.get("mAP50", 0.0),
            record.get("mAP50-95", 0.0),
        )
        emit(
            EventKind.TRAINING_EPOCH,
            f"epoch {record['epoch']}/{record['epochs']}: mAP50 {record.get('mAP50', 0.0):.3f}",
            {**self.context, "stage": "train", **record},
        )

    def finished(self, trained: TrainedChallenger) -> None:
        emit(
            EventKind.TRAINING_FINISHED,
            f"challenger version {trained.version} trained "
            f"(validation mAP50 {trained.metrics.get('mAP50', 0.0):.3f})",
            {
                **self.context,
                "stage": "train",
                "version": trained.version,
                "metrics": trained.metrics,
            },
        )


def _provenance(
    snapshot: DatasetSnapshot, start: StartingPoint, trigger: str, retraining_run_id: int | None
) -> dict[str, str]:
    """The MLflow tags that say where a challenger came from."""
    return {
        "visionloop.trigger": trigger,
        SNAPSHOT_HASH_TAG: snapshot.manifest_hash,
        "visionloop.snapshot_id": str(snapshot.id),
        "visionloop.base_version": start.base_version or "",
        "visionloop.retraining_run_id": str(retraining_run_id or ""),
    }


@flow(name="train")
def train_flow(
    snapshot_id: int,
    epochs: int | None = None,
    batch: int | None = None,
    imgsz: int | None = None,
    from_scratch: bool = False,
    trigger: str = "manual",
    retraining_run_id: int | None = None,
) -> TrainedChallenger:
    """Fine-tune the champion (or train from the model YAML when there is none, or when
    ``from_scratch``) on the snapshot's train/val splits; register the result as `challenger`.

    Unset parameters come from the settings (``VISIONLOOP_TRAIN_EPOCHS``, ``_TRAIN_BATCH``,
    ``_IMAGE_SIZE``). Progress goes out as ``training.*`` events, one per epoch with losses and mAP.
    """
    settings = get_settings()
    overrides = {"image_size": imgsz, "train_batch": batch}
    run_settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    epochs = epochs or settings.train_epochs
    with session_scope() as session:
        snapshot = get_snapshot(session, snapshot_id)
    data_yaml = download_snapshot(settings, snapshot)
    start = starting_point(settings, from_scratch)

    progress = TrainingProgress(snapshot, retraining_run_id)
    progress.started(epochs, start)
    name = f"challenger-{snapshot.manifest_hash[:8]}-{uuid.uuid4().hex[:6]}"
    run_dir = settings.data_dir / "training" / name
    run_id, result = tracked_training(
        run_settings,
        data_yaml,
        model_source=start.source,
        run_dir=run_dir,
        epochs=epochs,
        run_name=name,
        tags=_provenance(snapshot, start, trigger, retraining_run_id),
        params={
            "snapshot_hash": snapshot.manifest_hash,
            "base_version": start.base_version or "none",
        },
        on_epoch=progress.epoch,
        on_run_created=progress.run_created,
    )
    ref = register_weights(settings, run_id, alias=CHALLENGER)
    shutil.rmtree(run_dir, ignore_errors=True)  # the weights live in MLflow now; one copy is enough
    trained = TrainedChallenger(
        version=ref.version,
        run_id=run_id,
        metrics=result.metrics,
        base_version=start.base_version,
        epochs=epochs,
    )
    progress.finished(trained)
    return trained
