"""The retrain report as one HTML page: the Markdown rendered, the pictures inline, free text
escaped. (The report of a real retrain is checked in tests/test_retrain.py.)"""

from __future__ import annotations

import base64
import io
import re
from typing import Any

import numpy as np
from PIL import Image as PILImage

from training.retrain_report import render_html, render_markdown


def _png(shade: int) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(np.full((8, 16, 3), shade, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _report(reason: str) -> dict[str, Any]:
    examples = [
        {
            "image_hash": h * 64,
            "champion_map": 0.1,
            "challenger_map": 0.6,
            "champion_boxes": 1,
            "challenger_boxes": 2,
            "png": f"images/{h * 64}.png",
        }
        for h in ("a", "b")
    ]
    return {
        "retraining_run_id": 7,
        "trigger": "manual",
        "reason": reason,
        "started_at": "2026-12-07T10:00:00+00:00",
        "snapshot_id": 3,
        "snapshot_hash": "c" * 64,
        "holdout_hash": "d" * 64,
        "mlflow_run_id": "run",
        "challenger_version": "5",
        "champion_version": "4",
        "labels": {"total": 12, "by_reason": {"uncertainty": 12}, "by_verdict": {"correct": 12}},
        "primary_metric": "mAP50-95",
        "overall": {"mAP50-95": {"before": 0.31, "after": 0.42}},
        "per_class": [],
        "holdout": {"version": 2, "images": 9, "pending": 3, "growth": 10, "by_version": {}},
        "interval": {
            "difference": 0.11,
            "low": 0.02,
            "high": 0.19,
            "level": 0.95,
            "resamples": 1000,
            "images": 9,
        },
        "examples": examples,
        "verdict": {"promoted": True, "reasons": ["mAP50-95 rose by 0.110."]},
        "stages": [{"stage": "train", "seconds": 12.0}],
    }


def test_the_page_carries_its_pictures_inline_and_escapes_free_text() -> None:
    report = _report("<script>alert(1)</script> after the storm")
    pictures = {"a" * 64: _png(10), "b" * 64: _png(200)}
    page = render_html(report, pictures)

    assert page.startswith("<!doctype html>") and "<title>Retraining run 7</title>" in page
    sources = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert [base64.b64decode(s) for s in sources] == [pictures["a" * 64], pictures["b" * 64]]
    assert "<table>" in page and ">0.420</td>" in page  # Markdown tables become tables
    assert "<strong>How sure:</strong>" in page
    # A trigger's reason is typed by whoever started the run: shown, never run.
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page

    # The Markdown keeps linking the files beside it; a picture that is missing stays a link.
    markdown = render_markdown(report)
    assert f"![{'a' * 12}](images/{'a' * 64}.png)" in markdown
    partial = render_html(report, {"a" * 64: _png(10)})
    assert partial.count("data:image/png;base64,") == 1
    assert f'src="images/{"b" * 64}.png"' in partial
