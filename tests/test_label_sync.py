"""Reviewers' annotations, made through Label Studio's API, arriving as reviewed labels.

Every annotation below reaches the platform through Label Studio's webhook to the API; the
label-sync flow then finds nothing left to do, and picks up what happens while the
webhook is switched off.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from samples import good_jpegs
from sqlmodel import col, select

from cli.stack import Stack
from labeling.label_config import FROM_NAME, NOTES_NAME, TO_NAME, VERDICT_NAME
from labeling.selection import SelectionPolicy
from labeling.wiring import ReviewProject, ensure_webhook, review_project, webhook_url
from visionloop.db import session_scope
from visionloop.events import recent
from visionloop.models import (
    Image,
    LabelingQueueItem,
    Prediction,
    QueueStatus,
    ReviewedLabel,
    Verdict,
)
from visionloop.settings import Settings, get_settings
from visionloop.storage import ObjectStore

pytestmark = [pytest.mark.stack, pytest.mark.slow]

PREFIX = "sync-test/"
IMAGES = 13


@pytest.fixture(scope="module")
def queued(stack: Stack) -> dict[int, LabelingQueueItem]:
    """Eight images queued for review (band 0..1 plus a full audit: every image qualifies)."""
    from flows.bootstrap import bootstrap_flow
    from flows.ingest import ingest_flow

    settings = get_settings()
    bootstrap_flow(epochs=2, images=16)
    store = ObjectStore(settings)
    for name, data in good_jpegs(IMAGES, seed=201).items():
        store.put_bytes(settings.bucket_incoming, PREFIX + name, data)
    policy = SelectionPolicy(
        strategy="confidence_band", low=0.0, high=1.0, budget=IMAGES, audit_rate=1.0
    )
    summary = ingest_flow(prefix=PREFIX, conf=0.001, selection=policy)
    assert summary["queued"] == IMAGES
    with session_scope() as session:
        items = session.exec(
            select(LabelingQueueItem).where(
                col(LabelingQueueItem.image_id).in_(summary["queued_images"])
            )
        )
        return {item.label_studio_task_id: item for item in items}


@pytest.fixture(scope="module")
def project(stack: Stack) -> ReviewProject:
    return review_project(get_settings())


def row(task_id: int) -> LabelingQueueItem:
    with session_scope() as session:
        return session.exec(
            select(LabelingQueueItem).where(LabelingQueueItem.label_studio_task_id == task_id)
        ).one()


def label_of(task_id: int) -> ReviewedLabel | None:
    with session_scope() as session:
        return session.exec(
            select(ReviewedLabel).where(ReviewedLabel.label_studio_task_id == task_id)
        ).first()


def eventually(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.5)


def predicted_result(project: ReviewProject, task_id: int) -> list[dict[str, Any]]:
    [prediction] = project.ls.tasks.get(id=task_id).predictions
    return [{k: v for k, v in r.items() if k != "score"} for r in prediction.result]


def rect(
    x: float, y: float, w: float, h: float, label: str, size: tuple[int, int]
) -> dict[str, Any]:
    return {
        "from_name": FROM_NAME,
        "to_name": TO_NAME,
        "type": "rectanglelabels",
        "original_width": size[0],
        "original_height": size[1],
        "value": {
            "x": x,
            "y": y,
            "width": w,
            "height": h,
            "rotation": 0,
            "rectanglelabels": [label],
        },
    }


def image_size(task_id: int) -> tuple[int, int]:
    with session_scope() as session:
        image = session.get(Image, row(task_id).image_id)
        return image.width, image.height


@pytest.fixture(scope="module")
def reviewed(queued: dict[int, LabelingQueueItem], project: ReviewProject) -> dict[str, int]:
    """One task per reviewer action, annotated through Label Studio's API."""
    tasks = sorted(queued)
    roles = dict(
        zip(
            ["accept", "correct", "reject", "invalid", "skip", "delete", "later", "untouched"],
            tasks,
        )
    )
    ls = project.ls
    size = image_size(roles["accept"])
    assert predicted_result(project, roles["accept"]) and predicted_result(
        project, roles["correct"]
    )
    ls.annotations.create(id=roles["accept"], result=predicted_result(project, roles["accept"]))
    ls.annotations.create(
        id=roles["correct"],
        result=predicted_result(project, roles["correct"])[:1]
        + [rect(70, 70, 20, 20, "stain", size)],
    )
    ls.annotations.create(id=roles["reject"], result=[])  # "there is nothing here"
    ls.annotations.create(
        id=roles["invalid"],
        result=[
            rect(10, 10, 20, 20, "crack", size),
            rect(90, 10, 30, 20, "dent", size),
            rect(10, 10, 0.1, 20, "dent", size),
        ],
    )
    ls.annotations.create(id=roles["skip"], result=[], was_cancelled=True)
    ls.tasks.delete(id=roles["delete"])
    return roles


def test_the_webhook_opens_with_its_secret_or_the_api_token_and_nothing_else(
    settings: Settings,
) -> None:
    event = {"action": "TASKS_DELETED", "tasks": [{"id": 1}]}
    assert httpx.post(webhook_url(settings), json=event, timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer wrong"}
    assert (
        httpx.post(webhook_url(settings), json=event, headers=wrong, timeout=10).status_code == 401
    )
    # An action the sync ignores: opening the webhook must not touch Label Studio's tasks.
    ignored = {"action": "PROJECT_UPDATED"}
    secret = {"Authorization": f"Bearer {settings.webhook_secret.get_secret_value()}"}
    api = {"Authorization": f"Bearer {settings.api_token.get_secret_value()}"}
    assert settings.webhook_secret.get_secret_value() != settings.api_token.get_secret_value()
    for opener in (secret, api):
        opened = httpx.post(webhook_url(settings), json=ignored, headers=opener, timeout=10)
        assert opened.status_code == 202, opened.text
    # Label Studio users can read the secret, so it opens the webhook and nothing else.
    for method, path in (("POST", "/api/retraining/trigger"), ("GET", "/api/labeling/export")):
        refused = httpx.request(method, settings.api_url + path, headers=secret, timeout=10)
        assert refused.status_code == 401, f"{method} {path}: {refused.text}"


def test_submitted_annotations_arrive_as_reviewed_labels(reviewed: dict[str, int]) -> None:
    for role in ("accept", "correct", "reject"):
        eventually(
            lambda r=role: label_of(reviewed[r]) is not None, f"the {role} annotation is synced"
        )
    verdicts = {role: label_of(reviewed[role]).verdict for role in ("accept", "correct", "reject")}
    assert verdicts == {
        "accept": Verdict.accepted,
        "correct": Verdict.corrected,
        "reject": Verdict.rejected,
    }

    accepted = label_of(reviewed["accept"])
    item = row(reviewed["accept"])
    assert (
        item.status == QueueStatus.labeled
        and item.labeled_at is not None
        and item.sync_error is None
    )
    assert accepted.reviewer == get_settings().label_studio_username
    assert accepted.prediction_model_version is not None
    assert accepted.label_studio_annotation_id is not None
    assert all(0 <= b["cx"] <= 1 and 0 < b["w"] <= 1 for b in accepted.boxes)
    assert len(label_of(reviewed["correct"]).boxes) == 2
    assert label_of(reviewed["reject"]).boxes == [] and row(reviewed["reject"]).human_label is None
    with session_scope() as session:
        assert session.get(Image, item.image_id).status == "labeled"


def test_invalid_annotations_are_rejected_with_reasons(
    reviewed: dict[str, int], project: ReviewProject
) -> None:
    task = reviewed["invalid"]
    eventually(lambda: row(task).sync_error is not None, "the invalid annotation is judged")
    item = row(task)
    assert item.status == QueueStatus.pending
    assert "unknown label 'crack'" in item.sync_error
    assert "region 2: outside the image" in item.sync_error
    assert "region 3: degenerate box" in item.sync_error
    assert label_of(task) is None
    # The reviewer hears of it where they work: on the task, reopened.
    in_ls = project.ls.tasks.get(id=task)
    assert in_ls.data["review"].startswith("Not usable: annotation ")
    assert "unknown label 'crack'" in in_ls.data["review"]
    assert in_ls.is_labeled is False


def test_skipped_and_deleted_tasks_are_recorded(reviewed: dict[str, int]) -> None:
    eventually(lambda: row(reviewed["skip"]).status == QueueStatus.skipped, "the skip is recorded")
    eventually(
        lambda: row(reviewed["delete"]).status == QueueStatus.cancelled, "the deletion is recorded"
    )
    assert label_of(reviewed["skip"]) is None


def test_the_sync_flow_finds_nothing_left_then_catches_up(
    reviewed: dict[str, int], project: ReviewProject, settings: Settings
) -> None:
    from flows.label_sync import label_sync_flow

    eventually(
        lambda: row(reviewed["delete"]).status == QueueStatus.cancelled, "webhooks are through"
    )
    summary = label_sync_flow()
    assert (summary["labeled"], summary["rejected"], summary["skipped"], summary["reopened"]) == (
        0,
        {},
        0,
        0,
    )

    hook = next(
        h
        for h in project.ls.webhooks.list(project=str(project.id))
        if h.url == webhook_url(settings)
    )
    project.ls.webhooks.update(id=hook.id, is_active=False)
    try:
        project.ls.annotations.create(
            id=reviewed["later"], result=predicted_result(project, reviewed["later"])
        )
        [bad] = project.ls.annotations.list(id=reviewed["invalid"])
        project.ls.annotations.update(
            id=bad.id, result=[rect(10, 10, 20, 20, "dent", image_size(reviewed["invalid"]))]
        )
        [good] = project.ls.annotations.list(id=reviewed["accept"])
        project.ls.annotations.delete(id=good.id)
        time.sleep(2)
        assert row(reviewed["later"]).status == QueueStatus.pending  # nobody told the platform

        summary = label_sync_flow()
        assert summary["labeled"] == 2 and summary["reopened"] == 1 and summary["rejected"] == {}
    finally:
        ensure_webhook(settings, project)  # switches it back on
    assert label_of(reviewed["later"]).verdict == Verdict.accepted
    fixed = row(reviewed["invalid"])
    assert fixed.status == QueueStatus.labeled and fixed.sync_error is None
    assert "review" not in project.ls.tasks.get(id=reviewed["invalid"]).data  # answered
    assert [b["name"] for b in label_of(reviewed["invalid"]).boxes] == ["dent"]
    assert (
        row(reviewed["accept"]).status == QueueStatus.pending
        and label_of(reviewed["accept"]) is None
    )
    assert row(reviewed["untouched"]).status == QueueStatus.pending
    assert label_sync_flow()["labeled"] == 0  # and again nothing to do
    assert any(
        e.payload.get("via") == "flow" for e in recent(limit=50, kind_prefix="labels.synced")
    )


# --- per-box verdicts, labels through the API, approval, sending back ------------------------


def extra_task(queued: dict[int, LabelingQueueItem], k: int) -> int:
    """The ``k``-th task beyond the eight the reviewer actions above use."""
    return sorted(queued)[8 + k]


def api(settings: Settings, method: str, path: str, **kwargs: Any) -> httpx.Response:
    token = settings.api_token.get_secret_value()
    headers = kwargs.pop("headers", {"Authorization": f"Bearer {token}"})
    return httpx.request(method, settings.api_url + path, headers=headers, timeout=60, **kwargs)


def choice(region_id: str, value: str) -> dict[str, Any]:
    return {
        "id": region_id,
        "from_name": VERDICT_NAME,
        "to_name": TO_NAME,
        "type": "choices",
        "value": {"x": 0, "y": 0, "width": 1, "height": 1, "choices": [value]},
    }


def shown_boxes(task_id: int) -> list[dict[str, Any]]:
    with session_scope() as session:
        return session.get(Prediction, row(task_id).prediction_id).boxes


def test_box_verdicts_and_notes_round_trip_from_label_studio(
    queued: dict[int, LabelingQueueItem], project: ReviewProject
) -> None:
    task = extra_task(queued, 0)
    shown = predicted_result(project, task)
    assert len(shown) >= 2, "the champion predicted at least two boxes at conf 0.001"
    wrong = shown[0]["id"]
    notes = {
        "id": "n",
        "from_name": NOTES_NAME,
        "to_name": TO_NAME,
        "type": "textarea",
        "value": {"text": ["glare from the left"]},
    }
    missed = {"id": "mine", **rect(70, 70, 20, 20, "stain", image_size(task))}
    project.ls.annotations.create(
        id=task, result=[*shown, choice(wrong, "incorrect"), missed, notes]
    )
    eventually(lambda: label_of(task) is not None, "the annotation is synced")

    label = label_of(task)
    by_prediction = {e["prediction"]: e for e in label.box_feedback}
    assert by_prediction[int(wrong[1:])]["verdict"] == "incorrect"
    assert by_prediction[int(wrong[1:])]["by"] == "reviewer"
    kept = [int(r["id"][1:]) for r in shown[1:]]
    assert {by_prediction[i]["verdict"] for i in kept} == {"correct"}
    assert by_prediction[None]["verdict"] == "missed" and by_prediction[None]["name"] == "stain"
    # The box marked incorrect is not a reviewed box: the image trains without it.
    assert len(label.boxes) == len(shown) - 1 + 1
    assert label.verdict == Verdict.corrected
    assert row(task).reviewer_notes == "glare from the left"


def test_a_label_submitted_through_the_api(
    queued: dict[int, LabelingQueueItem], project: ReviewProject, settings: Settings
) -> None:
    task = extra_task(queued, 1)
    item_id = row(task).id
    path = f"/api/labeling/queue/{item_id}/label"
    first = shown_boxes(task)[0]
    keep = {
        "name": first["name"],
        "cx": (first["x1"] + first["x2"]) / 2,
        "cy": (first["y1"] + first["y2"]) / 2,
        "w": first["x2"] - first["x1"],
        "h": first["y2"] - first["y1"],
        "prediction": 0,
    }
    body = {
        "boxes": [keep, {"name": "dent", "cx": 0.8, "cy": 0.8, "w": 0.1, "h": 0.1}],
        "notes": "labelled through the API",
    }

    refused = api(settings, "POST", path, json=body, headers={})
    assert refused.status_code == 401
    for bad, problem in (
        ({"boxes": [{**keep, "name": "crack"}]}, "unknown label 'crack'"),
        ({"boxes": [{**keep, "prediction": 999}]}, "prediction 999 does not exist"),
        ({"boxes": [{**keep, "verdict": "missed"}]}, "marked 'missed', but the model predicted"),
    ):
        answer = api(settings, "POST", path, json=bad)
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"] == "invalid_label" and problem in answer.json()["detail"]
    assert (
        api(settings, "POST", "/api/labeling/queue/2147483647/label", json=body).status_code == 404
    )
    assert project.ls.annotations.list(id=task) == []  # nothing invalid reached Label Studio

    done = api(settings, "POST", path, json=body)
    assert done.status_code == 200, done.text
    answer = done.json()
    assert answer["changed"] is True and answer["item"]["status"] == "labeled"
    assert answer["item"]["reviewer_notes"] == "labelled through the API"
    verdicts = [(e["prediction"], e["verdict"]) for e in answer["label"]["box_feedback"]]
    assert verdicts[0] == (0, "correct") and verdicts[-1] == (None, "missed")
    assert {v for p, v in verdicts[1:-1]} <= {"incorrect"}  # the predictions left out
    assert [b["name"] for b in answer["label"]["boxes"]] == [first["name"], "dent"]
    assert len(project.ls.annotations.list(id=task)) == 1  # Label Studio holds it

    again = api(settings, "POST", path, json=body)
    assert again.status_code == 200 and again.json()["changed"] is False
    assert len(project.ls.annotations.list(id=task)) == 1


def test_the_same_label_sent_eight_times_at_once_is_one_annotation(
    queued: dict[int, LabelingQueueItem], project: ReviewProject, settings: Settings
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    task = extra_task(queued, 2)
    path = f"/api/labeling/queue/{row(task).id}/label"
    body = {"boxes": [{"name": "stain", "cx": 0.5, "cy": 0.5, "w": 0.2, "h": 0.2}]}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: api(settings, "POST", path, json=body), range(8)))
    assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
    assert sum(a.json()["changed"] for a in answers) == 1
    assert len(project.ls.annotations.list(id=task)) == 1
    assert [b["name"] for b in label_of(task).boxes] == ["stain"]


def test_a_second_reviewer_approves_and_training_can_take_only_approved_labels(
    queued: dict[int, LabelingQueueItem], project: ReviewProject, settings: Settings
) -> None:
    from flows.label_sync import label_sync_flow
    from training.snapshots import reviewed_sources

    task = extra_task(queued, 3)
    project.ls.annotations.create(id=task, result=predicted_result(project, task))
    eventually(lambda: row(task).status == QueueStatus.labeled, "the annotation is synced")
    path = f"/api/labeling/queue/{row(task).id}/approve"

    own = api(settings, "POST", path, json={"reviewer": settings.label_studio_username})
    assert own.status_code == 409 and "second reviewer" in own.json()["detail"]
    approved = api(settings, "POST", path, json={"reviewer": "second@example.com"})
    assert approved.status_code == 200, approved.text
    assert approved.json()["item"]["status"] == "approved"
    assert approved.json()["label"]["approved_by"] == "second@example.com"
    again = api(settings, "POST", path, json={"reviewer": "second@example.com"})
    assert again.status_code == 200 and again.json()["changed"] is False
    other = api(settings, "POST", path, json={"reviewer": "third@example.com"})
    assert other.status_code == 409 and "approved by second@example.com" in other.json()["detail"]
    pending = f"/api/labeling/queue/{row(extra_task(queued, 4)).id}/approve"
    unlabelled = api(settings, "POST", pending, json={"reviewer": "second@example.com"})
    assert unlabelled.status_code == 409 and "only a labelled item" in unlabelled.json()["detail"]

    label_sync_flow()
    assert row(task).status == QueueStatus.approved  # an unchanged label keeps its approval
    assert api(settings, "GET", "/api/labeling/stats").json()["approved"] >= 1

    store = ObjectStore(settings)
    with session_scope() as session:
        image = session.get(Image, row(task).image_id)
        everything = {s.image.image_hash for s in reviewed_sources(session, settings, store)[0]}
        only = settings.model_copy(update={"train_approved_only": True})
        approved_only = {s.image.image_hash for s in reviewed_sources(session, only, store)[0]}
    assert image.content_hash in approved_only
    assert approved_only < everything and label_of(extra_task(queued, 0)) is not None


def test_a_label_sent_back_reaches_its_reviewer_and_waits_for_their_answer(
    queued: dict[int, LabelingQueueItem], project: ReviewProject, settings: Settings
) -> None:
    from flows.label_sync import label_sync_flow

    task = extra_task(queued, 4)
    project.ls.annotations.create(id=task, result=predicted_result(project, task))
    eventually(lambda: row(task).status == QueueStatus.labeled, "the annotation is synced")
    path = f"/api/labeling/queue/{row(task).id}/reject"
    reason = "the box on the left is a scratch, not a dent"

    sent = api(settings, "POST", path, json={"reviewer": "second@example.com", "reason": reason})
    assert sent.status_code == 200, sent.text
    item = row(task)
    assert item.status == QueueStatus.pending and label_of(task) is None
    assert item.sync_error == f"Sent back by second@example.com: {reason}"
    in_ls = project.ls.tasks.get(id=task)
    assert in_ls.data["review"] == item.sync_error and in_ls.is_labeled is False
    assert len(in_ls.annotations) == 1  # the reviewer's work is still there to fix
    again = api(settings, "POST", path, json={"reviewer": "second@example.com", "reason": reason})
    assert again.status_code == 200 and again.json()["changed"] is False
    assert any(e.payload.get("task_id") == task for e in recent(kind_prefix="labels.sent_back"))

    label_sync_flow()  # the sent-back annotation is passed over, not taken again
    assert row(task).status == QueueStatus.pending and row(task).sync_error == item.sync_error

    [annotation] = project.ls.annotations.list(id=task)
    project.ls.annotations.update(id=annotation.id, result=predicted_result(project, task)[1:])
    eventually(lambda: row(task).status == QueueStatus.labeled, "the answer is synced")
    assert row(task).sync_error is None and row(task).rejected_annotation is None
    assert len(label_of(task).boxes) == len(predicted_result(project, task)) - 1
    assert "review" not in project.ls.tasks.get(id=task).data


def test_the_api_remembers_the_wiring_it_ensured_and_ensures_it_again_when_told(
    project: ReviewProject, settings: Settings
) -> None:
    from labeling.wiring import forget_wiring, wired_project

    forget_wiring(settings)
    first = wired_project(settings)
    assert wired_project(settings) is first  # no question to Label Studio the second time
    hook = next(
        h
        for h in project.ls.webhooks.list(project=str(project.id))
        if h.url == webhook_url(settings)
    )
    project.ls.webhooks.delete(id=hook.id)
    try:
        wired_project(settings)  # remembered: not noticed yet
        assert webhook_url(settings) not in [
            h.url for h in project.ls.webhooks.list(project=str(project.id))
        ]
        forget_wiring(settings)  # what a refused task makes the API do
        assert wired_project(settings) is not first
        assert webhook_url(settings) in [
            h.url for h in project.ls.webhooks.list(project=str(project.id))
        ]
    finally:
        ensure_webhook(settings, project)
        forget_wiring(settings)
