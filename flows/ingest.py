"""Ingest flow: new images in the object store -> validated, measured, predicted, and the
uncertain ones queued for review in Label Studio.

    find_new_files ─► ingest_files (one task per batch of files) ─► queue_uncertain

Re-running it is safe and cheap: files whose source key or content is known are skipped,
and nothing is written twice (see ``visionloop.ingest``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from labeling.selection import Candidate, SelectionPolicy, select
from labeling.tasks import QueueReport, queue_for_review
from monitoring.events import emit
from visionloop.db import session_scope
from visionloop.ingest import (
    BatchReport,
    SourceFile,
    ingest_batch,
    list_bucket,
    list_folder,
    unseen,
)
from visionloop.predictor import PREDICT_CONF, ChampionPredictor, NoChampionError, get_predictor
from visionloop.settings import get_settings
from visionloop.storage import ObjectStore

BATCH_SIZE = 64
"""Files per task: large enough that task overhead vanishes, small enough to show progress."""


@task(cache_policy=NO_CACHE)
def find_new_files(prefix: str, folder: str | None) -> list[SourceFile]:
    settings = get_settings()
    if folder:
        files = list_folder(Path(folder))
    else:
        files = list_bucket(ObjectStore(settings), settings.bucket_incoming, prefix)
    with session_scope() as session:
        new = unseen(files, session)
    get_run_logger().info("%d files found, %d of them new", len(files), len(new))
    return new


def _champion() -> ChampionPredictor | None:
    predictor = get_predictor(get_settings())
    try:
        predictor.model_version()
    except NoChampionError as exc:
        get_run_logger().warning("ingesting without predictions: %s", exc)
        return None
    return predictor


# Results stay in memory (NO_CACHE): a batch is never worth re-running from a cache, and
# hashing its inputs would cost more than the work.
@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def ingest_files(files: list[SourceFile], imgsz: int | None, conf: float) -> BatchReport:
    settings = get_settings()
    store = ObjectStore(settings)
    return ingest_batch(settings, store, files, predictor=_champion(), imgsz=imgsz, conf=conf)


@task(cache_policy=NO_CACHE)
def queue_uncertain(candidates: list[Candidate], policy: SelectionPolicy) -> QueueReport:
    settings = get_settings()
    chosen = select(candidates, policy)
    report = queue_for_review(settings, chosen)
    reasons = {c.image_id: c.reason for c in chosen}
    get_run_logger().info(
        "%d of %d predicted images selected (%s, budget %d); %d queued in Label Studio",
        len(chosen),
        len(candidates),
        policy.strategy,
        policy.budget,
        len(report.added),
    )
    if report.added:
        emit(
            "queue.added",
            f"{len(report.added)} images queued for review",
            {
                "images": report.added,
                "reasons": {str(i): reasons.get(i) for i in report.added},
                "task_ids": {str(i): t for i, t in report.task_ids.items()},
            },
        )
    return report


def _summary_markdown(summary: dict[str, Any], quarantined: dict[str, str]) -> str:
    lines = [
        "# Ingest",
        "",
        "| files | ingested | quarantined | duplicates | queued | model | images/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {summary['files']} | {summary['ingested']} | {summary['quarantined']} | "
        f"{summary['duplicates']} | {summary['queued']} | {summary['model_version'] or '-'} | "
        f"{summary['images_per_second']:.1f} |",
    ]
    if quarantined:
        lines += ["", "## Quarantined", "", "| file | reason |", "| --- | --- |"]
        lines += [f"| `{uri}` | {reason} |" for uri, reason in quarantined.items()]
    return "\n".join(lines)


@flow(name="ingest", log_prints=True)
def ingest_flow(
    prefix: str = "",
    folder: str | None = None,
    batch_size: int = BATCH_SIZE,
    imgsz: int | None = None,
    conf: float = PREDICT_CONF,
    selection: SelectionPolicy | None = None,
) -> dict[str, Any]:
    """Ingest new files under ``prefix`` of the incoming bucket (or a local ``folder``).

    ``imgsz`` overrides the prediction size (default: the champion's training size) and
    ``conf`` the lowest box confidence kept; ``selection`` overrides the settings'
    selection policy for this run.
    """
    settings = get_settings()
    logger = get_run_logger()
    policy = selection or SelectionPolicy.from_settings(settings)
    started = time.perf_counter()

    files = find_new_files(prefix, folder)
    progress = create_progress_artifact(0.0, key="ingest-progress", description="files processed")
    totals = {"ingested": 0, "quarantined": 0, "duplicate": 0}
    quarantined: dict[str, str] = {}
    candidates: list[Candidate] = []
    model_version = None
    done = 0
    for start in range(0, len(files), max(1, batch_size)):
        batch = files[start : start + batch_size]
        report = ingest_files(batch, imgsz, conf)
        done += len(batch)
        model_version = report.model_version or model_version
        candidates += report.candidates
        for outcome in report.files:
            totals[outcome.status] += 1
            if outcome.status == "quarantined":
                quarantined[outcome.uri] = outcome.reason or ""
        rate = done / (time.perf_counter() - started)
        percent = 100.0 * done / len(files)
        message = (
            f"{done}/{len(files)} files ({percent:.0f}%): {totals['ingested']} ingested, "
            f"{totals['quarantined']} quarantined, {totals['duplicate']} duplicates, "
            f"{rate:.1f} files/s"
        )
        logger.info(message)
        update_progress_artifact(progress, percent)
        emit(
            "ingest.progress",
            message,
            {"done": done, "total": len(files), **totals, "files_per_second": rate},
        )

    # Always: it also gives a task to queue rows a failed run left without one.
    queued = queue_uncertain(candidates, policy)
    update_progress_artifact(progress, 100.0)
    seconds = time.perf_counter() - started
    summary = {
        "files": len(files),
        "ingested": totals["ingested"],
        "quarantined": totals["quarantined"],
        "duplicates": totals["duplicate"],
        "queued": len(queued.added),
        "queued_images": queued.added,
        "model_version": model_version,
        "quarantine": quarantined,
        "seconds": round(seconds, 2),
        "images_per_second": len(files) / seconds if seconds > 0 else 0.0,
    }
    create_markdown_artifact(_summary_markdown(summary, quarantined), key="ingest-summary")
    emit(
        "ingest.completed",
        f"ingest: {summary['ingested']} new images, {summary['quarantined']} quarantined, "
        f"{summary['queued']} queued for review",
        {k: v for k, v in summary.items() if k != "queued_images"},
        level="warning" if quarantined else "info",
    )
    return summary
