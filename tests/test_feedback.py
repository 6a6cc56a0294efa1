"""Reviewer feedback exports and trends: filters on SQLite and PostgreSQL, and through the API."""

from __future__ import annotations

import csv
import io
import json
import uuid
from datetime import UTC, date, datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, delete

from api.main import create_app
from cli.stack import Stack
from labeling import feedback
from labeling.feedback import FeedbackFilter, as_csv, as_json, feedback_records, feedback_trend
from visionloop.db import session_scope
from visionloop.models import Image, ReviewedLabel, Verdict
from visionloop.settings import get_settings

TODAY = date(2026, 11, 30)
NOON = datetime(2026, 11, 30, 12, tzinfo=UTC)


def _seed(engine: Engine, tag: str) -> list[int]:
    """Six reviews over four days by two reviewers; the ids of their images."""
    plan = [
        # days before TODAY, verdict, reviewer, box classes
        (0, Verdict.accepted, "ana", ["scratch"]),
        (0, Verdict.corrected, "ben", ["scratch", "dent"]),
        (0, Verdict.rejected, "ana", []),
        (1, Verdict.corrected, "ana", ["dent"]),
        (3, Verdict.accepted, "ben", ["scratch"]),
        (9, Verdict.accepted, "ben", ["dent"]),  # outside a 7-day window
    ]
    ids = []
    with Session(engine) as session:
        for i, (ago, verdict, reviewer, classes) in enumerate(plan):
            image = Image(content_hash=uuid.uuid4().hex * 2, object_key=f"{tag}/{i}.jpg")
            session.add(image)
            session.flush()
            assert image.id is not None
            ids.append(image.id)
            # 23:30 on the day: late enough that a wrong time zone would move it a day.
            moment = NOON - timedelta(days=ago) + timedelta(hours=11, minutes=30)
            boxes = [
                {"cls": 0, "name": name, "cx": 0.5, "cy": 0.5, "w": 0.1, "h": 0.1}
                for name in classes
            ]
            session.add(
                ReviewedLabel(
                    image_id=image.id,
                    image_path=f"{tag}/{i}.jpg",
                    label=classes[0] if classes else None,
                    boxes=boxes,
                    reviewer=f"{tag}-{reviewer}",
                    verdict=verdict,
                    prediction_model_version="3",
                    created_at=moment,
                    box_feedback=[
                        {"verdict": "correct" if n == 0 else "missed", "name": name}
                        for n, name in enumerate(classes)
                    ],
                    approved_by="cy" if i == 1 else None,
                    approved_at=moment if i == 1 else None,
                )
            )
        session.commit()
    return ids


def test_the_trend_counts_each_utc_day_and_fills_the_gaps(engine: Engine) -> None:
    _seed(engine, "t")
    with Session(engine) as session:
        trend = feedback_trend(session, 7, today=TODAY)
    assert [d.day for d in trend] == [TODAY - timedelta(days=6 - i) for i in range(7)]
    by_day = {d.day: d for d in trend}
    last = by_day[TODAY]
    assert (last.reviewed, last.accepted, last.corrected, last.rejected) == (3, 1, 1, 1)
    assert last.error_rate == pytest.approx(2 / 3, abs=1e-4)
    assert (
        by_day[TODAY - timedelta(days=1)].corrected,
        by_day[TODAY - timedelta(days=3)].accepted,
    ) == (1, 1)
    empty = by_day[TODAY - timedelta(days=2)]
    assert empty.reviewed == 0 and empty.error_rate is None
    assert sum(d.reviewed for d in trend) == 5  # the review of nine days ago is outside


def test_exports_filter_by_date_class_verdict_and_reviewer(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed(engine, "e")
    monkeypatch.setattr(feedback, "PAGE", 2)  # several pages even for six rows

    def ids(where: FeedbackFilter) -> list[str]:
        return [r["image_path"] for r in feedback_records(engine, where)]

    assert ids(FeedbackFilter()) == [f"e/{i}.jpg" for i in range(6)]
    assert ids(FeedbackFilter(verdict=Verdict.accepted)) == ["e/0.jpg", "e/4.jpg", "e/5.jpg"]
    assert ids(FeedbackFilter(reviewer="e-ana")) == ["e/0.jpg", "e/2.jpg", "e/3.jpg"]
    assert ids(FeedbackFilter(class_name="dent")) == ["e/1.jpg", "e/3.jpg", "e/5.jpg"]
    since = datetime.combine(TODAY - timedelta(days=1), datetime.min.time(), tzinfo=UTC)
    assert ids(FeedbackFilter(since=since)) == [f"e/{i}.jpg" for i in range(4)]
    # A bound in another time zone means the same instant.
    until = since.astimezone(timezone(timedelta(hours=-5)))
    assert ids(FeedbackFilter(until=until)) == ["e/4.jpg", "e/5.jpg"]
    assert ids(FeedbackFilter(reviewer="e-ben", class_name="scratch")) == ["e/1.jpg", "e/4.jpg"]

    rows = list(
        csv.DictReader(io.StringIO("".join(as_csv(feedback_records(engine, FeedbackFilter())))))
    )
    assert [r["verdict"] for r in rows] == [
        "accepted",
        "corrected",
        "rejected",
        "corrected",
        "accepted",
        "accepted",
    ]
    assert rows[1]["classes"] == "dent|scratch" and rows[1]["boxes"] == "2"
    assert rows[1]["reviewer"] == "e-ben" and rows[1]["model_version"] == "3"
    assert rows[1]["box_feedback"] == "correct=1|incorrect=0|adjusted=0|missed=1"
    assert rows[1]["approved_by"] == "cy" and rows[0]["approved_by"] == ""
    verdicts = json.loads(
        "".join(as_json(feedback_records(engine, FeedbackFilter(reviewer="e-ben"))))
    )[0]["box_feedback"]
    assert [(e["verdict"], e["name"]) for e in verdicts] == [
        ("correct", "scratch"),
        ("missed", "dent"),
    ]
    as_list = json.loads(
        "".join(as_json(feedback_records(engine, FeedbackFilter(verdict=Verdict.rejected))))
    )
    assert len(as_list) == 1 and as_list[0]["boxes"] == [] and as_list[0]["classes"] == []
    assert json.loads("".join(as_json(iter([])))) == []


@pytest.mark.stack
def test_the_api_exports_behind_the_read_token_and_answers_trends(stack: Stack) -> None:
    settings = get_settings()
    tag = f"api{uuid.uuid4().hex[:6]}"
    with session_scope() as session:
        engine = session.get_bind()
    image_ids = _seed(engine, tag)  # type: ignore[arg-type]
    # An empty read token means the API token reads too.
    token = settings.api_read_token.get_secret_value() or settings.api_token.get_secret_value()
    read = {"Authorization": f"Bearer {token}"}
    try:
        with TestClient(create_app(), raise_server_exceptions=False) as client:
            url = f"/api/labeling/feedback/export?reviewer={tag}-ana"
            assert client.get(url).status_code == 401
            response = client.get(url, headers=read)
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/csv")
            assert "attachment" in response.headers["content-disposition"]
            rows = list(csv.DictReader(io.StringIO(response.text)))
            assert [r["image_path"] for r in rows] == [
                f"{tag}/0.jpg",
                f"{tag}/2.jpg",
                f"{tag}/3.jpg",
            ]

            as_json_body = client.get(
                f"/api/labeling/feedback/export?format=json&reviewer={tag}-ben&cls=dent"
                "&verdict=corrected&since=2026-11-29T00:00:00Z",
                headers=read,
            )
            assert [r["image_path"] for r in as_json_body.json()] == [f"{tag}/1.jpg"]
            bad = client.get("/api/labeling/feedback/export?verdict=maybe", headers=read)
            assert bad.status_code == 422

            trend = client.get("/api/labeling/feedback/trends?days=3").json()
            assert len(trend) == 3 and trend[-1]["day"] == datetime.now(UTC).date().isoformat()
            assert client.get("/api/labeling/feedback/trends?days=0").status_code == 422
    finally:
        with session_scope() as session:
            session.exec(delete(ReviewedLabel).where(col(ReviewedLabel.image_id).in_(image_ids)))
            session.exec(delete(Image).where(col(Image.id).in_(image_ids)))
