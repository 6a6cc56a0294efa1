"""Evaluate flow: champion and challenger on the same frozen held-out set, then the gate."""

from __future__ import annotations

import shutil
import time
import uuid
from typing import Any

from mlflow.entities import Metric, RunTag
from prefect import flow, get_run_logger

from training.evaluation import EvalResult, evaluate_weights
from training.gate import DEFAULT_PRIMARY_METRIC, GateDecision, decide
from training.snapshots import HOLDOUT_HASH_TAG, download_snapshot, get_snapshot
from visionloop.events import EventKind, emit
from visionloop.registry import CHAMPION, ModelRef, client, download_weights, get_alias, get_version
from visionloop.settings import Settings, get_settings


def _metric_name(text: str) -> str:
    # MLflow metric names allow letters, digits, _ - . / and spaces; class names may hold more.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in text)


def log_evaluation(
    settings: Settings,
    run_id: str,
    holdout_hash: str,
    challenger: EvalResult,
    champion: EvalResult | None,
    champion_version: str | None,
    decision: GateDecision,
) -> None:
    """Put the held-out scores, the decision and its reasons on the challenger's MLflow run."""
    now = int(time.time() * 1000)
    metrics = [Metric(f"holdout_{k}", v, now, 0) for k, v in challenger.metrics.items()]
    for name, values in challenger.per_class.items():
        metrics += [
            Metric(_metric_name(f"holdout_{m}_{name}"), values[m], now, 0)
            for m in ("AP50", "AP50-95")
        ]
    if champion is not None:
        metrics += [Metric(f"champion_holdout_{k}", v, now, 0) for k, v in champion.metrics.items()]
    tags = [
        RunTag(HOLDOUT_HASH_TAG, holdout_hash),
        RunTag("visionloop.gate.decision", "promote" if decision.promote else "keep champion"),
        RunTag("visionloop.gate.reasons", "\n".join(decision.reasons)[:5000]),
        RunTag("visionloop.gate.champion_version", champion_version or ""),
    ]
    mlflow = client(settings)
    mlflow.log_batch(run_id, metrics=metrics, tags=tags)
    mlflow.log_dict(
        run_id,
        {
            "holdout_hash": holdout_hash,
            "challenger": challenger.as_dict(),
            "champion": champion.as_dict() if champion else None,
            "champion_version": champion_version,
            "decision": decision.as_dict(),
        },
        "evaluation/evaluation.json",
    )


@flow(name="evaluate")
def evaluate_flow(
    holdout_snapshot_id: int,
    challenger_version: str,
    champion_version: str | None = None,
    margin: float | None = None,
    tolerance: float | None = None,
    primary_metric: str = DEFAULT_PRIMARY_METRIC,
) -> dict[str, Any]:
    """Score both models on the held-out snapshot and apply the promotion gate (promotes nothing).

    ``champion_version`` defaults to the current `champion`; ``margin`` and ``tolerance`` to
    ``VISIONLOOP_PROMOTION_MARGIN`` and ``VISIONLOOP_CLASS_DROP_TOLERANCE``.
    """
    settings = get_settings()
    logger = get_run_logger()
    holdout = get_snapshot(holdout_snapshot_id)
    data_yaml = download_snapshot(settings, holdout)
    challenger_ref = get_version(settings, challenger_version)
    champion_ref: ModelRef | None = (
        get_version(settings, champion_version)
        if champion_version
        else get_alias(settings, CHAMPION)
    )
    if champion_ref is not None and champion_ref.version == challenger_ref.version:
        raise ValueError(
            f"version {challenger_version} is the champion already; nothing to compare"
        )

    work = settings.data_dir / "evaluation" / uuid.uuid4().hex[:12]
    models = settings.data_dir / "models"

    def score(ref: ModelRef, role: str) -> EvalResult:
        result = evaluate_weights(
            download_weights(settings, ref, models),
            data_yaml,
            imgsz=settings.image_size,
            batch=settings.train_batch,
            run_dir=work / role,
        )
        logger.info(
            "%s version %s on held-out %s: %s",
            role,
            ref.version,
            holdout.manifest_hash[:12],
            result.metrics,
        )
        return result

    try:
        challenger = score(challenger_ref, "challenger")
        champion = score(champion_ref, "champion") if champion_ref else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    decision = decide(
        challenger.as_dict(),
        champion.as_dict() if champion else None,
        margin=settings.promotion_margin if margin is None else margin,
        tolerance=settings.class_drop_tolerance if tolerance is None else tolerance,
        primary_metric=primary_metric,
        class_names=holdout.class_names,
    )
    if challenger_ref.run_id:
        log_evaluation(
            settings,
            challenger_ref.run_id,
            holdout.manifest_hash,
            challenger,
            champion,
            champion_ref.version if champion_ref else None,
            decision,
        )
    emit(
        EventKind.EVALUATION_FINISHED,
        f"challenger version {challenger_ref.version} vs "
        + (f"champion version {champion_ref.version}" if champion_ref else "no champion")
        + f": {'promote' if decision.promote else 'keep the champion'}",
        {
            "challenger_version": challenger_ref.version,
            "champion_version": champion_ref.version if champion_ref else None,
            "holdout_hash": holdout.manifest_hash,
            "promote": decision.promote,
            "reasons": decision.reasons,
        },
    )
    return {
        "holdout_snapshot_id": holdout.id,
        "holdout_hash": holdout.manifest_hash,
        "holdout_images": holdout.num_images,
        "challenger_version": challenger_ref.version,
        "champion_version": champion_ref.version if champion_ref else None,
        "challenger": challenger.as_dict(),
        "champion": champion.as_dict() if champion else None,
        "decision": decision.as_dict(),
    }
