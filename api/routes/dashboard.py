"""The dashboard: one static page and its script, no front-end build step.

Everything it shows comes from this API's JSON endpoints and its live event stream.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse, Response

from visionloop.events import EventKind

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

router = APIRouter(tags=["dashboard"], include_in_schema=False)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/dashboard")


@router.get("/dashboard")
def dashboard() -> FileResponse:
    # No caching: a dashboard left open across an upgrade reloads the new page.
    return FileResponse(STATIC_DIR / "dashboard.html", headers={"Cache-Control": "no-cache"})


@router.get("/dashboard/event-kinds.js")
def event_kinds() -> Response:
    """The event kinds as a script, so the page names them from the one list the platform emits."""
    kinds = ", ".join(f'{kind.name}: "{kind.value}"' for kind in EventKind)
    return Response(
        f"const EventKind = Object.freeze({{{kinds}}});\n",
        media_type="text/javascript",
        headers={"Cache-Control": "no-cache"},
    )
