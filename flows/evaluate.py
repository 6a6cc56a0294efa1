"""Evaluate flow: champion and challenger on the same frozen held-out set, then the gate.

Besides the overall scores, every held-out image is scored on its own (the validator's own
statistics), which gives the paired bootstrap interval of the mAP50-95 difference and the few
images where the two models differ most, for the report to draw.
"""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass
from typing import Any

from mlflow.entities import Metric, RunTag
from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict

from training.comparison import pick_examples
from training.evaluation import EvalResult, ImageResult, evaluate_images
from training.gate import DEFAULT_PRIMARY_METRIC, GateDecision, decide
from training.interval import paired_interval
from training.snapshots import HOLDOUT_HASH_TAG, download_snapshot, get_snapshot
from training.trainer import resolve_device
from visionloop.db import session_scope
from visionloop.events import EventKind, emit
from visionloop.models import DatasetSnapshot
from visionloop.registry import CHAMPION, ModelRef, client, download_weights, get_alias, get_version
from visionloop.settings import Settings, get_settings


class Evaluation(BaseModel):
    """Challenger and champion scored on the same held-out set, and the gate's decision."""

    model_config = ConfigDict(frozen=True)

    holdout_snapshot_id: int
    holdout_hash: str
    holdout_images: int
    challenger_version: str
    champion_version: str | None  # None: there was no champion to compare with
    challenger: EvalResult
    champion: EvalResult | None
    decision: GateDecision
    holdout_version: int | None = None  # None: a held-out snapshot that is not a frozen version
    # Scores of both models on each held-out version scored, the judged one included, by
    # version number: {"holdout_hash", "images", "challenger", "champion"} (metrics only).
    by_version: dict[str, dict[str, Any]] = {}
    examples: list[dict[str, Any]] = []  # training.comparison.pick_examples


@dataclass(frozen=True)
class Scored:
    """Both models' overall and per-image results on one held-out snapshot (the per-image
    ones stay in the flow's process: only the interval and the examples travel on)."""

    challenger: EvalResult
    champion: EvalResult | None
    challenger_images: list[ImageResult]
    champion_images: list[ImageResult]


def _metric_name(text: str) -> str:
    # MLflow metric names allow letters, digits, _ - . / and spaces; class names may hold more.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in text)


def _holdout_metrics(evaluation: Evaluation) -> list[Metric]:
    now = int(time.time() * 1000)
    challenger, champion = evaluation.challenger, evaluation.champion
    metrics = [Metric(f"holdout_{k}", v, now, 0) for k, v in challenger.metrics.items()]
    for name, values in challenger.per_class.items():
        metrics += [
            Metric(_metric_name(f"holdout_{m}_{name}"), values[m], now, 0)
            for m in ("AP50", "AP50-95")
        ]
    if champion is not None:
        metrics += [Metric(f"champion_holdout_{k}", v, now, 0) for k, v in champion.metrics.items()]
    # By version, so a trend over retrains compares like with like in MLflow too.
    for number, scores in evaluation.by_version.items():
        for role, prefix in (("challenger", "holdout"), ("champion", "champion_holdout")):
            metrics += [
                Metric(f"{prefix}_v{number}_{k}", v, now, 0)
                for k, v in (scores.get(role) or {}).items()
            ]
    interval = evaluation.decision.interval
    if interval is not None:
        metrics += [
            Metric(f"holdout_mAP50-95_diff{suffix}", float(interval[key]), now, 0)
            for suffix, key in (("", "difference"), ("_low", "low"), ("_high", "high"))
        ]
    return metrics


def log_evaluation(settings: Settings, run_id: str, evaluation: Evaluation) -> None:
    """Put the held-out scores, the decision and its reasons on the challenger's MLflow run."""
    decision = evaluation.decision
    tags = [
        RunTag(HOLDOUT_HASH_TAG, evaluation.holdout_hash),
        RunTag("visionloop.gate.decision", "promote" if decision.promote else "keep champion"),
        RunTag("visionloop.gate.reasons", "\n".join(decision.reasons)[:5000]),
        RunTag("visionloop.gate.champion_version", evaluation.champion_version or ""),
    ]
    mlflow = client(settings)
    mlflow.log_batch(run_id, metrics=_holdout_metrics(evaluation), tags=tags)
    mlflow.log_dict(
        run_id,
        evaluation.model_dump(
            mode="json",
            include={
                "holdout_hash",
                "holdout_version",
                "challenger",
                "champion",
                "champion_version",
                "decision",
                "by_version",
            },
        ),
        "evaluation/evaluation.json",
    )


def models_to_compare(
    settings: Settings, challenger_version: str, champion_version: str | None
) -> tuple[ModelRef, ModelRef | None]:
    """The challenger and the champion it is judged against (the current one by default)."""
    challenger = get_version(settings, challenger_version)
    champion = (
        get_version(settings, champion_version)
        if champion_version
        else get_alias(settings, CHAMPION)
    )
    if champion is not None and champion.version == challenger.version:
        raise ValueError(
            f"version {challenger_version} is the champion already; nothing to compare"
        )
    return challenger, champion


def score_on_holdout(
    settings: Settings,
    holdout: DatasetSnapshot,
    challenger: ModelRef,
    champion: ModelRef | None,
) -> Scored:
    """Both models validated on the held-out snapshot, with the same settings."""
    data_yaml = download_snapshot(settings, holdout)
    work = settings.data_dir / "evaluation" / uuid.uuid4().hex[:12]
    logger = get_run_logger()

    def score(ref: ModelRef, role: str) -> tuple[EvalResult, list[ImageResult]]:
        result, images = evaluate_images(
            download_weights(settings, ref, settings.data_dir / "models"),
            data_yaml,
            imgsz=settings.image_size,
            batch=settings.train_batch,
            run_dir=work / role,
            device=resolve_device(settings.device),
        )
        logger.info(
            "%s version %s on held-out %s: %s",
            role,
            ref.version,
            holdout.manifest_hash[:12],
            result.metrics,
        )
        return result, images

    try:
        challenger_result, challenger_images = score(challenger, "challenger")
        champion_result, champion_images = score(champion, "champion") if champion else (None, [])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Scored(
        challenger=challenger_result,
        champion=champion_result,
        challenger_images=challenger_images,
        champion_images=champion_images,
    )


def _version_scores(holdout: DatasetSnapshot, scored: Scored) -> dict[str, Any]:
    return {
        "holdout_hash": holdout.manifest_hash,
        "images": holdout.num_images,
        "challenger": scored.challenger.metrics,
        "champion": scored.champion.metrics if scored.champion else None,
    }


def scores_by_version(
    settings: Settings,
    holdout: DatasetSnapshot,
    scored: Scored,
    earlier: list[DatasetSnapshot],
    challenger: ModelRef,
    champion: ModelRef | None,
) -> dict[str, dict[str, Any]]:
    """Both models' metrics on the judged version and on each of ``earlier`` versions."""
    by_version: dict[str, dict[str, Any]] = {}
    if holdout.holdout_version is not None:
        by_version[str(holdout.holdout_version)] = _version_scores(holdout, scored)
    for snapshot in earlier:
        if snapshot.holdout_version is None or snapshot.id == holdout.id:
            continue
        again = score_on_holdout(settings, snapshot, challenger, champion)
        by_version[str(snapshot.holdout_version)] = _version_scores(snapshot, again)
    return by_version


def _announce(evaluation: Evaluation) -> None:
    champion = evaluation.champion_version
    promote = evaluation.decision.promote
    emit(
        EventKind.EVALUATION_FINISHED,
        f"challenger version {evaluation.challenger_version} vs "
        + (f"champion version {champion}" if champion else "no champion")
        + f": {'promote' if promote else 'keep the champion'}",
        {
            "challenger_version": evaluation.challenger_version,
            "champion_version": champion,
            "holdout_hash": evaluation.holdout_hash,
            "promote": promote,
            "reasons": evaluation.decision.reasons,
        },
    )


def _same_order(reference: list[ImageResult], images: list[ImageResult]) -> list[ImageResult]:
    """``images`` in the order of ``reference`` (pairs for the bootstrap), by image hash."""
    by_hash = {r.image_hash: r for r in images}
    missing = [r.image_hash for r in reference if r.image_hash not in by_hash]
    if missing or len(images) != len(reference):
        raise ValueError(f"the two models were not scored on the same images ({missing[:3]})")
    return [by_hash[r.image_hash] for r in reference]


@flow(name="evaluate")
def evaluate_flow(
    holdout_snapshot_id: int,
    challenger_version: str,
    champion_version: str | None = None,
    margin: float | None = None,
    tolerance: float | None = None,
    primary_metric: str = DEFAULT_PRIMARY_METRIC,
    earlier_holdout_ids: list[int] | None = None,
) -> Evaluation:
    """Score both models on the held-out snapshot and apply the promotion gate (promotes nothing).

    ``champion_version`` defaults to the current `champion`; ``margin`` and ``tolerance`` to
    ``VISIONLOOP_PROMOTION_MARGIN`` and ``VISIONLOOP_CLASS_DROP_TOLERANCE``. Both models are
    also scored (metrics only, for the trend) on each of ``earlier_holdout_ids``.
    """
    settings = get_settings()
    with session_scope() as session:
        holdout = get_snapshot(session, holdout_snapshot_id)
        earlier = [get_snapshot(session, i) for i in earlier_holdout_ids or []]
    challenger_ref, champion_ref = models_to_compare(settings, challenger_version, champion_version)
    scored = score_on_holdout(settings, holdout, challenger_ref, champion_ref)
    challenger, champion = scored.challenger, scored.champion
    interval = (
        paired_interval(
            [r.stats for r in scored.champion_images],
            [r.stats for r in _same_order(scored.champion_images, scored.challenger_images)],
            resamples=settings.bootstrap_resamples,
        )
        if champion is not None
        else None
    )
    if interval is not None:
        get_run_logger().info(
            "mAP50-95 challenger - champion on held-out %s (version %s): %+.4f, %.0f%% "
            "bootstrap interval [%+.4f, %+.4f] over %d images",
            holdout.manifest_hash[:12],
            holdout.holdout_version,
            interval.difference,
            interval.level * 100,
            interval.low,
            interval.high,
            interval.images,
        )
    decision = decide(
        challenger.as_dict(),
        champion.as_dict() if champion else None,
        margin=settings.promotion_margin if margin is None else margin,
        tolerance=settings.class_drop_tolerance if tolerance is None else tolerance,
        primary_metric=primary_metric,
        class_names=holdout.class_names,
        holdout_images=holdout.num_images,
        min_holdout_images=settings.min_holdout_images,
        interval=interval.as_dict() if interval is not None else None,
        require_interval=settings.gate_requires_interval,
    )
    assert holdout.id is not None
    evaluation = Evaluation(
        holdout_snapshot_id=holdout.id,
        holdout_hash=holdout.manifest_hash,
        holdout_images=holdout.num_images,
        challenger_version=challenger_ref.version,
        champion_version=champion_ref.version if champion_ref else None,
        challenger=challenger,
        champion=champion,
        decision=decision,
        holdout_version=holdout.holdout_version,
        by_version=scores_by_version(
            settings, holdout, scored, earlier, challenger_ref, champion_ref
        ),
        examples=pick_examples(scored.champion_images, scored.challenger_images)
        if champion is not None
        else [],
    )
    if challenger_ref.run_id:
        log_evaluation(settings, challenger_ref.run_id, evaluation)
    _announce(evaluation)
    return evaluation
