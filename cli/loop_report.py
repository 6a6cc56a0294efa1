"""What one turn of the loop did, read back from the platform's own records.

The demo ends with this report, and the end-to-end test asserts on it: images ingested,
quarantined (with reasons), queued and labelled; the label-savings ledger of every round's
selection cycle; drift levels over time; every retrain decision with its reasons; and the
champion's mAP before and after on one held-out set.
Everything comes from the database and MLflow, not from what the demo believes it did.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any, TypeVar

from sqlmodel import col, func, select

from labeling.ledger import ledger as savings_ledger
from visionloop.db import session_scope
from visionloop.models import (
    DriftResult,
    Image,
    ImageStatus,
    LabelingQueueItem,
    RetrainingRun,
    ReviewedLabel,
)

T = TypeVar("T")


def image_counts(source_prefix: str) -> dict[str, Any]:
    """Images whose source key contains ``source_prefix``: by fate, with quarantine reasons."""
    with session_scope() as session:
        images = list(
            session.exec(select(Image).where(col(Image.source_key).contains(source_prefix)))
        )
        ids = [i.id for i in images if i.id is not None]
        queue = (
            list(
                session.exec(
                    select(LabelingQueueItem).where(col(LabelingQueueItem.image_id).in_(ids))
                )
            )
            if ids
            else []
        )
        labels = (
            list(session.exec(select(ReviewedLabel).where(col(ReviewedLabel.image_id).in_(ids))))
            if ids
            else []
        )
    quarantined = [i for i in images if i.status == ImageStatus.quarantined]
    return {
        "files": len(images),
        "ingested": len(images) - len(quarantined),
        "quarantined": len(quarantined),
        "quarantine_reasons": {
            (i.source_key or "").rsplit("/", 1)[-1]: i.quarantine_reason for i in quarantined
        },
        "queued": len(queue),
        "queued_by_reason": dict(Counter(q.flagged_reason for q in queue)),
        "labelled": len(labels),
        "reviewers": dict(Counter(label.reviewer or "unknown" for label in labels)),
    }


def selection_cycle(source_prefix: str) -> str | None:
    """The selection cycle that queued images whose source key contains ``source_prefix``
    (one ingest run queues a round's images; the most frequent cycle if ever several)."""
    count = func.count()
    with session_scope() as session:
        row = session.exec(
            select(LabelingQueueItem.cycle, count)
            .join(Image, col(Image.id) == col(LabelingQueueItem.image_id))
            .where(
                col(Image.source_key).contains(source_prefix),
                col(LabelingQueueItem.cycle).is_not(None),
            )
            .group_by(LabelingQueueItem.cycle)
            .order_by(count.desc())
        ).first()
    return row[0] if row else None


def ledger(cycles: Sequence[str], class_names: Sequence[str]) -> dict[str, Any]:
    """The label-savings ledger of ``cycles`` (in their order) and of all of them together."""
    with session_scope() as session:
        result = savings_ledger(session, class_names, cycles)
    return asdict(result)


def rows_since(model: type[T], since: datetime) -> list[T]:
    """Rows of ``model`` created at or after ``since``, oldest first."""
    with session_scope() as session:
        return list(
            session.exec(
                select(model).where(model.created_at >= since).order_by(col(model.id))  # type: ignore[attr-defined]
            )
        )


def drift_timeline(since: datetime) -> list[dict[str, Any]]:
    timeline = []
    for row in rows_since(DriftResult, since):
        per_feature = {
            name: f for name, f in (row.features or {}).items() if isinstance(f, dict)
        }  # besides the features, the row keeps a few scalars (the adjusted p-value)
        drifted = [
            name
            for name, f in sorted(per_feature.items(), key=lambda kv: -kv[1].get("severity", 0.0))
            if f.get("drifted")
        ]
        timeline.append(
            {
                "at": row.created_at.isoformat(),
                "level": str(getattr(row.level, "value", row.level)),
                "score": round(row.drift_score, 3),
                "window": row.window_size,
                "model_version": row.model_version,
                "drifted_features": drifted,
            }
        )
    return timeline


def retrain_runs(since: datetime) -> list[dict[str, Any]]:
    runs = []
    for row in rows_since(RetrainingRun, since):
        metrics = row.metrics or {}
        primary = metrics.get("primary_metric", "mAP50-95")
        runs.append(
            {
                "id": row.id,
                "trigger": row.trigger,
                "reason": row.reason,
                "status": str(getattr(row.status, "value", row.status)),
                "promoted": row.promoted,
                "challenger_version": row.model_version,
                "champion_version": metrics.get("champion_version"),
                "primary_metric": primary,
                "challenger": (metrics.get("challenger") or {}).get("metrics"),
                "champion": (metrics.get("champion") or {}).get("metrics"),
                "holdout_snapshot_id": metrics.get("holdout_snapshot_id"),
                "holdout_hash": metrics.get("holdout_hash"),
                "reasons": list(row.decision_reasons or []),
                "error": row.error,
            }
        )
    return runs


def retrain_verdict(run: dict[str, Any]) -> str:
    """A finished run says whether it promoted; one that did not finish says its status."""
    return {True: "promoted", False: "not promoted"}.get(run["promoted"], run["status"])


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown (saved next to the JSON, readable in any viewer)."""
    lines = [
        "# visionloop demo report",
        "",
        f"Run `{report['run_tag']}`, {report['started_at']} to {report['finished_at']}.",
        "",
        *_images_section(report["images"]),
        *_rounds_section(report["rounds"]),
        *_ledger_section(report.get("ledger"), report["rounds"]),
        *_drift_section(report["drift"]),
        *_retrains_section(report["retrains"]),
        *_comparison_section(report.get("comparison")),
    ]
    return "\n".join(lines) + "\n"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows),
    ]


def _images_section(images: dict[str, Any]) -> list[str]:
    counts = ["files", "ingested", "quarantined", "queued", "labelled"]
    lines = ["## Images", "", *_table(counts, [[images[k] for k in counts]]), ""]
    if images["quarantine_reasons"]:
        lines += ["Quarantined:", ""]
        lines += [f"- `{name}`: {reason}" for name, reason in images["quarantine_reasons"].items()]
        lines.append("")
    if images["queued_by_reason"]:
        by_reason = sorted(images["queued_by_reason"].items())
        lines += ["Queued because: " + ", ".join(f"{reason} {n}" for reason, n in by_reason), ""]
    return lines


def _rounds_section(rounds: list[dict[str, Any]]) -> list[str]:
    header = ["round", "drifted", "uploaded", "queued", "labelled", "drift", "decision"]
    rows = [
        [
            r["round"],
            "yes" if r["drifted"] else "no",
            r["uploaded"],
            r["queued"],
            r["labelled"],
            r["drift_level"] or "-",
            r["decision"],
        ]
        for r in rounds
    ]
    return ["## Rounds", "", *_table(header, rows), ""]


def _per_image(arm: dict[str, Any]) -> str:
    value = arm["errors_per_image"]
    return f"{'-' if value is None else f'{value:.2f}'} ({arm['reviewed']} of {arm['queued']})"


def _ledger_section(ledger: dict[str, Any] | None, rounds: list[dict[str, Any]]) -> list[str]:
    lines = ["## Label-savings ledger", ""]
    if not ledger:
        return [*lines, "No selection cycle was recorded.", ""]
    level = f"{ledger['level'] * 100:.0f}%"
    round_of = {r.get("cycle"): r["round"] for r in rounds}
    rows = []
    for row in [*ledger["cycles"], ledger["cumulative"]]:
        spread = row["difference_interval"]
        rows.append(
            [
                "all" if row["cycle"] is None else round_of.get(row["cycle"], row["cycle"]),
                _per_image(row["selected"]),
                _per_image(row["control"]),
                "-"
                if spread is None
                else f"{row['difference']:+.2f} ({spread['low']:+.2f} to {spread['high']:+.2f})",
                row["summary"],
            ]
        )
    header = [
        "round",
        "selected errors / image (reviewed of queued)",
        "control errors / image (reviewed of queued)",
        f"difference ({level} interval)",
        "in words",
    ]
    return [
        *lines,
        "Champion errors (shown boxes corrected + boxes missed) per reviewed image: the images "
        "selection picked against a uniform random draw of the same cycle.",
        "",
        *_table(header, rows),
        "",
    ]


def _drift_section(drift: list[dict[str, Any]]) -> list[str]:
    rows = [
        [d["at"][:19], d["level"], f"{d['score']:.2f}", ", ".join(d["drifted_features"]) or "-"]
        for d in drift
    ]
    header = ["at", "level", "score", "drifted features"]
    return ["## Drift over time", "", *_table(header, rows), ""]


def _retrains_section(retrains: list[dict[str, Any]]) -> list[str]:
    lines = ["## Retrains", ""]
    if not retrains:
        lines.append("No retrain ran.")
    for run in retrains:
        lines += [
            f"### Retraining run {run['id']} ({run['trigger']}): {retrain_verdict(run)}",
            "",
            f"Why it started: {run['reason'] or '-'}",
            "",
        ]
        if run["error"]:
            lines += [f"Error: {run['error']}", ""]
        lines += [f"- {reason}" for reason in run["reasons"]]
        lines.append("")
    return lines


def _comparison_section(comparison: dict[str, Any] | None) -> list[str]:
    lines = ["## Champion before and after, same held-out set", ""]
    if not comparison:
        return [*lines, "No held-out comparison: no retrain produced a held-out set."]
    rows = [
        [
            role,
            comparison[role]["version"],
            f"{comparison[role]['metrics']['mAP50']:.3f}",
            f"{comparison[role]['metrics']['mAP50-95']:.3f}",
        ]
        for role in ("before", "after")
    ]
    return [
        *lines,
        f"Held-out snapshot {comparison['holdout_hash'][:12]} "
        f"({comparison['holdout_images']} images).",
        "",
        *_table(["model", "version", "mAP50", "mAP50-95"], rows),
    ]
