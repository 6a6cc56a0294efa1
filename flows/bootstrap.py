"""Bootstrap: train the first model on a generated seed set so the loop always has a champion."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task

from flows import server_retries
from flows.serving_exports import export_for_serving
from training.snapshots import SNAPSHOT_HASH_TAG, materialise, yolo_folder_sources
from training.tracking import tracked_training
from visionloop.db import session_scope
from visionloop.events import EventKind, emit
from visionloop.registry import CHAMPION, ModelRef, get_alias, register_weights
from visionloop.settings import get_settings
from visionloop.synthetic import write_yolo_dataset


@task
def generate_seed_set(images: int, seed: int) -> str:
    settings = get_settings()
    root = settings.data_dir / "bootstrap" / f"seed-{seed}-n{images}-s{settings.image_size}"
    n_val = max(8, images // 3)
    data_yaml = write_yolo_dataset(
        root,
        n_train=images,
        n_val=n_val,
        seed=seed,
        size=settings.image_size,
        class_names=settings.class_names,
    )
    return str(data_yaml)


@task(**server_retries())
def snapshot_seed_set(data_yaml: str) -> str:
    """The seed set as a `bootstrap` snapshot: the first champion's training reference (drift)."""
    settings = get_settings()
    sources = yolo_folder_sources(Path(data_yaml), settings.class_names)
    with session_scope() as session:
        snapshot, _, _ = materialise(session, settings, sources, kind="bootstrap")
    return snapshot.manifest_hash


@task
def train_seed_model(
    data_yaml: str, epochs: int, snapshot_hash: str
) -> tuple[str, dict[str, float]]:
    settings = get_settings()
    logger = get_run_logger()
    source = settings.initial_weights or settings.model_yaml

    def on_epoch(record: dict) -> None:
        logger.info(
            "epoch %s/%s mAP50=%.3f", record["epoch"], record["epochs"], record.get("mAP50", 0.0)
        )
        emit(
            EventKind.TRAINING_EPOCH,
            f"bootstrap epoch {record['epoch']}/{record['epochs']}",
            record,
        )

    run_id, result = tracked_training(
        settings,
        Path(data_yaml),
        model_source=source,
        run_dir=settings.data_dir / "training" / "bootstrap",
        epochs=epochs,
        run_name="bootstrap",
        tags={"visionloop.trigger": "bootstrap", SNAPSHOT_HASH_TAG: snapshot_hash},
        on_epoch=on_epoch,
    )
    return run_id, result.metrics


@task(**server_retries())
def register_champion(run_id: str) -> ModelRef:
    return register_weights(get_settings(), run_id, alias=CHAMPION)


@flow(name="bootstrap", log_prints=True)
def bootstrap_flow(
    epochs: int | None = None, images: int | None = None, force: bool = False
) -> dict:
    """Register a first `champion` unless one exists (``force`` trains a new one anyway)."""
    settings = get_settings()
    existing = get_alias(settings, CHAMPION)
    if existing is not None and not force:
        return {"created": False, "version": existing.version, "run_id": existing.run_id}

    emit(EventKind.TRAINING_STARTED, "bootstrap training started")
    data_yaml = generate_seed_set(images or settings.bootstrap_images, settings.seed)
    snapshot_hash = snapshot_seed_set(data_yaml)
    run_id, metrics = train_seed_model(data_yaml, epochs or settings.train_epochs, snapshot_hash)
    ref = register_champion(run_id)
    export_for_serving(ref.version)
    emit(
        EventKind.MODEL_PROMOTED,
        f"bootstrap model version {ref.version} is the champion "
        f"(mAP50 {metrics.get('mAP50', 0):.3f})",
        {"version": ref.version, "run_id": run_id, "metrics": metrics},
    )
    return {"created": True, "version": ref.version, "run_id": run_id, "metrics": metrics}
