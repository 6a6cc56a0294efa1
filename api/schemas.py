"""Response and request bodies: what the OpenAPI spec promises, field by field.

Times are always UTC with an offset (SQLite hands stored times back without one).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import Path as PathParam
from fastapi import Query
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    computed_field,
)

from visionloop.models import BoxVerdict


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


UtcDatetime = Annotated[datetime, AfterValidator(_utc)]


def _iso(value: object) -> object:
    # pydantic would also read "0.5" as a Unix time; a query parameter documented as a
    # date-time should be one.
    return datetime.fromisoformat(value) if isinstance(value, str) else value


IsoDatetime = Annotated[datetime, BeforeValidator(_iso), AfterValidator(_utc)]
"""A date-time query parameter: ISO 8601 only (``2026-01-31T12:00:00Z``), in UTC (naive: UTC)."""

VERSION_PATTERN = r"^[1-9][0-9]{0,8}$"
"""A registry version number (MLflow's registry answers 500 past its integer range)."""
MAX_ID = 2**31 - 1
"""Row ids are 32-bit integers in PostgreSQL: larger ids cannot exist (and would overflow)."""
Offset = Annotated[int, Query(ge=0, le=MAX_ID, description="Rows to skip.")]
ItemId = Annotated[int, PathParam(ge=1, le=MAX_ID)]
"""A queue item's id in the path."""
"""Bounded: the database refuses an OFFSET past its integer range."""

T = TypeVar("T")


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class Page(Out, Generic[T]):
    total: int = Field(description="How many match the filters in all.")
    limit: int
    offset: int
    items: list[T]


# --- retraining ----------------------------------------------------------------------------


class RetrainingRunOut(Out):
    id: int
    trigger: str
    reason: str
    status: str
    created_at: UtcDatetime
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None
    prefect_flow_run_id: str | None
    mlflow_run_id: str | None
    snapshot_id: int | None
    model_version: str | None
    promoted: bool | None
    decision_reasons: list[str]
    metrics: dict[str, Any] | None
    error: str | None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def report_url(self) -> str | None:
        """Where the run's report is (data-bearing): runs that reached a verdict write one."""
        return f"/api/retraining/runs/{self.id}/report" if self.status == "succeeded" else None


class ConditionOut(Out):
    name: str
    kind: Literal["trigger", "blocker"]
    value: Any = Field(description="The measured value (a level, a count, hours, a flag).")
    threshold: Any
    fired: bool
    reason: str


class ConditionsOut(Out):
    should_retrain: bool
    trigger: str | None = Field(
        description="The first trigger that fired, when a retrain should start."
    )
    summary: str
    conditions: list[ConditionOut]
    manual_request_id: int | None


class ProgressOut(Out):
    stage: str | None = Field(description="export, train, evaluate, promote or notify.")
    epoch: int | None
    epochs: int | None
    metrics: dict[str, float] = Field(
        description="The latest epoch's losses and validation metrics."
    )


class RetrainingStatusOut(Out):
    status: Literal["idle", "running", "completed", "failed"] = Field(
        description="`running` while a retrain is queued or running, else how the last one "
        "ended (`failed` covers cancelled), `idle` before the first."
    )
    last_retrain_time: UtcDatetime | None = Field(
        description="When the last retrain finished, whatever its outcome."
    )
    drift_detected: bool = Field(description="The latest drift check's level is yellow or red.")
    new_labels_count: int = Field(
        description="Reviewed labels not yet used by a training (the `new_labels` condition)."
    )
    should_retrain: bool = Field(description="Whether the conditions would start a retrain now.")
    state: Literal["idle", "queued", "running"]
    current: RetrainingRunOut | None
    progress: ProgressOut | None
    last_finished: RetrainingRunOut | None
    champion_version: str | None
    conditions: ConditionsOut
    state_note: str | None = Field(
        description="Set while a run is queued or running: its state is the database's, "
        "reconciled with Prefect by the trigger and the check-retrain flow, so it may be stale."
    )


class TriggerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(
        default="", max_length=2000, description="Why, for the run's record and the feed."
    )


class TriggerOut(Out):
    job_id: int = Field(description="The retraining run's id: the job to follow.")
    retraining_run_id: int
    flow_run_id: str
    status_url: str


# --- labelling -----------------------------------------------------------------------------


class QueueItemOut(Out):
    id: int
    image_id: int
    prediction_id: int | None
    image_path: str
    confidence_score: float | None
    status: str
    flagged_reason: str
    arm: str = Field(
        description="selected | control | audit: control items are a uniform random draw the "
        "label-savings ledger compares selection against."
    )
    cycle: str | None = Field(description="The selection cycle (the ingest flow run) it is from.")
    score_parts: dict[str, float] | None = Field(
        description="Why it was chosen: each scoring part's value (uncertainty, novelty, ...)."
    )
    label_studio_task_id: int | None
    human_label: str | None
    reviewer_notes: str | None
    sync_error: str | None
    created_at: UtcDatetime
    labeled_at: UtcDatetime | None


class LabelBoxIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, description="A class of the project.")
    cx: float = Field(ge=0, le=1, description="Box centre x, 0..1 of the image width.")
    cy: float = Field(ge=0, le=1)
    w: float = Field(gt=0, le=1, description="Box width, 0..1 of the image width.")
    h: float = Field(gt=0, le=1)
    prediction: int | None = Field(
        default=None,
        ge=0,
        le=100_000,
        description="The champion's box this is (its index in the item's prediction); "
        "absent for a box the champion missed. A predicted box left out was incorrect.",
    )
    verdict: BoxVerdict | None = Field(
        default=None,
        description="The reviewer's verdict on this box; absent, it is read off the edit "
        "(kept as is: correct, moved or relabelled: adjusted, new: missed). An 'incorrect' box "
        "is kept in Label Studio and left out of training.",
    )


class LabelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    boxes: list[LabelBoxIn] = Field(
        default_factory=list, max_length=500, description="Empty: nothing to box here."
    )
    notes: str | None = Field(default=None, max_length=5000)


class ApproveIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reviewer: str = Field(
        min_length=1, max_length=255, description="Who approves: not who made the label."
    )


class RejectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reviewer: str = Field(min_length=1, max_length=255, description="Who sends it back.")
    reason: str = Field(
        min_length=1, max_length=2000, description="Shown to the reviewer in Label Studio."
    )


class ReviewedLabelOut(Out):
    image_id: int
    boxes: list[dict[str, Any]] = Field(description="YOLO-normalised reviewed boxes.")
    box_feedback: list[dict[str, Any]] | None = Field(
        description="One verdict per box involved (correct, incorrect, adjusted, missed), "
        "'by' the reviewer's choice or read off their edit."
    )
    verdict: str = Field(description="The image's verdict: accepted, corrected or rejected.")
    reviewer: str | None
    approved_by: str | None
    approved_at: UtcDatetime | None
    label_studio_annotation_id: int | None
    used_for_training: bool


class ReviewOut(Out):
    item: QueueItemOut
    label: ReviewedLabelOut | None
    changed: bool = Field(description="False: the same had been done already; nothing changed.")


class ClassErrorsOut(Out):
    name: str
    predicted: int = Field(description="Boxes the model predicted on reviewed images.")
    reviewed: int = Field(description="Boxes the reviewers kept or drew.")
    matched: int
    false_positives: int
    missed: int
    error_rate: float | None = Field(description="(false positives + misses) / boxes involved.")


class QueueStatsOut(Out):
    total: int
    pending: int
    labeled: int
    approved: int
    by_status: dict[str, int]
    by_reason: dict[str, dict[str, int]] = Field(description="Flagged reason -> status -> count.")
    sync_errors: int = Field(description="Items whose last annotation could not be used.")
    verdicts: dict[str, int] = Field(description="accepted / corrected / rejected pre-annotations.")
    agreement: float | None = Field(
        description="Share of reviewed pre-annotations accepted unchanged."
    )
    compared_images: int = Field(
        description="Reviewed images the class error rates are computed on."
    )
    classes: list[ClassErrorsOut]


class SnapshotOut(Out):
    id: int
    manifest_hash: str
    kind: str
    num_images: int
    num_train: int
    num_val: int
    num_test: int
    class_names: list[str]
    created_at: UtcDatetime
    holdout_version: int | None = Field(
        default=None,
        description="For a frozen held-out set (kind holdout): its version number, which the "
        "retrain that was judged on it names; versions never change once sealed.",
    )
    profile: dict[str, Any] | None = Field(
        description="Class balance, boxes per image, box and image sizes, near-duplicates and "
        "split leaks, as computed when the snapshot was made."
    )


# --- drift ---------------------------------------------------------------------------------


class FeatureDriftOut(Out):
    name: str
    statistic: float = Field(description="p-value for p-value tests, the distance otherwise.")
    p_value: float | None
    threshold: float
    drifted: bool
    severity: float


class DriftOut(Out):
    id: int
    created_at: UtcDatetime
    model_version: str | None
    stat_test: str
    drift_score: float
    drift_share: float
    p_value: float | None = Field(
        description="Bonferroni-adjusted smallest p-value (p-value tests only)."
    )
    dataset_drift: bool
    level: Literal["green", "yellow", "red"]
    window_size: int
    reference_size: int
    features: list[FeatureDriftOut]
    report_url: str | None


class DriftPointOut(Out):
    id: int
    created_at: UtcDatetime
    level: Literal["green", "yellow", "red"]
    drift_score: float
    drift_share: float
    model_version: str | None


class DriftHistoryOut(Out):
    yellow: float = Field(description="Scores from here up are yellow (VISIONLOOP_DRIFT_YELLOW).")
    red: float = Field(description="Scores from here up are red (VISIONLOOP_DRIFT_RED).")
    points: list[DriftPointOut] = Field(description="Oldest first.")


# --- models --------------------------------------------------------------------------------


class ModelVersionOut(Out):
    version: str
    aliases: list[str]
    created_at: UtcDatetime
    status: str
    run_id: str | None
    source: str
    trigger: str | None
    snapshot_hash: str | None = Field(
        description="Manifest hash of the snapshot it was trained on."
    )
    metrics: dict[str, float]


class ModelsOut(Out):
    model_name: str
    champion: str | None
    aliases: dict[str, str] = Field(description="Alias -> version.")
    versions: list[ModelVersionOut] = Field(description="Newest first.")


class PromoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=2000)


class RollbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to_version: str | None = Field(
        default=None,
        pattern=VERSION_PATTERN,
        description="Default: the version under the alias `previous`.",
    )
    reason: str = Field(default="", max_length=2000)


class AliasChangeOut(Out):
    champion: str = Field(description="The champion's version now.")
    previous: str | None = Field(description="The version it replaced, now under `previous`.")
    changed: bool = Field(description="False: it already was the champion.")


# --- serving -------------------------------------------------------------------------------


class BoxOut(Out):
    cls: int
    name: str
    conf: float
    x1: float = Field(description="Left edge, 0..1 of the upright image's width.")
    y1: float
    x2: float
    y2: float


class PredictionOut(Out):
    model_version: str
    boxes: list[BoxOut]
    image_id: int
    prediction_id: int
    content_hash: str
    width: int
    height: int
    new_image: bool = Field(description="False: the same bytes were seen before.")
    flagged_reason: str | None = Field(
        description="Why it was queued for review; None: it was not."
    )


class StoredImageOut(Out):
    bucket: str
    key: str
    content_hash: str
    size_bytes: int
    format: str
    width: int
    height: int
    created: bool = Field(description="False: the same bytes were uploaded before.")


# --- system --------------------------------------------------------------------------------


class ServiceHealthOut(Out):
    name: str
    url: str
    ok: bool
    latency_ms: float
    detail: str
    setting: str = Field(description="The setting to look at when it is down.")


class HealthOut(Out):
    healthy: bool
    services: list[ServiceHealthOut]


class RequestStatsOut(Out):
    window_s: float
    requests: int
    requests_per_minute: float
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    error_rate: float | None = Field(description="Share of 5xx answers in the window.")
    client_error_rate: float | None = Field(description="Share of 4xx answers in the window.")
    predictions_per_minute: float


class ResourcesOut(Out):
    cpu_percent: float
    cpu_count: int
    load_average: list[float]
    memory_percent: float
    memory_used_bytes: int
    memory_total_bytes: int
    disk_percent: float
    disk_used_bytes: int
    disk_total_bytes: int
    disk_path: str
    network_sent_bytes: int
    network_received_bytes: int
    network_sent_per_s: float | None
    network_received_per_s: float | None
    process_memory_bytes: int
    process_cpu_percent: float
    uptime_s: float
    api: RequestStatsOut


class LinksOut(Out):
    prefect_ui: str
    label_studio: str
    mlflow: str
    api_docs: str


class InfoOut(Out):
    name: str
    version: str
    model_name: str
    class_names: list[str]
    links: LinksOut


# --- events --------------------------------------------------------------------------------


class EventOut(Out):
    id: int
    created_at: UtcDatetime
    kind: str
    level: str
    message: str
    payload: dict[str, Any]


# --- label-savings ledger ------------------------------------------------------------------


class LedgerIntervalOut(Out):
    low: float
    high: float


class LedgerArmOut(Out):
    queued: int
    reviewed: int = Field(description="Reviewed images whose shown prediction is known.")
    errors_per_image: float | None = Field(
        description="Champion errors per reviewed image: shown boxes corrected + boxes missed."
    )
    corrected_per_image: float | None = Field(
        description="Shown boxes the reviewer deleted, moved or relabelled, per image."
    )
    missed_per_image: float | None = Field(description="Boxes the reviewer added, per image.")
    error_rate: float | None = Field(description="Share of reviewed images with any error.")


class LedgerRowOut(Out):
    cycle: str | None = Field(description="The selection cycle (ingest run); null: all together.")
    started_at: UtcDatetime | None
    selected: LedgerArmOut
    control: LedgerArmOut = Field(description="The uniform random draw of the same cycle.")
    enough: bool = Field(description="Enough reviewed images in both arms to compare.")
    difference: float | None = Field(description="Errors per image, selected - control.")
    difference_interval: LedgerIntervalOut | None
    ratio: float | None = Field(description="Errors per image, selected / control.")
    ratio_interval: LedgerIntervalOut | None = Field(
        description="Null where some resamples have no control error (no upper end)."
    )
    rate_difference: float | None = Field(description="Error rate, selected - control.")
    summary: str = Field(description="The comparison in plain words.")


class LedgerOut(Out):
    cycles: list[LedgerRowOut] = Field(description="Per cycle, oldest first.")
    cumulative: LedgerRowOut = Field(description="The same cycles' reviewed images together.")
    level: float = Field(description="The intervals' confidence level (bootstrap percentiles).")
    resamples: int
    min_reviewed_controls: int


# --- flow runs (Prefect's) ---------------------------------------------------------------------


class FlowRunOut(Out):
    id: str
    name: str
    flow: str
    deployment: str | None = Field(description="None for a run started outside a deployment.")
    state: str = Field(description="Prefect's state name: Scheduled, Running, Completed...")
    state_type: str
    final: bool
    expected_start: UtcDatetime | None
    start: UtcDatetime | None
    end: UtcDatetime | None
    duration_s: float | None = Field(description="Run time so far while it runs.")
    parameters: dict[str, Any]


class LogLineOut(Out):
    index: int = Field(description="Position in the run's log; pass it as `after` to resume.")
    timestamp: UtcDatetime
    level: str
    logger: str
    message: str


class FeedbackDayOut(Out):
    day: date
    reviewed: int
    accepted: int
    corrected: int
    rejected: int
    error_rate: float | None = Field(
        description="Share of the day's reviews that corrected or rejected the champion's answer."
    )
