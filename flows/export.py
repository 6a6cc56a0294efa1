"""Export flow: reviewed labels to a versioned YOLO snapshot (plus COCO and Label Studio JSON)."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from training.snapshots import export_reviewed_labels
from visionloop.formats import DEFAULT_TEST_PERCENT, DEFAULT_VAL_PERCENT, SplitPolicy
from visionloop.settings import get_settings


@flow(name="export-labels")
def export_flow(
    test_percent: int = DEFAULT_TEST_PERCENT, val_percent: int = DEFAULT_VAL_PERCENT
) -> dict[str, Any]:
    """Snapshot every reviewed label; the same labels give the same snapshot (and hash)."""
    result = export_reviewed_labels(get_settings(), policy=SplitPolicy(test_percent, val_percent))
    training, holdout = result.training, result.holdout
    get_run_logger().info(
        "%s snapshot %s: %d train, %d val, %d test images; held-out set %s",
        "new" if result.created else "existing",
        training.manifest_hash[:12],
        training.num_train,
        training.num_val,
        training.num_test,
        holdout.manifest_hash[:12],
    )
    return {
        "snapshot_id": training.id,
        "snapshot_hash": training.manifest_hash,
        "holdout_id": holdout.id,
        "holdout_hash": holdout.manifest_hash,
        "created": result.created,
        "counts": {"train": training.num_train, "val": training.num_val, "test": training.num_test},
    }
