"""Ingest flow: new images in the object store -> validated, measured, predicted, and the
uncertain ones queued for review in Label Studio.

    find_new_files ─► ingest_files (one task per batch, submitted to the task runner) ─► queue_uncertain

Re-running it is safe and cheap: files whose source key or content is known are skipped,
and nothing is written twice (see ``ingest.pipeline``).

The batches fan out through the flow's task runner, chosen from the settings when a run
starts (``VISIONLOOP_TASK_RUNNER``, see ``ingest_task_runner``):

- ``threads`` (default): one batch at a time on a worker thread of the flow's process, as
  before: prediction already uses every core, and the other stages overlap inside a batch.
- ``dask``: batches run in parallel on the workers of a Dask cluster (``prefect-dask``), a
  local one of ``VISIONLOOP_DASK_WORKERS`` processes or the scheduler at
  ``VISIONLOOP_DASK_ADDRESS``. A worker needs only the project installed and the same
  ``VISIONLOOP_*`` / ``PREFECT_API_URL`` environment: a task gets its settings from there,
  its arguments (file names) and result (per-file outcomes) are small picklable dataclasses.

Either way a batch that finishes is counted at once (log line, progress artifact,
``ingest.progress`` event), and the results are gathered in batch order, so the summary
does not depend on which batch finished first.
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
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from ingest.pipeline import (
    BatchReport,
    SourceFile,
    ingest_sources,
    list_bucket,
    list_folder,
    plan_batches,
    unseen,
)
from labeling.selection import Candidate, SelectionPolicy, select
from labeling.tasks import QueueReport, queue_for_review
from monitoring.drift_state import latest_drift_level
from serving.predictor import PREDICT_CONF
from visionloop.db import session_scope
from visionloop.events import EventKind, emit
from visionloop.settings import Settings, get_settings
from visionloop.storage import ObjectStore

BATCH_SIZE = 64
"""Files per task: large enough that task overhead vanishes, small enough to show progress."""


def ingest_task_runner(settings: Settings) -> TaskRunner:
    """The task runner ``settings`` ask for (not started)."""
    if settings.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if settings.dask_address:
            return DaskTaskRunner(address=settings.dask_address)
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": settings.dask_workers,
                # One batch per process: prediction uses the process's cores itself.
                "threads_per_worker": 1,
                # No dashboard: it needs bokeh, which is not installed.
                "dashboard_address": None,
            }
        )
    # One batch at a time, as when batches were called in turn: a second thread would only
    # compete for the cores prediction already uses.
    return ThreadPoolTaskRunner(max_workers=1)


class SettingsTaskRunner(TaskRunner):
    """Runs tasks on ``ingest_task_runner(get_settings())``, chosen when a flow run starts.

    The flow object (and so the deployment entrypoint ``flows/ingest.py:ingest_flow``) stays
    the same whatever the settings say; Prefect duplicates this runner and enters it at the
    start of every run, which is when the settings are read.
    """

    def __init__(self) -> None:
        super().__init__()
        self._runner: TaskRunner | None = None

    def duplicate(self) -> SettingsTaskRunner:
        return type(self)()

    def __enter__(self) -> SettingsTaskRunner:
        self._runner = ingest_task_runner(get_settings()).__enter__()
        super().__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        try:
            if self._runner is not None:
                self._runner.__exit__(*exc_info)
        finally:
            self._runner = None
            super().__exit__(*exc_info)

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        if self._runner is None:
            raise RuntimeError("The task runner must be started before submitting work.")
        return self._runner.submit(task, parameters, wait_for, dependencies)


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


# A batch is ``ingest.pipeline.ingest_sources``, importable by name on any worker (this file
# is loaded by Prefect from its path, under a module name a Dask worker could not import).
# Results stay in memory (NO_CACHE): a batch is never worth re-running from a cache, and
# hashing its inputs would cost more than the work.
ingest_files = task(
    ingest_sources,
    name="ingest_files",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=5,
)


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
            EventKind.QUEUE_ADDED,
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


@flow(name="ingest", log_prints=True, task_runner=SettingsTaskRunner())
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
    # Under drift (yellow or red) the champion's confidence cannot be trusted to pick images:
    # the review audit widens (see SelectionPolicy.from_settings).
    with session_scope() as session:
        policy = selection or SelectionPolicy.from_settings(
            settings, drift_level=latest_drift_level(session)
        )
    started = time.perf_counter()

    files = find_new_files(prefix, folder)
    batches = plan_batches(files, batch_size)
    progress = create_progress_artifact(0.0, key="ingest-progress", description="files processed")
    futures: dict[PrefectFuture[BatchReport], int] = {
        ingest_files.submit(batch, imgsz, conf): index for index, batch in enumerate(batches)
    }
    reports: list[BatchReport | None] = [None] * len(batches)
    failures: list[BaseException] = []
    totals = {"ingested": 0, "quarantined": 0, "duplicate": 0}
    done = 0
    for future in as_completed(list(futures)):
        index = futures[future]
        done += len(batches[index])
        try:
            report = reports[index] = future.result()
        except Exception as exc:  # the other batches still finish and are counted
            failures.append(exc)
            logger.error("batch %d of %d failed: %s", index + 1, len(batches), exc)
            continue
        for outcome in report.files:
            totals[outcome.status] += 1
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
            EventKind.INGEST_PROGRESS,
            message,
            {"done": done, "total": len(files), **totals, "files_per_second": rate},
        )

    # Gathered in batch order: the same summary whichever batch finished first.
    quarantined: dict[str, str] = {}
    candidates: list[Candidate] = []
    model_version = None
    unpredicted = None
    for report in reports:
        if report is None:
            continue
        model_version = model_version or report.model_version
        unpredicted = unpredicted or report.unpredicted
        candidates += report.candidates
        for outcome in report.files:
            if outcome.status == "quarantined":
                quarantined[outcome.uri] = outcome.reason or ""

    if unpredicted:
        logger.warning("ingested without predictions: %s", unpredicted)

    # Always: it also gives a task to queue rows a failed run left without one (and the
    # images of the batches that did finish are queued even when another failed).
    queued = queue_uncertain(candidates, policy)
    if failures:
        raise failures[0]
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
        # host:pid of every process that ran a batch (the flow's own with threads).
        "workers": sorted({r.worker for r in reports if r is not None}),
    }
    create_markdown_artifact(_summary_markdown(summary, quarantined), key="ingest-summary")
    emit(
        EventKind.INGEST_COMPLETED,
        f"ingest: {summary['ingested']} new images, {summary['quarantined']} quarantined, "
        f"{summary['queued']} queued for review",
        {k: v for k, v in summary.items() if k != "queued_images"},
        level="warning" if quarantined else "info",
    )
    return summary
