"""The label-savings ledger: are the images selection picks worth more than random ones?

Each selection cycle (``LabelingQueueItem.cycle``, one ingest run) queues two arms side by
side: ``selected`` (the strategy's picks) and ``control`` (a uniform random draw from all of
the cycle's images, ``control_rate`` of the budget); ``audit`` items are neither and are left
out. Once reviewers have answered, each reviewed image says how wrong the champion was on it:
boxes it showed that the reviewer corrected, and boxes the reviewer had to add
(``labeling.review_queue.image_errors``, the matching the queue statistics use). The ledger
compares the arms per cycle and over all the cycles asked for:

- champion errors per reviewed image, per arm, their difference (selected - control) and
  their ratio, each with a seeded bootstrap interval (the arms resampled apart);
- the error rate: the share of reviewed images with at least one error.

Below ``MIN_REVIEWED_CONTROLS`` reviewed controls a cycle says so instead of guessing.

Counting the queue is done in the database; only the reviewed images of the cycles asked for
are read (a person answered each, so they stay few next to the queue).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlmodel import Session, col, func, select

from labeling.review_queue import image_errors
from visionloop.models import LabelingQueueItem, Prediction, ReviewedLabel

ARMS = ("selected", "control")
"""The compared arms, as ``LabelingQueueItem.arm`` stores them (``audit`` is neither)."""
MIN_REVIEWED_CONTROLS = 3
"""Fewer reviewed controls than this and a comparison says nothing worth showing."""
RESAMPLES = 1000
LEVEL = 0.90
SEED = 15
"""The bootstrap's seed: the same rows give the same interval on every request."""
DEFAULT_CYCLES = 20
"""Cycles a ledger covers unless asked for more (newest first)."""


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


@dataclass(frozen=True)
class ArmTally:
    """One arm of one comparison."""

    queued: int
    reviewed: int  # reviewed images whose shown prediction is known (the basis of the rest)
    errors_per_image: float | None  # corrected + missed boxes per reviewed image
    corrected_per_image: float | None
    missed_per_image: float | None
    error_rate: float | None  # share of reviewed images with at least one error


@dataclass(frozen=True)
class Comparison:
    """Selected against control over one cycle (``cycle`` set) or several (``cycle`` None)."""

    cycle: str | None
    started_at: datetime | None  # when the cycle queued its first image
    selected: ArmTally
    control: ArmTally
    enough: bool  # enough reviewed images in both arms to compare
    difference: float | None  # errors per image, selected - control
    difference_interval: Interval | None
    ratio: float | None  # errors per image, selected / control
    ratio_interval: Interval | None
    rate_difference: float | None  # error rate, selected - control
    summary: str


@dataclass(frozen=True)
class Ledger:
    cycles: list[Comparison]  # oldest first
    cumulative: Comparison
    level: float = LEVEL
    resamples: int = RESAMPLES
    min_reviewed_controls: int = MIN_REVIEWED_CONTROLS


# --- reading -------------------------------------------------------------------------------


_WALK = 2000
"""Queue rows read per step of ``recent_cycles``' walk back from the newest."""


def _first_id(session: Session, cycle: str) -> int:
    """The cycle's first queued item (``ix_labeling_queue_cycle_id``: one index probe)."""
    first = session.exec(
        select(func.min(LabelingQueueItem.id)).where(LabelingQueueItem.cycle == cycle)
    ).one()
    return int(first)


def recent_cycles(session: Session, limit: int = DEFAULT_CYCLES) -> list[str]:
    """The newest ``limit`` cycles that queued anything (newest by first item), oldest first.

    Walks the queue back from the newest item instead of grouping all of it, so the cost
    follows the size of the newest cycles, not of the whole history: a cycle not met yet has
    all its items below the walk, so once ``limit`` cycles met started at or above it, no
    other cycle can be newer.
    """
    if limit <= 0:
        return []
    firsts: dict[str, int] = {}
    below: int | None = None
    while True:
        step = select(LabelingQueueItem.id, LabelingQueueItem.cycle).where(
            col(LabelingQueueItem.cycle).is_not(None)
        )
        if below is not None:
            step = step.where(col(LabelingQueueItem.id) < below)
        rows = session.exec(step.order_by(col(LabelingQueueItem.id).desc()).limit(_WALK)).all()
        if not rows:
            break
        for _, cycle in rows:
            if cycle is not None and cycle not in firsts:
                firsts[cycle] = _first_id(session, cycle)
        below = rows[-1][0]
        if len(firsts) >= limit and sorted(firsts.values(), reverse=True)[limit - 1] >= below:
            break
    newest = sorted(firsts.items(), key=lambda item: item[1], reverse=True)[:limit]
    return [str(cycle) for cycle, _ in reversed(newest)]


def _queued(
    session: Session, cycles: Sequence[str]
) -> tuple[dict[tuple[str, str], int], dict[str, datetime]]:
    """Queued items per (cycle, arm), and when each cycle started: counted in the database."""
    rows = session.exec(
        select(
            LabelingQueueItem.cycle,
            LabelingQueueItem.arm,
            func.count(),
            func.min(LabelingQueueItem.created_at),
        )
        .where(col(LabelingQueueItem.cycle).in_(cycles))
        .group_by(LabelingQueueItem.cycle, LabelingQueueItem.arm)
    ).all()
    counts: dict[tuple[str, str], int] = {}
    started: dict[str, datetime] = {}
    for cycle, arm, count, first in rows:
        counts[(cycle, arm)] = int(count)
        if first is not None and (cycle not in started or first < started[cycle]):
            started[cycle] = first
    return counts, started


def _reviewed(
    session: Session, cycles: Sequence[str], class_names: Sequence[str]
) -> dict[tuple[str, str], list[tuple[int, int]]]:
    """(corrected, missed) per reviewed image, per (cycle, arm).

    The champion's boxes are those of the prediction the queue item showed the reviewer,
    without classes the project does not have (they were never shown); an item without a
    prediction tells nothing about the champion and is left out.
    """
    rows = session.exec(
        select(
            LabelingQueueItem.cycle, LabelingQueueItem.arm, Prediction.boxes, ReviewedLabel.boxes
        )
        .join(ReviewedLabel, col(ReviewedLabel.image_id) == col(LabelingQueueItem.image_id))
        .join(Prediction, col(Prediction.id) == col(LabelingQueueItem.prediction_id))
        .where(col(LabelingQueueItem.cycle).in_(cycles), col(LabelingQueueItem.arm).in_(ARMS))
    ).all()
    known = set(class_names)
    found: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for cycle, arm, predicted, reviewed in rows:
        shown = [b for b in predicted or [] if b.get("name") in known]
        errors = image_errors(shown, reviewed or [], class_names)
        found.setdefault((cycle, arm), []).append((errors.corrected, errors.missed))
    return found


# --- comparing -----------------------------------------------------------------------------


def _mean(values: np.ndarray) -> float | None:
    return round(float(values.mean()), 4) if values.size else None


def tally(queued: int, reviewed: Sequence[tuple[int, int]]) -> ArmTally:
    parts = np.asarray(reviewed, np.float64).reshape(-1, 2)
    errors = parts.sum(axis=1)
    return ArmTally(
        queued=queued,
        reviewed=len(parts),
        errors_per_image=_mean(errors),
        corrected_per_image=_mean(parts[:, 0]),
        missed_per_image=_mean(parts[:, 1]),
        error_rate=_mean((errors > 0).astype(np.float64)),
    )


def _quantiles(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2
    # Sample values, not interpolations: an infinite ratio must not become NaN.
    low, high = np.quantile(values, [tail, 1.0 - tail], method="inverted_cdf")
    return float(low), float(high)


def _resampled_means(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``resamples`` draws with replacement of ``values.size`` values.

    Errors per image take few distinct values, so a resample is the counts of each value (one
    multinomial draw): the cost does not grow with the number of reviewed images.
    """
    distinct, counts = np.unique(values, return_counts=True)
    drawn = rng.multinomial(values.size, counts / values.size, size=resamples)
    return drawn @ distinct / values.size


def bootstrap(
    selected: np.ndarray,
    control: np.ndarray,
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = SEED,
) -> tuple[Interval, Interval | None]:
    """Percentile intervals of the difference and of the ratio of the arms' means.

    Each arm is resampled apart (they are drawn apart). The ratio's interval is None when a
    tail of resamples has no control error at all: it has no upper end.
    """
    rng = np.random.default_rng(seed)
    sel = _resampled_means(selected, resamples, rng)
    ctl = _resampled_means(control, resamples, rng)
    low, high = _quantiles(sel - ctl, level)
    difference = Interval(round(low, 4), round(high, 4))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(ctl > 0, sel / np.where(ctl > 0, ctl, 1.0), np.inf)
    low, high = _quantiles(ratios, level)
    ratio = Interval(round(low, 4), round(high, 4)) if np.isfinite(high) else None
    return difference, ratio


def compare(
    cycle: str | None,
    started_at: datetime | None,
    queued: dict[str, int],
    reviewed: dict[str, list[tuple[int, int]]],
    *,
    min_reviewed_controls: int = MIN_REVIEWED_CONTROLS,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
) -> Comparison:
    """The comparison of one set of reviewed images, split by arm."""
    arms = {arm: tally(queued.get(arm, 0), reviewed.get(arm, [])) for arm in ARMS}
    selected, control = arms["selected"], arms["control"]
    common = {"cycle": cycle, "started_at": started_at, "selected": selected, "control": control}
    if control.reviewed < min_reviewed_controls or selected.reviewed == 0:
        return Comparison(
            **common,
            enough=False,
            difference=None,
            difference_interval=None,
            ratio=None,
            ratio_interval=None,
            rate_difference=None,
            summary=_not_enough(selected, control, min_reviewed_controls),
        )
    errors = {arm: np.asarray(reviewed[arm], np.float64).sum(axis=1) for arm in ARMS}
    difference, ratio_interval = bootstrap(
        errors["selected"], errors["control"], resamples=resamples, level=level
    )
    assert selected.errors_per_image is not None and control.errors_per_image is not None
    assert selected.error_rate is not None and control.error_rate is not None
    ratio = (
        round(selected.errors_per_image / control.errors_per_image, 4)
        if control.errors_per_image > 0
        else None
    )
    return Comparison(
        **common,
        enough=True,
        difference=round(selected.errors_per_image - control.errors_per_image, 4),
        difference_interval=difference,
        ratio=ratio,
        ratio_interval=ratio_interval if ratio is not None else None,
        rate_difference=round(selected.error_rate - control.error_rate, 4),
        summary=_sentence(selected, control, ratio, ratio_interval, difference, level),
    )


def _not_enough(selected: ArmTally, control: ArmTally, needed: int) -> str:
    if control.reviewed < needed:
        return (
            f"not enough reviewed controls yet ({control.reviewed} of {needed} needed; "
            f"{control.queued} queued)"
        )
    return f"no reviewed selected images yet ({selected.queued} queued)"


def _times(ratio: float) -> str:
    return f"{ratio:.1f}" if ratio >= 1 else f"{ratio:.2f}"


def _sentence(
    selected: ArmTally,
    control: ArmTally,
    ratio: float | None,
    ratio_interval: Interval | None,
    difference: Interval,
    level: float,
) -> str:
    """The comparison in plain words, with the interval and whether it excludes no difference."""
    percent = f"{level * 100:.0f}%"
    if ratio is not None and ratio_interval is not None:
        span = f"({percent} interval {_times(ratio_interval.low)}-{_times(ratio_interval.high)})"
        if ratio >= 1:
            text = (
                f"selection finds {_times(ratio)}x more champion errors per image than random picks"
            )
        else:
            text = (
                "selection finds fewer champion errors per image than random picks "
                f"({_times(ratio)}x as many)"
            )
        text = f"{text} {span}"
    else:
        text = (
            f"selection finds {selected.errors_per_image:.2f} champion errors per image, random "
            f"picks {control.errors_per_image:.2f} (difference {percent} interval "
            f"{difference.low:+.2f} to {difference.high:+.2f})"
        )
    if difference.low <= 0 <= difference.high:
        text += "; not distinguishable from random yet"
    return text


def ledger(
    session: Session,
    class_names: Sequence[str],
    cycles: Sequence[str] | None = None,
    *,
    limit: int = DEFAULT_CYCLES,
    min_reviewed_controls: int = MIN_REVIEWED_CONTROLS,
) -> Ledger:
    """The ledger of ``cycles`` (default: the newest ``limit``), each and all together."""
    wanted = list(cycles) if cycles is not None else recent_cycles(session, limit)
    counts, started = _queued(session, wanted) if wanted else ({}, {})
    reviewed = _reviewed(session, wanted, class_names) if wanted else {}
    options: dict[str, Any] = {"min_reviewed_controls": min_reviewed_controls}
    rows = [
        compare(
            cycle,
            started.get(cycle),
            {arm: counts.get((cycle, arm), 0) for arm in ARMS},
            {arm: reviewed.get((cycle, arm), []) for arm in ARMS},
            **options,
        )
        for cycle in wanted
    ]
    cumulative = compare(
        None,
        min(started.values(), default=None),
        {arm: sum(n for (_, a), n in counts.items() if a == arm) for arm in ARMS},
        {arm: [e for (_, a), found in reviewed.items() if a == arm for e in found] for arm in ARMS},
        **options,
    )
    return Ledger(rows, cumulative, min_reviewed_controls=min_reviewed_controls)
