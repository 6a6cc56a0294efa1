"""Evaluate flow: champion and challenger on the same frozen held-out set, then the gate."""

from __future__ import annotations

import shutil
import time
import uuid

from mlflow.entities import Metric, RunTag
from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict

from training.evaluation import EvalResult, evaluate_weights
from training.gate import DEFAULT_PRIMARY_METRIC, GateDecision, decide
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
            include={"holdout_hash", "challenger", "champion", "champion_version", "decision"},
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
) -> tuple[EvalResult, EvalResult | None]:
    """Both models validated on the held-out snapshot, with the same settings."""
    data_yaml = download_snapshot(settings, holdout)
    work = settings.data_dir / "evaluation" / uuid.uuid4().hex[:12]
    logger = get_run_logger()

    def score(ref: ModelRef, role: str) -> EvalResult:
        result = evaluate_weights(
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
        return result

    try:
        challenger_result = score(challenger, "challenger")
        champion_result = score(champion, "champion") if champion else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return challenger_result, champion_result


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


@flow(name="evaluate")
def evaluate_flow(
    holdout_snapshot_id: int,
    challenger_version: str,
    champion_version: str | None = None,
    margin: float | None = None,
    tolerance: float | None = None,
    primary_metric: str = DEFAULT_PRIMARY_METRIC,
) -> Evaluation:
    """Score both models on the held-out snapshot and apply the promotion gate (promotes nothing).

    ``champion_version`` defaults to the current `champion`; ``margin`` and ``tolerance`` to
    ``VISIONLOOP_PROMOTION_MARGIN`` and ``VISIONLOOP_CLASS_DROP_TOLERANCE``.
    """
    settings = get_settings()
    with session_scope() as session:
        holdout = get_snapshot(session, holdout_snapshot_id)
    challenger_ref, champion_ref = models_to_compare(settings, challenger_version, champion_version)
    challenger, champion = score_on_holdout(settings, holdout, challenger_ref, champion_ref)
    decision = decide(
        challenger.as_dict(),
        champion.as_dict() if champion else None,
        margin=settings.promotion_margin if margin is None else margin,
        tolerance=settings.class_drop_tolerance if tolerance is None else tolerance,
        primary_metric=primary_metric,
        class_names=holdout.class_names,
        holdout_images=holdout.num_images,
        min_holdout_images=settings.min_holdout_images,
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
    )
    if challenger_ref.run_id:
        log_evaluation(settings, challenger_ref.run_id, evaluation)
    _announce(evaluation)
    return evaluation
