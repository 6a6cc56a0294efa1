"""Label Studio's side of the loop: the webhook it calls when reviewers act."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, BackgroundTasks, Body
from sqlalchemy.engine import Engine
from sqlmodel import Session

from api.deps import EngineDep, SessionDep, SettingsDep, WebhookToken
from labeling.sync import announce, sync_labels, task_ids_for_annotations
from visionloop.db import session_scope
from visionloop.settings import Settings

router = APIRouter(prefix="/api/labeling", tags=["labeling"])


def _ids(items: Any) -> list[int]:
    return [int(item["id"]) for item in items or [] if isinstance(item, dict) and "id" in item]


def affected_tasks(session: Session, event: dict[str, Any]) -> list[int]:
    """The task ids a Label Studio webhook event is about (``session`` resolves deletions)."""
    action = event.get("action")
    if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
        task_id = (event.get("task") or {}).get("id", (event.get("annotation") or {}).get("task"))
        return [int(task_id)] if task_id is not None else []
    if action == "ANNOTATIONS_CREATED":  # bulk: a list under the singular key
        return sorted(
            {int(a["task"]) for a in event.get("annotation") or [] if a.get("task") is not None}
        )
    if action == "ANNOTATIONS_DELETED":
        return task_ids_for_annotations(session, _ids(event.get("annotations")))
    if action == "TASKS_DELETED":
        return _ids(event.get("tasks"))
    return []


def _sync(engine: Engine, settings: Settings, task_ids: list[int]) -> None:
    # Runs after the response, when the request's session is closed: a session of its own on
    # the request's engine, committed before the activity event.
    with session_scope(engine) as session:
        report = sync_labels(session, settings, task_ids)
    announce(report, via="webhook")


@router.post("/webhook", status_code=202, dependencies=[WebhookToken])
def label_studio_webhook(
    background: BackgroundTasks,
    settings: SettingsDep,
    session: SessionDep,
    engine: EngineDep,
    event: dict[str, Any] = Body(...),
) -> dict[str, Any]:
    """Sync the tasks an annotation or task event names from Label Studio.

    Answers at once and syncs after the response: Label Studio waits for webhooks with a
    short timeout, and the sync itself calls Label Studio back.
    """
    task_ids = affected_tasks(session, event)
    if task_ids:
        background.add_task(_sync, engine, settings, task_ids)
    return {"action": event.get("action"), "tasks": task_ids}
