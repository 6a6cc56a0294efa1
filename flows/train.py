"""Train flow: a challenger from a dataset snapshot, tracked in MLflow, aliased `challenger`."""

from __future__ import annotations

import shutil
import uuid
from typing import Any

from prefect import flow, get_run_logger

from training.retrain_guard import update_run
from training.snapshots import SNAPSHOT_HASH_TAG, download_snapshot, get_snapshot
from training.tracking import tracked_training
from visionloop.events import EventKind, emit
from visionloop.registry import CHALLENGER, CHAMPION, download_weights, get_alias, register_weights
from visionloop.settings import get_settings


@flow(name="train")
def train_flow(
    snapshot_id: int,
    epochs: int | None = None,
    batch: int | None = None,
    imgsz: int | None = None,
    from_scratch: bool = False,
    trigger: str = "manual",
    retraining_run_id: int | None = None,
) -> dict[str, Any]:
    """Fine-tune the champion (or train from the model YAML when there is none, or when
    ``from_scratch``) on the snapshot's train/val splits; register the result as `challenger`.

    Unset parameters come from the settings (``VISIONLOOP_TRAIN_EPOCHS``, ``_TRAIN_BATCH``,
    ``_IMAGE_SIZE``). Progress goes out as ``training.*`` events, one per epoch with losses and mAP.
    """
    settings = get_settings()
    logger = get_run_logger()
    overrides = {"image_size": imgsz, "train_batch": batch}
    run_settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    epochs = epochs or settings.train_epochs
    snapshot = get_snapshot(snapshot_id)
    data_yaml = download_snapshot(settings, snapshot)

    base = None if from_scratch else get_alias(settings, CHAMPION)
    if base is not None:
        source = str(download_weights(settings, base, settings.data_dir / "models"))
    else:
        source = settings.initial_weights or settings.model_yaml
    context = {"retraining_run_id": retraining_run_id, "snapshot_id": snapshot.id}
    emit(
        EventKind.TRAINING_STARTED,
        f"training a challenger on snapshot {snapshot.manifest_hash[:12]} for {epochs} epochs from "
        + (f"champion version {base.version}" if base else source),
        {
            **context,
            "stage": "train",
            "epochs": epochs,
            "base_version": base.version if base else None,
        },
    )

    def on_run_created(mlflow_run_id: str) -> None:
        context["mlflow_run_id"] = mlflow_run_id
        if retraining_run_id is not None:
            update_run(retraining_run_id, mlflow_run_id=mlflow_run_id)

    def on_epoch(record: dict[str, Any]) -> None:
        logger.info(
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
            {**context, "stage": "train", **record},
        )

    name = f"challenger-{snapshot.manifest_hash[:8]}-{uuid.uuid4().hex[:6]}"
    run_dir = settings.data_dir / "training" / name
    run_id, result = tracked_training(
        run_settings,
        data_yaml,
        model_source=source,
        run_dir=run_dir,
        epochs=epochs,
        run_name=name,
        tags={
            "visionloop.trigger": trigger,
            SNAPSHOT_HASH_TAG: snapshot.manifest_hash,
            "visionloop.snapshot_id": str(snapshot.id),
            "visionloop.base_version": base.version if base else "",
            "visionloop.retraining_run_id": str(retraining_run_id or ""),
        },
        params={
            "snapshot_hash": snapshot.manifest_hash,
            "base_version": base.version if base else "none",
        },
        on_epoch=on_epoch,
        on_run_created=on_run_created,
    )
    ref = register_weights(settings, run_id, alias=CHALLENGER)
    shutil.rmtree(run_dir, ignore_errors=True)  # the weights live in MLflow now; one copy is enough
    emit(
        EventKind.TRAINING_FINISHED,
        f"challenger version {ref.version} trained "
        f"(validation mAP50 {result.metrics.get('mAP50', 0.0):.3f})",
        {**context, "stage": "train", "version": ref.version, "metrics": result.metrics},
    )
    return {
        "version": ref.version,
        "run_id": run_id,
        "metrics": result.metrics,
        "base_version": base.version if base else None,
        "epochs": epochs,
    }
