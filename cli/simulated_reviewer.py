"""A simulated reviewer for the demo and the end-to-end test: never part of the running platform.

It stands in for the person who works through the Label Studio queue, and does exactly what
they would do through Label Studio's API: open each task without an annotation and submit
boxes. Its boxes are the synthetic generator's ground truth for that image (looked up by the
task's content hash), so its labels are perfect; a task whose image it has no truth for is
left for a person. Its annotations are made in the name of its own Label Studio user,
``SIMULATED_REVIEWER_EMAIL``, so every label it gave is recognisable as simulated.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from label_studio_sdk.core.api_error import ApiError

from cli.production_stream import GroundTruth
from labeling.wiring import ReviewProject, review_project
from visionloop.boxes import ls_results_from_boxes
from visionloop.settings import Settings

SIMULATED_REVIEWER_EMAIL = "simulated-reviewer@visionloop.local"


@dataclass
class ReviewRound:
    submitted: list[int] = field(default_factory=list)
    """Task ids annotated in this round."""
    unknown: list[int] = field(default_factory=list)
    """Open tasks whose image the reviewer has no ground truth for (left for a person)."""


def reviewer_user_id(project: ReviewProject) -> int | None:
    """The simulated reviewer's Label Studio user, created on first use.

    None when this Label Studio does not let the token's user create users: the annotations are
    then made as that user, and the demo still says they were simulated.
    """
    for user in project.ls.users.list():
        if user.email == SIMULATED_REVIEWER_EMAIL:
            return int(user.id)
    try:
        user = project.ls.users.create(
            email=SIMULATED_REVIEWER_EMAIL,
            username="simulated-reviewer",
            first_name="Simulated",
            last_name="Reviewer (demo)",
            password=secrets.token_urlsafe(24),
        )
    except ApiError:
        return None
    return int(user.id)


def review_open_tasks(
    settings: Settings,
    truth: GroundTruth,
    *,
    project: ReviewProject | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ReviewRound:
    """Annotate every open task of the review project with the generator's ground truth."""
    project = project or review_project(settings)
    user_id = reviewer_user_id(project)
    open_tasks = [
        task
        for task in project.ls.tasks.list(project=project.id, fields="all", page_size=100)
        if not task.annotations
    ]
    done = ReviewRound()
    for n, task in enumerate(open_tasks, start=1):
        content_hash = (task.data or {}).get("content_hash")
        boxes = truth.get(content_hash) if content_hash else None
        if boxes is None:
            done.unknown.append(int(task.id))
            continue
        result = ls_results_from_boxes(
            boxes,
            settings.class_names,
            settings.image_size,
            settings.image_size,
        )
        extra = {} if user_id is None else {"completed_by": user_id}
        project.ls.annotations.create(id=task.id, result=result, was_cancelled=False, **extra)
        done.submitted.append(int(task.id))
        if progress is not None:
            progress(n, len(open_tasks))
    return done
