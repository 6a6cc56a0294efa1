"""The reviewer's verdict on each box: what the champion got right, wrong, moved, or missed.

A reviewer answers per box in Label Studio (the label config's per-region ``box_verdict``
choice) or simply edits the pre-annotation; whatever they leave unsaid is read off the edit:

| the champion's box ``p<i>`` in the annotation | verdict |
| --- | --- |
| kept within ``UNCHANGED_IOU``, same class | ``correct`` |
| moved, resized or relabelled | ``adjusted`` |
| deleted (no region overlaps it by ``MATCH_IOU``) | ``incorrect`` |
| deleted, and a new box drawn over it | ``adjusted`` (the new box) |
| a box the champion did not predict | ``missed`` |

A choice the reviewer made wins over the reading. A box marked ``incorrect`` stays in Label
Studio for everyone to see but is not a reviewed box: every reader of
``ReviewedLabel.boxes`` (training export, the image verdict, the ledger, the class error
rates) sees the image without it, exactly as if the reviewer had deleted it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from visionloop.boxes import MATCH_IOU, corners, greedy_pairs, iou_matrix
from visionloop.models import BoxVerdict

UNCHANGED_IOU = 0.99
"""A predicted box kept at least this exactly counts as kept as it was."""
PREDICTION_REGION = "p{index}"
"""Region id of the champion's ``index``-th box in the pre-annotation (``labeling.tasks``)."""
ON_PREDICTIONS = frozenset({BoxVerdict.correct, BoxVerdict.incorrect, BoxVerdict.adjusted})
"""The verdicts that judge a box of the champion's; ``missed`` is for the others."""


@dataclass(frozen=True)
class ReviewedRegion:
    """One rectangle of an annotation, as a YOLO box, with the verdict chosen for it, if any."""

    region_id: str | None
    box: dict[str, Any]
    chosen: BoxVerdict | None = None


@dataclass(frozen=True)
class BoxFeedback:
    """Reviewed boxes (those not marked ``incorrect``) and one verdict per box involved."""

    boxes: list[dict[str, Any]]
    verdicts: list[dict[str, Any]]
    problems: list[str]


def _entry(
    verdict: BoxVerdict,
    chosen: bool,
    name: str,
    prediction: int | None = None,
    conf: float | None = None,
    iou: float | None = None,
) -> dict[str, Any]:
    return {
        "verdict": verdict.value,
        "by": "reviewer" if chosen else "edit",
        "name": name,
        "prediction": prediction,
        "conf": None if conf is None else round(float(conf), 4),
        "iou": None if iou is None else round(float(iou), 4),
    }


def _read_off(predicted: Mapping[str, Any], region: ReviewedRegion, iou: float) -> BoxVerdict:
    same_class = predicted["name"] == region.box["name"]
    return BoxVerdict.correct if same_class and iou >= UNCHANGED_IOU else BoxVerdict.adjusted


def _links(
    shown: Sequence[tuple[int, Mapping[str, Any]]], regions: Sequence[ReviewedRegion]
) -> dict[int, tuple[int, float]]:
    """Prediction index -> (region index, IoU): by region id, then the rest by overlap (a box
    deleted and drawn again is the same object adjusted, whatever class it now has)."""
    ids = {PREDICTION_REGION.format(index=i): i for i, _ in shown}
    boxes = dict(shown)
    links: dict[int, tuple[int, float]] = {}
    for k, region in enumerate(regions):
        i = ids.get(region.region_id or "")
        if i is not None and i not in links:
            iou = float(iou_matrix(corners([boxes[i]]), corners([region.box]))[0, 0])
            links[i] = (k, iou)
    taken = {k for k, _ in links.values()}
    free_p = [i for i, _ in shown if i not in links]
    free_r = [k for k in range(len(regions)) if k not in taken]
    if free_p and free_r:
        ious = iou_matrix(
            corners([boxes[i] for i in free_p]), corners([regions[k].box for k in free_r])
        )
        for a, b, iou in greedy_pairs(ious, MATCH_IOU):
            links[free_p[a]] = (free_r[b], iou)
    return links


def box_feedback(
    shown: Sequence[tuple[int, Mapping[str, Any]]], regions: Sequence[ReviewedRegion]
) -> BoxFeedback:
    """Judge the champion's ``shown`` boxes (``(index in the prediction, normalised x1..y2
    box)``) against an annotation's ``regions``."""
    links = _links(shown, regions)
    judged: dict[int, BoxVerdict] = {}
    verdicts: list[dict[str, Any]] = []
    problems: list[str] = []
    for i, predicted in shown:
        if i not in links:
            verdicts.append(
                _entry(BoxVerdict.incorrect, False, predicted["name"], i, predicted.get("conf"))
            )
            continue
        k, iou = links[i]
        region = regions[k]
        if region.chosen is not None and region.chosen not in ON_PREDICTIONS:
            problems.append(
                f"region {k + 1}: marked {region.chosen.value!r}, but the model predicted it "
                f"(choose correct, incorrect or adjusted)"
            )
            judged[k] = region.chosen
            continue
        judged[k] = region.chosen or _read_off(predicted, region, iou)
        chosen = region.chosen is not None
        name, conf = region.box["name"], predicted.get("conf")
        verdicts.append(_entry(judged[k], chosen, name, i, conf, iou))
    for k, region in enumerate(regions):
        if k in judged:
            continue
        if region.chosen not in (None, BoxVerdict.missed):
            problems.append(
                f"region {k + 1}: marked {region.chosen.value!r}, but the model did not "
                f"predict it (a box the model missed is 'missed')"
            )
            continue
        judged[k] = BoxVerdict.missed
        verdicts.append(_entry(BoxVerdict.missed, region.chosen is not None, region.box["name"]))
    boxes = [r.box for k, r in enumerate(regions) if judged.get(k) != BoxVerdict.incorrect]
    return BoxFeedback(boxes, verdicts, problems)


def verdict_counts(feedback: Sequence[Mapping[str, Any]] | None) -> dict[str, int]:
    """How many boxes got each verdict (every verdict present, zero or not)."""
    counts = {verdict.value: 0 for verdict in BoxVerdict}
    for entry in feedback or []:
        counts[entry["verdict"]] = counts.get(entry["verdict"], 0) + 1
    return counts
