"""The demo story: one turn of the loop on a running stack, from camera images to a promoted model.

    upload a round ─► ingest ─► simulated reviewer ─► label-sync ─► drift ─► check-and-retrain
         ▲                                                                       │
         └──────────── next round (lighting changes from the shift round on) ◄───┘

Every platform step is a run of its Prefect deployment, executed by the stack's worker exactly
as the schedules would run it; the demo only starts them one after the other instead of waiting
for their timers, so the story takes minutes, not hours. Only two parts are simulated: the camera
(``cli.production_stream``) and the person answering the review queue
(``cli.simulated_reviewer``). Once a round's reviews are in, the label-savings ledger says how
many more of the champion's errors the selected images showed than the round's random
controls. The story ends when a retrain has finished (or the rounds run out) with a report
read back from the platform's records (``cli.loop_report``).
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
from cli.production_stream import (
    GroundTruth,
    RoundUpload,
    StreamPlan,
    ground_truth,
    upload_round,
)
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
    cycle: str | None = None
    """The round's selection cycle (its ingest run), as the queue records it."""
    ledger: str = ""
    """The round's label-savings ledger in words."""
    seconds: float = 0.0
    """From its first upload to its retrain decision (a retrain it launches not included)."""


POLL_S = 0.5
"""How often the demo asks Prefect whether a step's flow run has ended."""


def run_deployment_and_wait(name: str, parameters: dict[str, Any], timeout: float) -> str:
    """Run deployment ``name`` on the worker and wait; the flow run's id, or ``DemoError``."""
    from prefect.deployments import run_deployment

    # Prefect looks every 5 s by default: up to 5 s lost per step, four steps a round.
    flow_run = run_deployment(
        name, parameters=parameters, timeout=timeout, tags=["demo"], poll_interval=POLL_S
    )
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
    with session_scope() as session:
        holdout = get_snapshot(session, holdout_snapshot_id)
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


@dataclass
class Story:
    """What every step of one telling needs."""

    settings: Settings
    plan: StreamPlan
    ui: StoryUI
    truth: GroundTruth
    run_tag: str
    flow_timeout: float
    retrain_timeout: float


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
    champion = get_alias(settings, CHAMPION)
    if champion is None:
        raise DemoError("there is no champion model: run `visionloop bootstrap` first")
    started = datetime.now(UTC)
    story = Story(
        settings,
        plan,
        ui or QuietUI(),
        ground_truth(settings),
        started.strftime("%Y%m%d-%H%M%S"),
        flow_timeout,
        retrain_timeout,
    )
    _introduce(story, champion.version)
    rounds = play_rounds(story)
    report = build_report(story, started, champion.version, rounds)
    story.ui.say(f"label-savings ledger, all rounds: {report['ledger']['cumulative']['summary']}")
    return save_report(report, report_dir or settings.data_dir / "demo" / "reports")


def _introduce(story: Story, champion_version: str) -> None:
    plan = story.plan
    story.ui.say(
        f"champion at the start: version {champion_version}; {plan.rounds} rounds of "
        f"{plan.images_per_round} camera images, the lighting changes from round {plan.shift_round}"
    )
    story.ui.say(
        f"the review queue is answered by a simulated reviewer ({SIMULATED_REVIEWER_EMAIL}) "
        "submitting the generator's ground truth through Label Studio's API"
    )


def play_rounds(story: Story) -> list[RoundRecord]:
    """Rounds until one launches a retrain (followed to its end) or the plan runs out."""
    rounds: list[RoundRecord] = []
    for index in range(story.plan.rounds):
        round_started = datetime.now(UTC)
        record = play_round(story, index, round_started)
        rounds.append(record)
        launched = loop_report.rows_since(RetrainingRun, round_started)
        if launched:
            record.retraining_run_id = follow_retrain(story, launched[-1].id)  # type: ignore[arg-type]
            break
    return rounds


def play_round(story: Story, index: int, round_started: datetime) -> RoundRecord:
    """One round through every scheduled step, each run by the worker as its schedule would."""
    upload = _upload(story, index)
    record = RoundRecord(index, upload.drifted, len(upload.image_keys), len(upload.broken_keys))
    _ingest_and_review(story, upload, record)
    _measure_drift(story, record, round_started)
    _check_and_retrain(story, record, round_started)
    record.seconds = round((datetime.now(UTC) - round_started).total_seconds(), 1)
    story.ui.say(_round_summary(record))
    return record


def _upload(story: Story, index: int) -> RoundUpload:
    with story.ui.bar(f"round {index}: camera uploads", story.plan.images_per_round) as advance:
        return upload_round(
            story.settings,
            story.plan,
            index,
            story.truth,
            run_tag=story.run_tag,
            progress=advance,
        )


def _ingest_and_review(story: Story, upload: RoundUpload, record: RoundRecord) -> None:
    index, ui = record.round, story.ui
    run_step(
        ui,
        f"round {index}: ingest {upload.prefix}",
        "ingest/ingest",
        {"prefix": upload.prefix},
        story.flow_timeout,
    )
    record.queued = loop_report.image_counts(upload.prefix)["queued"]
    with ui.bar(f"round {index}: simulated reviewer", max(1, record.queued)) as advance:
        review_open_tasks(story.settings, story.truth, progress=lambda n, _total: advance(n))
    run_step(ui, f"round {index}: label-sync", "label-sync/label-sync", {}, story.flow_timeout)
    record.labelled = loop_report.image_counts(upload.prefix)["labelled"]
    _tell_ledger(story, record, upload.prefix)


def _tell_ledger(story: Story, record: RoundRecord, prefix: str) -> None:
    """The round's selected images against its random controls, once the reviews are in."""
    record.cycle = loop_report.selection_cycle(prefix)
    if record.cycle is None:
        record.ledger = "nothing was queued, so there is nothing to compare"
        story.ui.say(f"round {record.round} label-savings ledger: {record.ledger}")
        return
    [row] = loop_report.ledger([record.cycle], story.settings.class_names)["cycles"]
    record.ledger = row["summary"]
    story.ui.say(
        f"round {record.round} label-savings ledger: {row['summary']} "
        f"(selected: {_per_image(row['selected'])}; random control: {_per_image(row['control'])})"
    )


def _per_image(arm: dict[str, Any]) -> str:
    value = arm["errors_per_image"]
    errors = "-" if value is None else f"{value:.2f}"
    return f"{errors} errors/image over {arm['reviewed']} reviewed"


def _measure_drift(story: Story, record: RoundRecord, round_started: datetime) -> None:
    run_step(story.ui, f"round {record.round}: drift", "drift/drift", {}, story.flow_timeout)
    drift = loop_report.drift_timeline(round_started)
    if drift:
        record.drift_level, record.drift_score = drift[-1]["level"], drift[-1]["score"]


def _check_and_retrain(story: Story, record: RoundRecord, round_started: datetime) -> None:
    run_step(
        story.ui,
        f"round {record.round}: check-and-retrain",
        "check-and-retrain/check-and-retrain",
        {},
        story.flow_timeout,
    )
    decisions = _events_since(EventKind.RETRAIN_CONDITIONS, round_started)
    record.decision = decisions[-1].message if decisions else "(no decision recorded)"


def _round_summary(record: RoundRecord) -> str:
    lighting = "drifted" if record.drifted else "normal"
    score = f" ({record.drift_score:.2f})" if record.drift_score is not None else ""
    return (
        f"round {record.round}: {record.uploaded} uploaded ({lighting}), "
        f"{record.queued} queued, {record.labelled} labelled, drift "
        f"{record.drift_level or 'not measured'}{score}; {record.decision} "
        f"({record.seconds:.0f} s)"
    )


def follow_retrain(story: Story, run_id: int) -> int | None:
    """Wait for the retraining run and tell how it ended; its id."""
    settings, ui = story.settings, story.ui
    run = wait_for_retrain(run_id, ui, settings.train_epochs, story.retrain_timeout)
    verdict = "promoted" if run.promoted else f"not promoted ({run.status})"
    ui.say(f"retraining run {run.id}: challenger version {run.model_version} {verdict}")
    for reason in run.decision_reasons or []:
        ui.say(f"  - {reason}")
    if run.error:
        ui.say(f"  error: {run.error}")
    return run.id


def build_report(
    story: Story, started: datetime, champion_before: str, rounds: list[RoundRecord]
) -> dict[str, Any]:
    """The story's report, read back from the platform's records since ``started``."""
    settings, plan = story.settings, story.plan
    retrains = loop_report.retrain_runs(started)
    final = get_alias(settings, CHAMPION)
    comparison = None
    judged = [r for r in retrains if r["holdout_snapshot_id"]]
    if judged and final is not None:
        comparison = compare_on_holdout(
            settings, judged[-1]["holdout_snapshot_id"], champion_before, final.version
        )
    return {
        "run_tag": story.run_tag,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "plan": {**asdict(plan), "drift": asdict(plan.drift)},
        "champion_before": champion_before,
        "champion_after": final.version if final else None,
        "images": loop_report.image_counts(f"demo/{story.run_tag}/"),
        "rounds": [asdict(r) for r in rounds],
        "ledger": loop_report.ledger(
            [r.cycle for r in rounds if r.cycle is not None], settings.class_names
        ),
        "drift": loop_report.drift_timeline(started),
        "retrains": retrains,
        "comparison": comparison,
    }


def save_report(report: dict[str, Any], report_dir: Path) -> dict[str, Any]:
    """Write the report as JSON and Markdown; the report with their paths added."""
    report_dir.mkdir(parents=True, exist_ok=True)
    json_path = report_dir / f"{report['run_tag']}.json"
    markdown_path = report_dir / f"{report['run_tag']}.md"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    markdown_path.write_text(loop_report.render_markdown(report))
    report["paths"] = {"json": str(json_path), "markdown": str(markdown_path)}
    return report
