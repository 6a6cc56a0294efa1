"""Reviewer feedback: exports for analysis elsewhere, and the trend over the last days."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response, StreamingResponse

from api.deps import EngineDep, ReadToken, SessionDep
from api.errors import AUTH, content, responses
from api.schemas import FeedbackDayOut, IsoDatetime
from labeling.feedback import FeedbackFilter, as_csv, as_json, feedback_records, feedback_trend
from visionloop.models import Verdict

router = APIRouter(prefix="/api/labeling/feedback", tags=["labeling"])

_MEDIA = {"csv": "text/csv", "json": "application/json"}


@router.get(
    "/export",
    response_class=Response,
    dependencies=[ReadToken],
    responses={
        **content(
            ("text/csv", "application/json"),
            "CSV with `format=csv` (the default), one line per reviewed image; with "
            "`format=json` an array, boxes included.",
        ),
        **AUTH,
        **responses(422),
    },
)
def export(
    engine: EngineDep,
    format: Literal["csv", "json"] = "csv",
    since: Annotated[
        IsoDatetime | None, Query(description="Reviewed at or after (ISO 8601).")
    ] = None,
    until: Annotated[IsoDatetime | None, Query(description="Reviewed before (ISO 8601).")] = None,
    verdict: Verdict | None = None,
    reviewer: Annotated[str | None, Query(max_length=255)] = None,
    cls: Annotated[
        str | None, Query(max_length=100, description="Only labels with a box of this class.")
    ] = None,
) -> StreamingResponse:
    """Every reviewer verdict matching the filters, oldest first, as a download (data-bearing:
    it names images and reviewers)."""
    where = FeedbackFilter(
        since=since, until=until, verdict=verdict, reviewer=reviewer, class_name=cls
    )
    records = feedback_records(engine, where)
    body = as_csv(records) if format == "csv" else as_json(records)
    return StreamingResponse(
        body,
        media_type=_MEDIA[format],
        headers={"Content-Disposition": f'attachment; filename="feedback.{format}"'},
    )


@router.get("/trends", response_model=list[FeedbackDayOut], responses=responses(422))
def trends(
    session: SessionDep, days: Annotated[int, Query(ge=1, le=366)] = 30
) -> list[FeedbackDayOut]:
    """Reviews per UTC day over the last ``days`` days, oldest first, with the share that
    changed the champion's answer (corrected or rejected)."""
    return [FeedbackDayOut.model_validate(day) for day in feedback_trend(session, days)]
