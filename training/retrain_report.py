"""The report of one retrain: why it ran, what it learnt from, what changed, and what the gate said.

Written for every retrain that reaches a verdict, as Markdown for people, JSON for tools and
one HTML page (the Markdown rendered, its pictures inline) for the dashboard, to
``<reports bucket>/retrains/<run id>/report.{md,json,html}`` and beside the challenger's MLflow
run (``report/``), with a few held-out images drawn champion against challenger
(``images/<image hash>.png`` beside the report, linked from the Markdown).
Everything in it is read back from the platform's records (the run row, its stage events, the
snapshot's manifest and the reviewed labels), never from what the flow believes it did.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from training.comparison import render
from training.snapshots import fetch_files, get_snapshot, read_manifest
from visionloop.events import EventKind
from visionloop.models import (
    ActivityEvent,
    DatasetSnapshot,
    Image,
    LabelingQueueItem,
    RetrainingRun,
    ReviewedLabel,
)
from visionloop.settings import Settings
from visionloop.storage import ObjectStore

UNQUEUED = "not queued"
"""The selection reason of a label whose image never went through the review queue (labels
imported or added by hand)."""


def report_key(run_id: int, suffix: str) -> str:
    return f"retrains/{run_id}/report.{suffix}"


def example_path(image_hash: str) -> str:
    """An example image's path relative to the report (the same in the bucket and MLflow)."""
    return f"images/{image_hash}.png"


def example_key(run_id: int, image_hash: str) -> str:
    return f"retrains/{run_id}/{example_path(image_hash)}"


def _utc(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def stage_times(session: Session, run: RetrainingRun, until: datetime) -> list[dict[str, Any]]:
    """Each stage the run announced, when it started and how long it took (to the next stage's
    start, the last one to ``until``)."""
    since = _utc(run.started_at or run.created_at)
    events = session.exec(
        select(ActivityEvent)
        .where(
            ActivityEvent.kind == EventKind.RETRAIN_STAGE.value,
            col(ActivityEvent.created_at) >= since,
        )
        .order_by(col(ActivityEvent.id))
    ).all()
    # The payload's run id is JSON, filtered here on the few stage events since the start.
    mine = [e for e in events if e.payload.get("retraining_run_id") == run.id]
    stages = []
    for i, event in enumerate(mine):
        start = _utc(event.created_at)
        assert start is not None
        end = _utc(mine[i + 1].created_at) if i + 1 < len(mine) else until
        assert end is not None
        stages.append(
            {
                "stage": event.payload.get("stage"),
                "started_at": start.isoformat(),
                "seconds": round(max(0.0, (end - start).total_seconds()), 3),
            }
        )
    return stages


def labels_consumed(session: Session, image_hashes: Sequence[str]) -> dict[str, Any]:
    """The reviewed labels of the snapshot's images: in all, by verdict, and by the reason
    selection queued their image."""
    if not image_hashes:
        return {"total": 0, "by_verdict": {}, "by_reason": {}}
    rows = session.exec(
        select(ReviewedLabel.verdict, LabelingQueueItem.flagged_reason)
        .join(Image, col(Image.id) == col(ReviewedLabel.image_id))
        .join(
            LabelingQueueItem,
            col(LabelingQueueItem.image_id) == col(ReviewedLabel.image_id),
            isouter=True,
        )
        .where(col(Image.content_hash).in_(list(image_hashes)))
    ).all()
    return {
        "total": len(rows),
        "by_verdict": dict(Counter(str(getattr(v, "value", v)) for v, _ in rows)),
        "by_reason": dict(Counter(reason or UNQUEUED for _, reason in rows)),
    }


def per_class_change(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """AP50-95 and AP50 of every class, champion (before) and challenger (after), on the one
    held-out set both were scored on; a class absent from a side is None there."""
    after = (metrics.get("challenger") or {}).get("per_class") or {}
    before = ((metrics.get("champion") or {}).get("per_class")) or {}
    rows = []
    for name in sorted(set(after) | set(before)):
        old, new = before.get(name, {}), after.get(name, {})
        ap_old, ap_new = old.get("AP50-95"), new.get("AP50-95")
        rows.append(
            {
                "class": name,
                "instances": new.get("instances", old.get("instances")),
                "AP50-95_before": ap_old,
                "AP50-95_after": ap_new,
                "AP50-95_change": None
                if ap_old is None or ap_new is None
                else round(ap_new - ap_old, 6),
                "AP50_before": old.get("AP50"),
                "AP50_after": new.get("AP50"),
            }
        )
    return rows


def holdout_section(session: Session, metrics: dict[str, Any]) -> dict[str, Any]:
    """The frozen version both models were judged on, the images pending for the next one,
    and both models' scores on every version scored (the trend compares within a version)."""
    holdout_id = metrics.get("holdout_snapshot_id")
    row = session.get(DatasetSnapshot, holdout_id) if holdout_id is not None else None
    return {
        "version": metrics.get("holdout_version"),
        "hash": metrics.get("holdout_hash"),
        "images": row.num_images if row is not None else None,
        "pending": metrics.get("holdout_pending", 0),
        "growth": metrics.get("holdout_growth"),
        "by_version": {
            number: metrics["by_version"][number]
            for number in sorted(metrics.get("by_version") or {}, key=int, reverse=True)
        },
    }


def build_report(
    session: Session, run: RetrainingRun, image_hashes: Sequence[str], *, now: datetime
) -> dict[str, Any]:
    metrics = run.metrics or {}
    primary = metrics.get("primary_metric", "mAP50-95")
    challenger = (metrics.get("challenger") or {}).get("metrics") or {}
    champion = (metrics.get("champion") or {}).get("metrics") or {}
    return {
        "retraining_run_id": run.id,
        "trigger": run.trigger,
        "reason": run.reason,
        "status": str(getattr(run.status, "value", run.status)),
        "created_at": _utc(run.created_at).isoformat(),  # type: ignore[union-attr]
        "started_at": (_utc(run.started_at) or now).isoformat(),
        "written_at": now.isoformat(),
        "snapshot_id": run.snapshot_id,
        "snapshot_hash": metrics.get("snapshot_hash"),
        "holdout_hash": metrics.get("holdout_hash"),
        "mlflow_run_id": run.mlflow_run_id,
        "challenger_version": run.model_version,
        "champion_version": metrics.get("champion_version"),
        "labels": labels_consumed(session, image_hashes),
        "primary_metric": primary,
        "overall": {
            name: {"before": champion.get(name), "after": challenger.get(name)}
            for name in sorted(set(challenger) | set(champion))
        },
        "per_class": per_class_change(metrics),
        "holdout": holdout_section(session, metrics),
        "interval": metrics.get("interval"),
        "examples": [
            {
                "image_hash": e["image_hash"],
                "champion_map": e["champion_map"],
                "challenger_map": e["challenger_map"],
                "champion_boxes": len(e["champion_boxes"]),
                "challenger_boxes": len(e["challenger_boxes"]),
                "png": example_path(e["image_hash"]),
            }
            for e in metrics.get("examples") or []
        ],
        "verdict": {
            "promoted": bool(run.promoted),
            "reasons": list(run.decision_reasons or []),
        },
        "stages": stage_times(session, run, now),
    }


def _num(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _signed(value: Any) -> str:
    return "–" if value is None else f"{value:+.3f}"


def render_markdown(
    report: dict[str, Any], *, image_src: Callable[[dict[str, Any]], str] | None = None
) -> str:
    """The report for people; ``image_src`` says where each example's picture is (default: its
    path beside the report)."""
    verdict = report["verdict"]
    outcome = (
        f"version {report['challenger_version']} promoted to champion"
        if verdict["promoted"]
        else f"version {report['challenger_version']} not promoted; "
        f"the champion stays version {report['champion_version']}"
    )
    labels = report["labels"]
    holdout = report["holdout"]
    lines = [
        f"# Retraining run {report['retraining_run_id']}: {outcome}",
        "",
        f"- **Trigger:** {report['trigger']}"
        + (f" ({report['reason']})" if report["reason"] else ""),
        f"- **Started:** {report['started_at']}",
        f"- **Training snapshot:** #{report['snapshot_id']} "
        f"`{(report['snapshot_hash'] or '')[:12]}`",
        f"- **Held-out set:** {_version_name(holdout)} `{(report['holdout_hash'] or '')[:12]}`, "
        f"{_num(holdout['images'])} images (both models scored on it); "
        f"{holdout['pending']} new test-split images pending for the next version"
        + (f" (sealed at {holdout['growth']})" if holdout["growth"] else ""),
        f"- **MLflow run:** `{report['mlflow_run_id']}`",
        "",
        "## Labels it learnt from",
        "",
        f"{labels['total']} reviewed labels.",
        "",
        "| selected because | labels |",
        "| --- | ---: |",
        *(f"| {reason} | {n} |" for reason, n in sorted(labels["by_reason"].items())),
        "",
        "| verdict | labels |",
        "| --- | ---: |",
        *(f"| {verdict_} | {n} |" for verdict_, n in sorted(labels["by_verdict"].items())),
        "",
        f"## Champion (before) against challenger (after), {report['primary_metric']} decides",
        "",
        "| metric | before | after |",
        "| --- | ---: | ---: |",
        *(
            f"| {name} | {_num(v['before'])} | {_num(v['after'])} |"
            for name, v in report["overall"].items()
        ),
        "",
        "| class | instances | AP50-95 before | AP50-95 after | change "
        "| AP50 before | AP50 after |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {c['class']} | {_num(c['instances'])} | {_num(c['AP50-95_before'])} | "
            f"{_num(c['AP50-95_after'])} | {_signed(c['AP50-95_change'])} | "
            f"{_num(c['AP50_before'])} | {_num(c['AP50_after'])} |"
            for c in report["per_class"]
        ),
        "",
        *_interval_lines(report["interval"]),
        *_version_lines(holdout),
        "## Gate verdict",
        "",
        *(f"- {reason}" for reason in verdict["reasons"]),
        "",
        *_example_lines(report["examples"], image_src or (lambda e: e["png"])),
        "## Time per stage",
        "",
        "| stage | seconds |",
        "| --- | ---: |",
        *(f"| {s['stage']} | {s['seconds']:.1f} |" for s in report["stages"]),
        "",
    ]
    return "\n".join(lines)


def _version_name(holdout: dict[str, Any]) -> str:
    return f"version {holdout['version']}" if holdout["version"] is not None else "unversioned"


def _interval_lines(interval: dict[str, Any] | None) -> list[str]:
    if not interval:
        return []
    return [
        f"**How sure:** mAP50-95 challenger - champion = {interval['difference']:+.3f}, "
        f"{interval['level']:.0%} bootstrap interval [{interval['low']:+.3f}, "
        f"{interval['high']:+.3f}] ({interval['images']} held-out images, "
        f"{interval['resamples']} paired resamples).",
        "",
    ]


def _version_lines(holdout: dict[str, Any]) -> list[str]:
    versions = holdout["by_version"]
    if not versions:
        return []
    lines = [
        "### Scores by held-out version",
        "",
        "| version | images | champion mAP50-95 | challenger mAP50-95 |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for number, scores in versions.items():
        before = (scores.get("champion") or {}).get("mAP50-95")
        after = (scores.get("challenger") or {}).get("mAP50-95")
        lines.append(f"| {number} | {scores['images']} | {_num(before)} | {_num(after)} |")
    return [*lines, ""]


def _example_lines(
    examples: list[dict[str, Any]], image_src: Callable[[dict[str, Any]], str]
) -> list[str]:
    if not examples:
        return []
    lines = [
        "## Where they differ most",
        "",
        "Champion (left, orange) and challenger (right, blue) on held-out images, the reviewed "
        "boxes in green.",
        "",
    ]
    for e in examples:
        lines += [
            f"![{e['image_hash'][:12]}]({image_src(e)})",
            "",
            f"`{e['image_hash'][:12]}`: mAP50-95 {e['champion_map']:.3f} → "
            f"{e['challenger_map']:.3f}, {e['champion_boxes']} → {e['challenger_boxes']} boxes "
            "shown",
            "",
        ]
    return lines


REPORT_STYLE = (
    "body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;"
    "color:#202124}table{border-collapse:collapse;margin:.5rem 0}th,td{border:1px solid #dadce0;"
    "padding:.2rem .6rem}code{background:#f1f3f4;padding:0 .2rem}img{max-width:100%}"
)


def render_html(report: dict[str, Any], pictures: Mapping[str, bytes]) -> str:
    """The Markdown report as one page that needs nothing else: the pictures are inline, so it
    opens from the dashboard (which fetches it with the token) and from MLflow as it is. Raw
    HTML in the Markdown (a trigger's reason is free text) is escaped, never rendered."""
    from markdown_it import MarkdownIt

    def inline(example: dict[str, Any]) -> str:
        png = pictures.get(example["image_hash"])
        if png is None:
            return str(example["png"])
        return "data:image/png;base64," + base64.b64encode(png).decode()

    parser = MarkdownIt("commonmark", {"html": False}).enable("table")
    body = parser.render(render_markdown(report, image_src=inline))
    title = html.escape(f"Retraining run {report['retraining_run_id']}")
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{REPORT_STYLE}</style></head><body>\n{body}</body></html>\n"
    )


def render_examples(
    settings: Settings, session: Session, store: ObjectStore, metrics: dict[str, Any]
) -> dict[str, bytes]:
    """Each example drawn from the held-out snapshot's own files (checked against its
    manifest): image hash to PNG."""
    examples = metrics.get("examples") or []
    if not examples:
        return {}
    holdout = get_snapshot(session, metrics["holdout_snapshot_id"])
    items = {i["image_hash"]: i for i in read_manifest(settings, holdout, store)["images"]}
    pictures = {}
    for example in examples:
        image, label = fetch_files(settings, store, holdout, items[example["image_hash"]])
        pictures[example["image_hash"]] = render(
            image, label.decode(), example, holdout.class_names
        )
    return pictures


def write_report(
    settings: Settings, session: Session, run_id: int, image_hashes: Sequence[str]
) -> dict[str, str]:
    """Build, store and attach the run's report; the object keys it was written to."""
    from visionloop.registry import client as mlflow_client

    run = session.get(RetrainingRun, run_id)
    if run is None:
        raise LookupError(f"no retraining run {run_id}")
    report = build_report(session, run, image_hashes, now=datetime.now(UTC))
    markdown = render_markdown(report)
    document = json.dumps(report, indent=2)
    store = ObjectStore(settings)
    pictures = render_examples(settings, session, store, run.metrics or {})
    page = render_html(report, pictures)
    keys = {key: report_key(run_id, key) for key in ("md", "json", "html")}
    # The pictures first: a report in the bucket never links to an image that is not there.
    for image_hash, png in pictures.items():
        key = example_key(run_id, image_hash)
        store.put_bytes(settings.bucket_reports, key, png, "image/png")
        keys[f"png:{image_hash}"] = key
    store.put_bytes(settings.bucket_reports, keys["md"], markdown.encode(), "text/markdown")
    store.put_bytes(settings.bucket_reports, keys["json"], document.encode(), "application/json")
    store.put_bytes(settings.bucket_reports, keys["html"], page.encode(), "text/html")
    if run.mlflow_run_id:
        mlflow = mlflow_client(settings)
        mlflow.log_text(run.mlflow_run_id, markdown, "report/retrain-report.md")
        mlflow.log_text(run.mlflow_run_id, document, "report/retrain-report.json")
        mlflow.log_text(run.mlflow_run_id, page, "report/retrain-report.html")
        if pictures:
            with tempfile.TemporaryDirectory() as folder:
                for image_hash, png in pictures.items():
                    path = Path(folder) / example_path(image_hash)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(png)
                mlflow.log_artifacts(
                    run.mlflow_run_id, str(Path(folder) / "images"), "report/images"
                )
    return keys
