"""The label-savings ledger: selection's picks against a random control, from reviewers' answers."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import SessionDep, SettingsDep
from api.errors import responses
from api.schemas import LedgerOut
from labeling.ledger import DEFAULT_CYCLES, ledger

router = APIRouter(prefix="/api/labeling", tags=["labeling"])

MAX_CYCLES = 500
"""The reviewed images of every cycle shown are read: the cap bounds one request's work."""


@router.get("/ledger", response_model=LedgerOut, responses=responses(422))
def label_savings(
    session: SessionDep,
    settings: SettingsDep,
    cycles: Annotated[
        int, Query(ge=1, le=MAX_CYCLES, description="How many of the newest cycles.")
    ] = DEFAULT_CYCLES,
) -> LedgerOut:
    """Per selection cycle and over those cycles together: champion errors per reviewed image in
    the selected arm against the random control arm, their difference and ratio with bootstrap
    intervals, and the comparison in plain words."""
    return LedgerOut.model_validate(ledger(session, settings.class_names, limit=cycles))
