"""Annotation validation, the reviewer's verdict and webhook parsing (no servers needed)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlmodel import Session, SQLModel, create_engine

from api.routes.labeling import affected_tasks
from labeling.label_config import FROM_NAME, NOTES_NAME, TO_NAME, VERDICT_NAME
from labeling.sync import (
    InvalidAnnotation,
    decisive_annotation,
    judge,
    read_annotation,
    validate_regions,
)
from labeling.tasks import prediction_regions
from labeling.verdicts import box_feedback, verdict_counts
from visionloop.models import ReviewedLabel, Verdict

CLASSES = ["scratch", "dent", "stain"]


def region(
    x: float, y: float, w: float, h: float, label: str = "dent", **extra: Any
) -> dict[str, Any]:
    value = {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]}
    value.update(extra.pop("value", {}))
    return {
        "from_name": FROM_NAME,
        "to_name": TO_NAME,
        "type": "rectanglelabels",
        "original_width": 200,
        "original_height": 100,
        "value": value,
        **extra,
    }


def box(name: str, x1: float, y1: float, x2: float, y2: float, conf: float = 0.5) -> dict[str, Any]:
    return {
        "cls": CLASSES.index(name),
        "name": name,
        "conf": conf,
        "x1": x1,
        "y1": y1,
        "x2": x2,
        "y2": y2,
    }


def test_valid_regions_become_yolo_boxes() -> None:
    boxes = validate_regions([region(10, 20, 30, 40, "stain")], CLASSES, 200, 100)
    assert boxes == [{"cls": 2, "name": "stain", "cx": 0.25, "cy": 0.4, "w": 0.3, "h": 0.4}]


def test_a_box_drawn_a_hair_past_the_edge_is_clipped() -> None:
    [b] = validate_regions([region(-0.2, 90, 50, 10.3)], CLASSES, 200, 100)
    assert b["cx"] - b["w"] / 2 == pytest.approx(0.0) and b["cy"] + b["h"] / 2 == pytest.approx(1.0)


def test_every_problem_of_an_annotation_is_reported() -> None:
    result = [
        region(10, 10, 20, 20, "crack"),
        region(90, 10, 30, 20),
        region(10, 10, 0.2, 20),
        region(10, 10, 20, 20, value={"rotation": 30}),
        region(10, 10, 20, 20, value={"rectanglelabels": ["dent", "stain"]}),
        {**region(10, 10, 20, 20), "original_width": 100, "original_height": 200},
        {**region(10, 10, 20, 20), "type": "polygonlabels"},
        region(10, 10, 20, 20),  # the one good region does not rescue the annotation
    ]
    with pytest.raises(InvalidAnnotation) as caught:
        validate_regions(result, CLASSES, 200, 100)
    problems = caught.value.problems
    assert len(problems) == 7
    assert "region 1: unknown label 'crack'" in problems[0]
    assert "region 2: outside the image" in problems[1]
    assert "region 3: degenerate box (0.4x20.0 px)" in problems[2]
    assert "region 4: rotated" in problems[3]
    assert "region 5: needs exactly one label" in problems[4]
    assert "region 6: drawn on a 100x200 image, but it is 200x100" in problems[5]
    assert "region 7: not a 'label' rectangle" in problems[6]


def test_verdicts() -> None:
    predicted = [box("dent", 0.1, 0.1, 0.3, 0.3), box("stain", 0.5, 0.5, 0.9, 0.9)]
    as_is = validate_regions(prediction_regions(predicted, 200, 100, CLASSES), CLASSES, 200, 100)
    assert judge(predicted, as_is) == Verdict.accepted
    assert (
        judge(predicted, as_is + [{"name": "dent", "cx": 0.7, "cy": 0.2, "w": 0.1, "h": 0.1}])
        == Verdict.corrected
    )
    nudged = [dict(as_is[0], cx=as_is[0]["cx"] + 0.02), as_is[1]]
    assert judge(predicted, nudged) == Verdict.corrected
    relabelled = [dict(b, name="scratch") for b in as_is]
    assert judge(predicted, relabelled) == Verdict.rejected
    assert judge(predicted, []) == Verdict.rejected  # nothing was there
    assert judge([], as_is) == Verdict.rejected  # the model missed everything
    assert judge([], []) == Verdict.accepted


def test_the_annotation_that_counts() -> None:
    skip = {"id": 1, "was_cancelled": True, "updated_at": "2026-01-03T00:00:00Z"}
    old = {"id": 2, "was_cancelled": False, "updated_at": "2026-01-01T00:00:00Z"}
    new = {"id": 3, "was_cancelled": False, "updated_at": "2026-01-02T00:00:00Z"}
    truth = {
        "id": 4,
        "was_cancelled": False,
        "ground_truth": True,
        "updated_at": "2025-12-01T00:00:00Z",
    }
    assert decisive_annotation([]) is None
    assert decisive_annotation([skip])["id"] == 1
    assert decisive_annotation([old, skip, new])["id"] == 3
    assert decisive_annotation([old, truth, new])["id"] == 4


def test_webhook_events_name_their_tasks() -> None:
    engine = create_engine("sqlite://")
    SQLModel.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(
            ReviewedLabel(
                image_id=1,
                image_path="a.jpg",
                boxes=[],
                verdict=Verdict.accepted,
                label_studio_task_id=9,
                label_studio_annotation_id=21,
            )
        )
        session.commit()

        def tasks(event: dict[str, Any]) -> list[int]:
            return affected_tasks(session, event)

        assert tasks(
            {"action": "ANNOTATION_CREATED", "task": {"id": 7}, "annotation": {"id": 1, "task": 7}}
        ) == [7]
        assert tasks({"action": "ANNOTATION_UPDATED", "annotation": {"id": 1, "task": 8}}) == [8]
        assert tasks(
            {"action": "ANNOTATIONS_CREATED", "annotation": [{"task": 3}, {"task": 2}, {"task": 3}]}
        ) == [2, 3]
        assert tasks({"action": "TASKS_DELETED", "tasks": [{"id": 4}, {"id": 5}]}) == [4, 5]
        assert tasks({"action": "PROJECT_UPDATED", "project": {"id": 1}}) == []
        assert tasks({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 21}, {"id": 5}]}) == [
            9
        ]


# --- per-box verdicts ---------------------------------------------------------------------


def verdict(region_id: str, choice: str) -> dict[str, Any]:
    return {
        "id": region_id,
        "from_name": VERDICT_NAME,
        "to_name": TO_NAME,
        "type": "choices",
        "value": {"x": 0, "y": 0, "width": 1, "height": 1, "choices": [choice]},
    }


def judged(predicted: list[dict[str, Any]], result: list[dict[str, Any]]) -> Any:
    content = read_annotation(result, CLASSES, 200, 100)
    return content, box_feedback(list(enumerate(predicted)), content.regions)


PREDICTED = [
    box("dent", 0.1, 0.1, 0.3, 0.3, conf=0.9),
    box("stain", 0.5, 0.5, 0.9, 0.9, conf=0.4),
    box("scratch", 0.6, 0.1, 0.8, 0.3, conf=0.3),
]


def test_verdicts_are_read_off_the_edit() -> None:
    shown = prediction_regions(PREDICTED, 200, 100, CLASSES)
    moved = dict(shown[1], value=dict(shown[1]["value"], x=shown[1]["value"]["x"] + 3))
    # p2 deleted; a new box where the model saw nothing
    _, feedback = judged(PREDICTED, [shown[0], moved, region(5, 70, 10, 10, "dent", id="new")])
    verdicts = [(e["verdict"], e["by"], e["prediction"]) for e in feedback.verdicts]
    assert verdicts == [
        ("correct", "edit", 0),
        ("adjusted", "edit", 1),
        ("incorrect", "edit", 2),
        ("missed", "edit", None),
    ]
    assert [b["name"] for b in feedback.boxes] == ["dent", "stain", "dent"]
    assert feedback.problems == []


def test_a_box_redrawn_over_a_deleted_one_is_adjusted_not_missed() -> None:
    # Same place, another class, a new region id: the reviewer deleted and drew it again.
    _, feedback = judged(PREDICTED[:1], [region(11, 10, 20, 20, "scratch", id="again")])
    [entry] = feedback.verdicts
    assert (entry["verdict"], entry["prediction"], entry["name"]) == ("adjusted", 0, "scratch")


def test_chosen_verdicts_win_and_incorrect_boxes_do_not_train() -> None:
    shown = prediction_regions(PREDICTED, 200, 100, CLASSES)
    note = {
        "id": "n",
        "from_name": NOTES_NAME,
        "to_name": TO_NAME,
        "type": "textarea",
        "value": {"text": ["glare on the left", "check lens"]},
    }
    content, feedback = judged(
        PREDICTED,
        [*shown, verdict("p1", "incorrect"), verdict("p2", "adjusted"), note],
    )
    assert content.notes == "glare on the left\ncheck lens"
    assert [(e["verdict"], e["by"]) for e in feedback.verdicts] == [
        ("correct", "edit"),
        ("incorrect", "reviewer"),
        ("adjusted", "reviewer"),
    ]
    # The box marked incorrect is still drawn in Label Studio but is not a reviewed box, so
    # the image's verdict sees the champion's stain as deleted.
    assert [b["name"] for b in feedback.boxes] == ["dent", "scratch"]
    assert judge(PREDICTED, feedback.boxes) == Verdict.corrected
    assert verdict_counts(feedback.verdicts) == {
        "correct": 1,
        "incorrect": 1,
        "adjusted": 1,
        "missed": 0,
    }


def test_contradictory_verdicts_are_problems() -> None:
    shown = prediction_regions(PREDICTED[:1], 200, 100, CLASSES)
    _, feedback = judged(
        PREDICTED[:1],
        [
            *shown,
            region(5, 70, 10, 10, id="mine"),
            verdict("p0", "missed"),
            verdict("mine", "correct"),
        ],
    )
    assert feedback.problems == [
        "region 1: marked 'missed', but the model predicted it (choose correct, incorrect or "
        "adjusted)",
        "region 2: marked 'correct', but the model did not predict it (a box the model missed "
        "is 'missed')",
    ]
    with pytest.raises(InvalidAnnotation) as caught:
        read_annotation(
            [*shown, verdict("p0", "great"), verdict("ghost", "correct")], CLASSES, 200, 100
        )
    assert caught.value.problems == [
        "region 1: a box verdict must be one of ['correct', 'incorrect', 'adjusted', 'missed']",
        "verdict: a box verdict for no box (region id 'ghost')",
    ]
