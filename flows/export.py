"""Export flow: reviewed labels to a versioned YOLO snapshot (plus COCO and Label Studio JSON)."""

from __future__ import annotations

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict

from training.snapshots import ExportResult, export_reviewed_labels
from visionloop.db import session_scope
from visionloop.formats import DEFAULT_TEST_PERCENT, DEFAULT_VAL_PERCENT, SplitPolicy
from visionloop.settings import get_settings


class ExportedSnapshot(BaseModel):
    """A training snapshot and the held-out set that goes with it, by id and content hash."""

    model_config = ConfigDict(frozen=True)

    snapshot_id: int
    snapshot_hash: str
    holdout_id: int
    holdout_hash: str
    created: bool  # False: the same labels were exported before, the snapshot is reused
    counts: dict[str, int]  # images per split: train, val, test

    @classmethod
    def of(cls, result: ExportResult) -> ExportedSnapshot:
        training, holdout = result.training, result.holdout
        assert training.id is not None and holdout.id is not None
        return cls(
            snapshot_id=training.id,
            snapshot_hash=training.manifest_hash,
            holdout_id=holdout.id,
            holdout_hash=holdout.manifest_hash,
            created=result.created,
            counts={
                "train": training.num_train,
                "val": training.num_val,
                "test": training.num_test,
            },
        )


@flow(name="export-labels")
def export_flow(
    test_percent: int = DEFAULT_TEST_PERCENT, val_percent: int = DEFAULT_VAL_PERCENT
) -> ExportedSnapshot:
    """Snapshot every reviewed label; the same labels give the same snapshot (and hash)."""
    with session_scope() as session:
        result = export_reviewed_labels(
            session, get_settings(), policy=SplitPolicy(test_percent, val_percent)
        )
    exported = ExportedSnapshot.of(result)
    get_run_logger().info(
        "%s snapshot %s: %d train, %d val, %d test images; held-out set %s",
        "new" if exported.created else "existing",
        exported.snapshot_hash[:12],
        exported.counts["train"],
        exported.counts["val"],
        exported.counts["test"],
        exported.holdout_hash[:12],
    )
    return exported
