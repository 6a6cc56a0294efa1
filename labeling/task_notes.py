"""Telling a reviewer, in Label Studio, that their annotation was sent back and why.

Label Studio's community edition has no review workflow or comments API, so the platform
says it where the reviewer looks: the task's ``review`` data field, shown in red above the
image by the label config (``REVIEW_VALUE``) and listed as a column of the data manager, and
the task marked unlabelled again, so it shows among the tasks still to do. The annotation
itself is left as it was: nothing the reviewer did is lost, and updating it (or submitting a
new one) is how they answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from labeling.wiring import ReviewProject

REVIEW_KEY = "review"
"""Task data key of the note (the label config's ``$review``)."""


def send_back(
    project: ReviewProject, task_id: int, data: Mapping[str, Any], note: str
) -> dict[str, Any]:
    """Show ``note`` on the task and reopen it; the task data as written."""
    written = {**data, REVIEW_KEY: note}
    project.ls.tasks.update(id=task_id, data=written, is_labeled=False)
    return written


def clear_note(project: ReviewProject, task_id: int, data: Mapping[str, Any]) -> bool:
    """Remove a note the reviewer has answered; True when there was one."""
    if not data.get(REVIEW_KEY):
        return False
    project.ls.tasks.update(id=task_id, data={k: v for k, v in data.items() if k != REVIEW_KEY})
    return True
