"""The platform database: every fact the loop owns (ARCHITECTURE.md, "Where each fact lives").

Facts owned elsewhere are referenced, never copied: model versions by their MLflow version
string, review tasks by their Label Studio task id, flow runs by their Prefect flow-run id.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Index,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


class ImageStatus(str, enum.Enum):
    ingested = "ingested"
    predicted = "predicted"
    queued = "queued"
    labeled = "labeled"
    quarantined = "quarantined"


class QueueStatus(str, enum.Enum):
    pending = "pending"
    labeled = "labeled"
    approved = "approved"
    skipped = "skipped"
    cancelled = "cancelled"


class Verdict(str, enum.Enum):
    """The reviewer's judgement of the champion's pre-annotation."""

    accepted = "accepted"
    corrected = "corrected"
    rejected = "rejected"


class BoxVerdict(str, enum.Enum):
    """The reviewer's verdict on one box: the champion's box kept as it was (``correct``),
    wrong (``incorrect``: it trains as absent), moved or relabelled (``adjusted``), or an
    object the champion did not box (``missed``)."""

    correct = "correct"
    incorrect = "incorrect"
    adjusted = "adjusted"
    missed = "missed"


class RetrainStatus(str, enum.Enum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class DriftLevel(str, enum.Enum):
    green = "green"
    yellow = "yellow"
    red = "red"


class Image(SQLModel, table=True):
    __tablename__ = "images"
    __table_args__ = (Index("ix_images_status_created", "status", "created_at"),)

    id: int | None = Field(default=None, primary_key=True)
    content_hash: str = Field(sa_type=String(64), unique=True, index=True)
    object_key: str = Field(sa_type=String(1024), description="Key in the images bucket.")
    source_key: str | None = Field(default=None, sa_type=String(1024))
    source_version: str | None = Field(
        default=None,
        sa_type=String(128),
        description="The source's version when it was read (S3 ETag; size and mtime of a file): "
        "a name whose content changed is read again.",
    )
    size_bytes: int = 0
    width: int | None = None
    height: int | None = None
    format: str | None = Field(default=None, sa_type=String(16))
    features: dict[str, float] | None = Field(default=None, sa_type=JSON)
    status: ImageStatus = Field(default=ImageStatus.ingested, sa_type=String(16), index=True)
    quarantine_reason: str | None = Field(default=None, sa_type=Text)
    created_at: datetime = Field(
        default_factory=utcnow, sa_type=DateTime(timezone=True), index=True
    )


class IngestAttempt(SQLModel, table=True):
    """A file's ingest batches that started without giving it an outcome yet.

    Committed before its batch works on it and deleted once the file has an outcome, so a row
    that stays says its batch crashed (the process died) or timed out."""

    __tablename__ = "ingest_attempts"
    __table_args__ = (
        UniqueConstraint("source_key", "source_version", name="uq_ingest_attempts_source"),
    )

    id: int | None = Field(default=None, primary_key=True)
    source_key: str = Field(sa_type=String(1024))
    source_version: str = Field(default="", sa_type=String(128))
    attempts: int = 0
    last_error: str | None = Field(default=None, sa_type=Text)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))


class Prediction(SQLModel, table=True):
    __tablename__ = "predictions"
    __table_args__ = (
        UniqueConstraint("image_id", "model_version", name="uq_predictions_image_model"),
    )

    id: int | None = Field(default=None, primary_key=True)
    image_id: int = Field(foreign_key="images.id", index=True)
    model_version: str = Field(sa_type=String(64), index=True)
    boxes: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSON)
    num_boxes: int = 0
    mean_confidence: float | None = None
    max_confidence: float | None = None
    min_confidence: float | None = None
    uncertainty: float | None = Field(default=None, description="Higher means less sure.")
    below: list[list[float]] | None = Field(
        default=None,
        sa_type=JSON,
        description="Candidate boxes under the display threshold, ``[cls, conf]`` pairs, most "
        "confident first: what the model almost saw.",
    )
    embedding: bytes | None = Field(
        default=None,
        sa_type=LargeBinary,
        description="The image's pooled backbone features from the same forward pass, float16, "
        "L2-normalised; comparable only between predictions of one model version.",
    )
    source: str = Field(default="ingest", sa_type=String(16), description="ingest | api")
    created_at: datetime = Field(
        default_factory=utcnow, sa_type=DateTime(timezone=True), index=True
    )


class LabelingQueueItem(SQLModel, table=True):
    """Seed 004's labeling_queue, linked to the Label Studio task that serves it."""

    __tablename__ = "labeling_queue"
    __table_args__ = (
        Index("ix_labeling_queue_status_created", "status", "created_at"),
        # The queue statistics' counts, read from the indexes alone (migration 0004).
        Index("ix_labeling_queue_reason_status", "flagged_reason", "status"),
        Index(
            "ix_labeling_queue_sync_error",
            "id",
            sqlite_where=text("sync_error IS NOT NULL"),
            postgresql_where=text("sync_error IS NOT NULL"),
        ),
        # A cycle's first item in one probe: the ledger's newest cycles.
        Index("ix_labeling_queue_cycle_id", "cycle", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    image_id: int = Field(foreign_key="images.id", unique=True)
    prediction_id: int | None = Field(default=None, foreign_key="predictions.id")
    image_path: str = Field(sa_type=String(1024))
    confidence_score: float | None = None
    status: QueueStatus = Field(default=QueueStatus.pending, sa_type=String(16), index=True)
    flagged_reason: str = Field(sa_type=String(100), index=True)
    arm: str = Field(
        default="selected",
        sa_type=String(16),
        index=True,
        description="selected | control | audit: control items are a uniform random draw, kept "
        "apart so the ledger can compare selection against them.",
    )
    cycle: str | None = Field(
        default=None, sa_type=String(64), index=True, description="The selection cycle (run)."
    )
    score_parts: dict[str, float] | None = Field(
        default=None, sa_type=JSON, description="Why it was chosen: each scoring part's value."
    )
    label_studio_task_id: int | None = Field(default=None, unique=True)
    human_label: str | None = Field(default=None, sa_type=String(100))
    reviewer_notes: str | None = Field(default=None, sa_type=Text)
    sync_error: str | None = Field(
        default=None, sa_type=Text, description="Why the last annotation synced was rejected."
    )
    rejected_annotation: str | None = Field(
        default=None,
        sa_type=String(100),
        description="The annotation an approver sent back (``<id>@<updated_at>``): the sync "
        "passes over it until the reviewer submits or updates one.",
    )
    created_at: datetime = Field(
        default_factory=utcnow, sa_type=DateTime(timezone=True), index=True
    )
    labeled_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))


class ReviewedLabel(SQLModel, table=True):
    """Seed 004's reviewed_labels, one row per image, boxes in YOLO-normalised form."""

    __tablename__ = "reviewed_labels"
    __table_args__ = (Index("ix_reviewed_labels_created", "created_at"),)

    id: int | None = Field(default=None, primary_key=True)
    image_id: int = Field(foreign_key="images.id", unique=True)
    image_path: str = Field(sa_type=String(1024))
    label: str | None = Field(default=None, sa_type=String(100), description="Dominant class.")
    boxes: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSON)
    confidence: float | None = None
    reviewer: str | None = Field(default=None, sa_type=String(255))
    verdict: Verdict = Field(sa_type=String(16), index=True)
    label_studio_task_id: int | None = None
    label_studio_annotation_id: int | None = None
    prediction_model_version: str | None = Field(default=None, sa_type=String(64))
    used_for_training: bool = Field(default=False, index=True)
    box_feedback: list[dict[str, Any]] | None = Field(
        default=None,
        sa_type=JSON,
        description="The reviewer's verdict on each box: the champion's (correct, incorrect, "
        "adjusted) and the ones it missed (labeling.verdicts).",
    )
    approved_by: str | None = Field(default=None, sa_type=String(255))
    approved_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True), index=True)
    stats_parts: list[list[Any]] | None = Field(
        default=None,
        sa_type=JSON,
        description="What this label adds to the per-class box counters: ``[name, predicted, "
        "reviewed, matched]`` per class under the counters' class map; null when its judged "
        "prediction is unknown (kept by visionloop.stats_counters).",
    )
    created_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))


class DatasetSnapshot(SQLModel, table=True):
    __tablename__ = "dataset_snapshots"

    id: int | None = Field(default=None, primary_key=True)
    manifest_hash: str = Field(sa_type=String(64), unique=True, index=True)
    kind: str = Field(
        default="training",
        sa_type=String(16),
        index=True,
        description="training | holdout | bootstrap",
    )
    object_prefix: str = Field(sa_type=String(1024))
    manifest_key: str | None = Field(default=None, sa_type=String(1024))
    num_images: int = 0
    num_train: int = 0
    num_val: int = 0
    num_test: int = 0
    class_names: list[str] = Field(default_factory=list, sa_type=JSON)
    profile: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    holdout_version: int | None = Field(
        default=None, index=True, description="A frozen held-out set's version (holdout only)."
    )
    created_at: datetime = Field(
        default_factory=utcnow, sa_type=DateTime(timezone=True), index=True
    )


class RetrainingRun(SQLModel, table=True):
    __tablename__ = "retraining_runs"
    __table_args__ = (Index("ix_retraining_runs_status_started", "status", "started_at"),)

    id: int | None = Field(default=None, primary_key=True)
    trigger: str = Field(
        sa_type=String(32), description="drift | labels | manual | schedule | bootstrap"
    )
    reason: str = Field(default="", sa_type=Text)
    status: RetrainStatus = Field(default=RetrainStatus.pending, sa_type=String(16), index=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    started_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    finished_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    prefect_flow_run_id: str | None = Field(default=None, sa_type=String(64), index=True)
    mlflow_run_id: str | None = Field(default=None, sa_type=String(64))
    snapshot_id: int | None = Field(default=None, foreign_key="dataset_snapshots.id")
    model_version: str | None = Field(default=None, sa_type=String(64))
    metrics: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    promoted: bool | None = None
    decision_reasons: list[str] = Field(default_factory=list, sa_type=JSON)
    error: str | None = Field(default=None, sa_type=Text)
    # Non-null only while a run holds the single-retrain guard: a unique index on it makes a
    # second concurrent holder impossible at the database level.
    active_lock: str | None = Field(default=None, sa_type=String(16), unique=True)


class DriftResult(SQLModel, table=True):
    __tablename__ = "drift_results"

    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = Field(
        default_factory=utcnow, sa_type=DateTime(timezone=True), index=True
    )
    model_version: str | None = Field(default=None, sa_type=String(64))
    stat_test: str = Field(sa_type=String(32))
    drift_score: float
    drift_share: float
    dataset_drift: bool = False
    level: DriftLevel = Field(sa_type=String(8), index=True)
    window_size: int = 0
    reference_size: int = 0
    features: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    report_key: str | None = Field(default=None, sa_type=String(1024))


class ActivityEvent(SQLModel, table=True):
    __tablename__ = "activity_events"
    __table_args__ = (
        Index("ix_activity_events_kind_created", "kind", "created_at"),
        # The newest events of one kind without walking past the others (migration 0004).
        Index("ix_activity_events_kind_id", "kind", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = Field(
        default_factory=utcnow, sa_type=DateTime(timezone=True), index=True
    )
    kind: str = Field(sa_type=String(64), description="ingest.progress, training.epoch, ...")
    level: str = Field(default="info", sa_type=String(16))
    message: str = Field(default="", sa_type=Text)
    payload: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)


class StatsCounter(SQLModel, table=True):
    """A running total behind the review-queue statistics (visionloop.stats_counters keeps
    them in step with the rows they count, in the same transaction)."""

    __tablename__ = "stats_counters"

    kind: str = Field(sa_type=String(16), primary_key=True)
    key: str = Field(default="", sa_type=Text, primary_key=True)
    part: str = Field(default="", sa_type=String(16), primary_key=True)
    n: int = Field(default=0, sa_type=BigInteger)


# Every process that writes rows imports this module, so the counters' session hooks are
# registered wherever a write can happen; imported last because they use the classes above.
from visionloop import stats_counters as _stats_counters  # noqa: E402, F401
