"""The demo story: one turn of the loop on a running stack, from camera images to a promoted model.

    upload a round ─► ingest ─► simulated reviewer ─► label-sync ─► drift ─► check-and-retrain
         ▲                                                                       │
         └──────────── next round (lighting changes from the shift round on) ◄───┘

Every platform step is a run of its Prefect deployment, executed by the stack's worker exactly
as the schedules would run it; the demo only starts them one after the other instead of waiting
for their timers, so the story takes minutes, not hours. Only two parts are simulated: the camera
(``cli.production_stream``) and the person answering the review queue
(``cli.simulated_reviewer``). The story ends when a retrain has finished (or the rounds
run out) with a report read back from the platform's records (``cli.loop_report``).
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from cli import loop_report
from cli.production_stream import StreamPlan, ground_truth, upload_round
from cli.simulated_reviewer import SIMULATED_REVIEWER_EMAIL, review_open_tasks
from training.evaluation import evaluate_weights
from training.snapshots import download_snapshot, get_snapshot
from visionloop.db import session_scope
from visionloop.events import EventKind
from visionloop.models import ActivityEvent, RetrainingRun, RetrainStatus
from visionloop.registry import CHAMPION, download_weights, get_alias, get_version
from visionloop.settings import Settings

FINAL_RETRAIN_STATES = {RetrainStatus.succeeded.value, RetrainStatus.failed.value}
POLL_SECONDS = 2.0


class DemoError(RuntimeError):
    """A step of the story failed; the message says which and how to look into it."""


class StoryUI(Protocol):
    """How the story shows progress: the CLI's rich console, or nothing."""

    def say(self, message: str) -> None: ...

    def bar(self, label: str, total: int) -> AbstractContextManager[Callable[[int], None]]: ...


class QuietUI:
    def say(self, message: str) -> None:
        pass

    @contextmanager
    def bar(self, label: str, total: int) -> Iterator[Callable[[int], None]]:
        yield lambda _done: None


@dataclass
class RoundRecord:
    round: int
    drifted: bool
    uploaded: int
    broken: int
    queued: int = 0
    labelled: int = 0
    drift_level: str | None = None
    drift_score: float | None = None
    decision: str = ""
    retraining_run_id: int | None = None


def run_deployment_and_wait(name: str, parameters: dict[str, Any], timeout: float) -> str:
    """Run deployment ``name`` on the worker and wait; the flow run's id, or ``DemoError``."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(name, parameters=parameters, timeout=timeout, tags=["demo"])
    state = flow_run.state
    if state is None or not state.is_completed():
        raise DemoError(
            f"the {name} deployment's flow run {flow_run.name} ({flow_run.id}) ended "
            f"{state.name if state else 'without a state'}"
            + (f": {state.message}" if state and state.message else "")
            + " (its logs are in the Prefect UI)"
        )
    return str(flow_run.id)


def run_step(ui: StoryUI, label: str, name: str, parameters: dict[str, Any], timeout: float) -> str:
    """One deployment run, shown as a one-step bar whose clock runs while the worker works."""
    with ui.bar(label, 1) as advance:
        flow_run_id = run_deployment_and_wait(name, parameters, timeout)
        advance(1)
    return flow_run_id


def _events_since(kind: EventKind, since: datetime) -> list[ActivityEvent]:
    return [e for e in loop_report.rows_since(ActivityEvent, since) if e.kind == kind]


def wait_for_retrain(run_id: int, ui: StoryUI, epochs: int, timeout: float) -> RetrainingRun:
    """Follow a retraining run to its end, showing its training epochs as they are logged."""
    deadline = time.monotonic() + timeout
    started = datetime.now(UTC)
    with ui.bar(f"retraining run {run_id}: training epochs", epochs) as advance:
        while True:
            with session_scope() as session:
                run = session.get(RetrainingRun, run_id)
            assert run is not None
            done = [
                e.payload.get("epoch", 0)
                for e in _events_since(EventKind.TRAINING_EPOCH, started)
                if e.payload.get("retraining_run_id") == run_id
            ]
            if done:
                advance(max(done))
            if str(getattr(run.status, "value", run.status)) in FINAL_RETRAIN_STATES:
                return run
            if time.monotonic() > deadline:
                raise DemoError(
                    f"retraining run {run_id} did not finish within {timeout:.0f} s "
                    f"(status {run.status}; Prefect flow run {run.prefect_flow_run_id})"
                )
            time.sleep(POLL_SECONDS)


def compare_on_holdout(
    settings: Settings, holdout_snapshot_id: int, before_version: str, after_version: str
) -> dict[str, Any]:
    """Both models scored on the same frozen held-out snapshot."""
    holdout = get_snapshot(holdout_snapshot_id)
    data_yaml = download_snapshot(settings, holdout)
    work = settings.data_dir / "evaluation" / f"demo-{uuid.uuid4().hex[:8]}"
    scores = {}
    try:
        for role, version in (("before", before_version), ("after", after_version)):
            weights = download_weights(
                settings, get_version(settings, version), settings.data_dir / "models"
            )
            result = evaluate_weights(
                weights,
                data_yaml,
                imgsz=settings.image_size,
                batch=settings.train_batch,
                run_dir=work / role,
            )
            scores[role] = {"version": version, "metrics": result.metrics}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "holdout_snapshot_id": holdout.id,
        "holdout_hash": holdout.manifest_hash,
        "holdout_images": holdout.num_images,
        **scores,
    }


def run_story(
    settings: Settings,
    plan: StreamPlan,
    ui: StoryUI | None = None,
    *,
    flow_timeout: float = 1800.0,
    retrain_timeout: float = 3600.0,
    report_dir: Path | None = None,
) -> dict[str, Any]:
    """Tell the story on the running stack; returns the report (also saved as JSON and Markdown)."""
    ui = ui or QuietUI()
    champion = get_alias(settings, CHAMPION)
    if champion is None:
        raise DemoError("there is no champion model: run `visionloop bootstrap` first")
    started = datetime.now(UTC)
    run_tag = started.strftime("%Y%m%d-%H%M%S")
    truth = ground_truth(settings)
    rounds: list[RoundRecord] = []
    ui.say(
        f"champion at the start: version {champion.version}; {plan.rounds} rounds of "
        f"{plan.images_per_round} camera images, the lighting changes from round {plan.shift_round}"
    )
    ui.say(
        f"the review queue is answered by a simulated reviewer ({SIMULATED_REVIEWER_EMAIL}) "
        "submitting the generator's ground truth through Label Studio's API"
    )
    for index in range(plan.rounds):
        round_started = datetime.now(UTC)
        with ui.bar(f"round {index}: camera uploads", plan.images_per_round) as advance:
            upload = upload_round(settings, plan, index, truth, run_tag=run_tag, progress=advance)
        record = RoundRecord(index, upload.drifted, len(upload.image_keys), len(upload.broken_keys))
        rounds.append(record)

        run_step(
            ui,
            f"round {index}: ingest {upload.prefix}",
            "ingest/ingest",
            {"prefix": upload.prefix},
            flow_timeout,
        )
        counts = loop_report.image_counts(upload.prefix)
        record.queued = counts["queued"]

        with ui.bar(f"round {index}: simulated reviewer", max(1, counts["queued"])) as advance:
            review_open_tasks(settings, truth, progress=lambda n, _total: advance(n))
        run_step(ui, f"round {index}: label-sync", "label-sync/label-sync", {}, flow_timeout)
        record.labelled = loop_report.image_counts(upload.prefix)["labelled"]

        run_step(ui, f"round {index}: drift", "drift/drift", {}, flow_timeout)
        drift = loop_report.drift_timeline(round_started)
        if drift:
            record.drift_level, record.drift_score = drift[-1]["level"], drift[-1]["score"]

        run_step(
            ui,
            f"round {index}: check-and-retrain",
            "check-and-retrain/check-and-retrain",
            {},
            flow_timeout,
        )
        decisions = _events_since(EventKind.RETRAIN_CONDITIONS, round_started)
        record.decision = decisions[-1].message if decisions else "(no decision recorded)"
        ui.say(
            f"round {index}: {record.uploaded} uploaded ({'drifted' if record.drifted else 'normal'}), "
            f"{record.queued} queued, {record.labelled} labelled, drift "
            f"{record.drift_level or 'not measured'}"
            + (f" ({record.drift_score:.2f})" if record.drift_score is not None else "")
            + f"; {record.decision}"
        )
        launched = loop_report.rows_since(RetrainingRun, round_started)
        if launched:
            run = wait_for_retrain(launched[-1].id, ui, settings.train_epochs, retrain_timeout)  # type: ignore[arg-type]
            record.retraining_run_id = run.id
            verdict = "promoted" if run.promoted else f"not promoted ({run.status})"
            ui.say(f"retraining run {run.id}: challenger version {run.model_version} {verdict}")
            for reason in run.decision_reasons or []:
                ui.say(f"  - {reason}")
            if run.error:
                ui.say(f"  error: {run.error}")
            break

    retrains = loop_report.retrain_runs(started)
    final = get_alias(settings, CHAMPION)
    comparison = None
    judged = [r for r in retrains if r["holdout_snapshot_id"]]
    if judged and final is not None:
        comparison = compare_on_holdout(
            settings, judged[-1]["holdout_snapshot_id"], champion.version, final.version
        )
    report = {
        "run_tag": run_tag,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "plan": {**asdict(plan), "drift": asdict(plan.drift)},
        "champion_before": champion.version,
        "champion_after": final.version if final else None,
        "images": loop_report.image_counts(f"demo/{run_tag}/"),
        "rounds": [asdict(r) for r in rounds],
        "drift": loop_report.drift_timeline(started),
        "retrains": retrains,
        "comparison": comparison,
    }
    report_dir = report_dir or settings.data_dir / "demo" / "reports"
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / f"{run_tag}.json").write_text(json.dumps(report, indent=2, default=str))
    (report_dir / f"{run_tag}.md").write_text(loop_report.render_markdown(report))
    report["paths"] = {
        "json": str(report_dir / f"{run_tag}.json"),
        "markdown": str(report_dir / f"{run_tag}.md"),
    }
    return report
