"""Ingest flow: new images in the object store -> validated, measured, predicted, and the
uncertain ones queued for review in Label Studio.

    find_new_files ─► ingest_files (a task per batch, on the task runner) ─► gather
        ─► queue_uncertain ─► summarise

``queue_uncertain`` selects with what the cycle knows besides its images (class weights, the
champion's reference embeddings, the flip pass; ``ingestion.selection_context``) under the
cycle's name, the flow run id, which every queued row keeps.

Re-running it is safe and cheap: files whose source key (at its current version) or content
is known are skipped, and nothing is written twice (see ``ingestion.pipeline``).

Every task that talks to a server is retried ``VISIONLOOP_TASK_RETRIES`` times; a batch
taking longer than ``VISIONLOOP_INGEST_BATCH_TIMEOUT_S`` stops as timed out, which counts
against the files it was working on (``ingest_max_attempts``). The batch keeps that deadline
itself, not Prefect: a task timeout cannot interrupt a batch in a worker thread. A batch that
fails keeps what the batches before it committed; the run then fails with the error that
names the service, and a re-run after the service is back takes up exactly the files without
an outcome.

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
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import Task, flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from ingestion.pipeline import (
    BatchReport,
    BatchTimedOut,
    SourceFile,
    ingest_sources,
    list_bucket,
    list_folder,
    plan_batches,
    record_failure,
    unseen,
)
from ingestion.selection_context import selection_context
from labeling.selection import (
    Candidate,
    SelectionContext,
    SelectionPolicy,
    select,
    uses_context,
)
from labeling.tasks import QueueReport, queue_for_review
from monitoring.confidence_stream import warm_detector
from monitoring.drift_state import latest_drift_level
from serving.predictor import PREDICT_CONF, get_predictor
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


# A batch is ``ingestion.pipeline.ingest_sources``, importable by name on any worker (this file
# is loaded by Prefect from its path, under a module name a Dask worker could not import).
# Results stay in memory (NO_CACHE): a batch is never worth re-running from a cache, and
# hashing its inputs would cost more than the work.
# Retries come from the settings when a run starts (``server_task``). No ``timeout_seconds``:
# the batch keeps ``ingest_batch_timeout_s`` itself (``ingestion.pipeline.Deadline``).
ingest_files = task(ingest_sources, name="ingest_files", cache_policy=NO_CACHE)


def server_task(t: Task, settings: Settings, **options: Any) -> Task:
    """``t`` with the settings' retries: decorator values are fixed when this file is
    imported, settings are read when a run starts."""
    return t.with_options(
        retries=settings.task_retries, retry_delay_seconds=settings.task_retry_delay_s, **options
    )


def selection_cycle() -> str:
    """This cycle's name: the ingest flow run, or a fresh id outside one."""
    return str(flow_run.id) if flow_run.id else uuid.uuid4().hex


def cycle_context(
    settings: Settings,
    candidates: list[Candidate],
    policy: SelectionPolicy,
    model_version: str | None,
    imgsz: int | None,
    conf: float,
) -> SelectionContext:
    """What selection knows besides the candidates: class weights, the champion's reference
    embeddings and the flip pass (``ingestion.selection_context``), for a strategy that uses
    them (a per-image strategy judges confidences alone: nothing to embed or predict)."""
    cycle = selection_cycle()
    if not candidates or model_version is None or not uses_context(policy.strategy):
        return SelectionContext(cycle=cycle)
    with session_scope() as session:
        return selection_context(
            session,
            settings,
            ObjectStore(settings),
            get_predictor(settings),
            model_version,
            cycle,
            session_scope,
            imgsz=imgsz,
            conf=conf,
        )


@task(cache_policy=NO_CACHE)
def queue_uncertain(
    candidates: list[Candidate],
    policy: SelectionPolicy,
    model_version: str | None = None,
    imgsz: int | None = None,
    conf: float = PREDICT_CONF,
) -> QueueReport:
    settings = get_settings()
    context = cycle_context(settings, candidates, policy, model_version, imgsz, conf)
    chosen = select(candidates, policy, context)
    with session_scope() as session:
        report = queue_for_review(session, settings, chosen, cycle=context.cycle)
    reasons = {c.image_id: c.reason for c in chosen}
    arms = Counter(c.arm for c in chosen)
    get_run_logger().info(
        "%d of %d predicted images selected (%s, budget %d, cycle %s: %s); "
        "%d queued in Label Studio",
        len(chosen),
        len(candidates),
        policy.strategy,
        policy.budget,
        context.cycle,
        ", ".join(f"{n} {arm}" for arm, n in sorted(arms.items())) or "none",
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
                "cycle": context.cycle,
            },
        )
    return report


@dataclass(frozen=True)
class Gathered:
    """The finished batches' reports merged in batch order, so the summary does not depend on
    which batch finished first."""

    candidates: list[Candidate]
    quarantined: dict[str, str]  # file uri: why it was quarantined
    model_version: str | None
    unpredicted: str | None  # why nothing was predicted, if so
    workers: list[str]  # host:pid of every process that ran a batch (the flow's own with threads)

    @classmethod
    def of(cls, reports: list[BatchReport | None]) -> Gathered:
        finished = [r for r in reports if r is not None]
        return cls(
            candidates=[c for r in finished for c in r.candidates],
            quarantined={
                o.uri: o.reason or ""
                for r in finished
                for o in r.files
                if o.status == "quarantined"
            },
            model_version=next((r.model_version for r in finished if r.model_version), None),
            unpredicted=next((r.unpredicted for r in finished if r.unpredicted), None),
            workers=sorted({r.worker for r in finished}),
        )


class IngestTally:
    """An ingest run's bookkeeping: every finished batch is counted at once (log line, progress
    artifact, ``ingest.progress`` event), and the run ends with its summary."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.counts = {"ingested": 0, "quarantined": 0, "duplicate": 0}
        self.started = time.perf_counter()
        self.logger = get_run_logger()
        self.progress = create_progress_artifact(
            0.0, key="ingest-progress", description="files processed"
        )

    def batch_done(self, files: int, report: BatchReport) -> None:
        self.done += files
        for outcome in report.files:
            self.counts[outcome.status] += 1
        rate = self.done / (time.perf_counter() - self.started)
        percent = 100.0 * self.done / self.total
        message = (
            f"{self.done}/{self.total} files ({percent:.0f}%): {self.counts['ingested']} ingested, "
            f"{self.counts['quarantined']} quarantined, {self.counts['duplicate']} duplicates, "
            f"{rate:.1f} files/s"
        )
        self.logger.info(message)
        update_progress_artifact(self.progress, percent)
        emit(
            EventKind.INGEST_PROGRESS,
            message,
            {"done": self.done, "total": self.total, **self.counts, "files_per_second": rate},
        )

    def batch_failed(self, files: int, index: int, batches: int, error: Exception) -> None:
        self.done += files  # counted as processed: the progress still reaches its end
        self.logger.error("batch %d of %d failed: %s", index + 1, batches, error)

    def summarise(self, gathered: Gathered, queued: QueueReport) -> dict[str, Any]:
        """The run's summary (its return value), also as an artifact and an event."""
        update_progress_artifact(self.progress, 100.0)
        seconds = time.perf_counter() - self.started
        summary = {
            "files": self.total,
            "ingested": self.counts["ingested"],
            "quarantined": self.counts["quarantined"],
            "duplicates": self.counts["duplicate"],
            "queued": len(queued.added),
            "queued_images": queued.added,
            "model_version": gathered.model_version,
            "quarantine": gathered.quarantined,
            "seconds": round(seconds, 2),
            "images_per_second": self.total / seconds if seconds > 0 else 0.0,
            "workers": gathered.workers,
        }
        markdown = _summary_markdown(summary, gathered.quarantined)
        create_markdown_artifact(markdown, key="ingest-summary")
        emit(
            EventKind.INGEST_COMPLETED,
            f"ingest: {summary['ingested']} new images, {summary['quarantined']} quarantined, "
            f"{summary['queued']} queued for review",
            {k: v for k, v in summary.items() if k != "queued_images"},
            level="warning" if gathered.quarantined else "info",
        )
        return summary


def remember_failure(batch: list[SourceFile], error: BaseException) -> None:
    """Note on the batch's counted attempts (a lost worker) why it failed; a database that is
    away too leaves the note out, not the run's own error."""
    if isinstance(error, BatchTimedOut):
        return  # noted by the batch, on the files it was working on (not those it never began)
    try:
        with session_scope() as session:
            record_failure(session, batch, f"{type(error).__name__}: {error}")
    except Exception as exc:
        get_run_logger().warning("the failure of a batch was not recorded: %s", exc)


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


def gather(
    batches: list[list[SourceFile]],
    futures: dict[PrefectFuture[BatchReport], int],
    tally: IngestTally,
) -> tuple[list[BatchReport | None], list[Exception]]:
    """Each batch's report in batch order (None where it failed), and the failures; batches
    are counted as they finish, whichever finishes first."""
    reports: list[BatchReport | None] = [None] * len(batches)
    failures: list[Exception] = []
    for future in as_completed(list(futures)):
        index = futures[future]
        try:
            reports[index] = report = future.result()
        except Exception as exc:  # the other batches still finish and are counted
            failures.append(exc)
            tally.batch_failed(len(batches[index]), index, len(batches), exc)
            remember_failure(batches[index], exc)
            continue
        tally.batch_done(len(batches[index]), report)
    return reports, failures


def drift_aware_policy(settings: Settings) -> SelectionPolicy:
    # Under drift (yellow or red) the champion's confidence cannot be trusted to pick images:
    # the review audit widens (see SelectionPolicy.from_settings).
    with session_scope() as session:
        level = latest_drift_level(session)
    return SelectionPolicy.from_settings(settings, drift_level=level)


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
    warm_detector()  # the first batch watches the confidence stream
    policy = selection or drift_aware_policy(settings)
    files = server_task(find_new_files, settings)(prefix, folder)
    batches = plan_batches(files, batch_size)
    tally = IngestTally(len(files))
    ingest = server_task(ingest_files, settings)
    futures = {ingest.submit(batch, imgsz, conf): i for i, batch in enumerate(batches)}
    reports, failures = gather(batches, futures, tally)
    gathered = Gathered.of(reports)
    if gathered.unpredicted:
        get_run_logger().warning("ingested without predictions: %s", gathered.unpredicted)
    # Always: it also gives a task to queue rows a failed run left without one (and the
    # images of the batches that did finish are queued even when another failed).
    queued = server_task(queue_uncertain, settings)(
        gathered.candidates, policy, gathered.model_version, imgsz, conf
    )
    if failures:
        raise failures[0]
    return tally.summarise(gathered, queued)
