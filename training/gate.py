"""The promotion gate: is the challenger measurably better than the champion on the same test?

A pure function over two evaluations of the same held-out set, so every rule is easy to test
and the reasons a person reads are exactly the ones the decision was made on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_PRIMARY_METRIC = "mAP50-95"
"""The metric the challenger must improve (one of training.evaluation.METRICS)."""

# The per-class AP the tolerance applies to, following the primary metric's IoU range.
_CLASS_METRIC = {
    "mAP50": "AP50",
    "mAP50-95": "AP50-95",
    "precision": "AP50-95",
    "recall": "AP50-95",
}


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: list[str]
    primary_metric: str
    challenger_value: float
    champion_value: float | None = None
    delta: float | None = None
    class_drops: dict[str, float] = field(default_factory=dict)  # class -> drop beyond tolerance
    interval: dict[str, Any] | None = None  # DifferenceInterval.as_dict() of the mAP50-95 delta

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(
    challenger: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    *,
    margin: float,
    tolerance: float,
    primary_metric: str = DEFAULT_PRIMARY_METRIC,
    class_names: Sequence[str] = (),
    holdout_images: int | None = None,
    min_holdout_images: int = 0,
    interval: Mapping[str, Any] | None = None,
    require_interval: bool = False,
) -> GateDecision:
    """Promote only if the challenger beats the champion on ``primary_metric`` by at least
    ``margin`` (and by more than nothing: a tie keeps the champion), and no class's AP falls
    by more than ``tolerance``.

    ``challenger`` and ``champion`` are ``EvalResult.as_dict()`` of the same held-out set;
    ``champion`` is None when there is no champion yet. ``class_names`` only adds a note for
    classes the held-out set has no example of. With a champion to protect, a held-out set of
    fewer than ``min_holdout_images`` images (``holdout_images``) never promotes: on a handful
    of images a difference in mAP is mostly which images happened to be drawn.

    ``interval`` (``training.interval.DifferenceInterval.as_dict()``) says how sure the
    difference is and is always among the reasons; with ``require_interval`` the challenger
    is promoted only if the whole interval lies above zero.
    """
    if primary_metric not in _CLASS_METRIC:
        raise ValueError(
            f"unknown primary metric {primary_metric!r}; use one of {sorted(_CLASS_METRIC)}"
        )
    new = float(challenger["metrics"][primary_metric])
    if champion is None:
        return GateDecision(
            True,
            [
                f"There is no champion yet, so the challenger ({primary_metric} {new:.3f} on the "
                "held-out set) becomes the first one."
            ],
            primary_metric,
            new,
        )

    old = float(champion["metrics"][primary_metric])
    delta = new - old
    better, reasons = _improvement(primary_metric, new, old, margin)
    drops, class_reasons = _class_drops(
        challenger, champion, _CLASS_METRIC[primary_metric], tolerance
    )
    reasons += class_reasons
    unseen = _unseen(class_names, challenger, champion)
    if unseen:
        reasons.append(f"Not judged per class, no held-out examples: {', '.join(unseen)}.")

    too_small = holdout_images is not None and holdout_images < min_holdout_images
    if too_small:
        reasons.append(
            f"The held-out set has {holdout_images} images; a promotion needs at least "
            f"{min_holdout_images} (VISIONLOOP_MIN_HOLDOUT_IMAGES) to be more than chance: "
            "not met."
        )
    unsure = False
    if interval is not None:
        unsure, interval_reason = _certainty(interval, require_interval)
        reasons.append(interval_reason)
    promote = better and not drops and not too_small and not unsure
    reasons.append("Verdict: promote the challenger." if promote else "Verdict: keep the champion.")
    return GateDecision(
        promote,
        reasons,
        primary_metric,
        new,
        old,
        round(delta, 6),
        drops,
        dict(interval) if interval is not None else None,
    )


def _certainty(interval: Mapping[str, Any], required: bool) -> tuple[bool, str]:
    """Whether the interval blocks a promotion (only when ``required``), and what it says."""
    low, high = float(interval["low"]), float(interval["high"])
    level = float(interval["level"])
    described = (
        f"{level:.0%} bootstrap interval of the mAP50-95 difference (challenger - champion) over "
        f"{interval['images']} held-out images ({interval['resamples']} paired resamples): "
        f"{float(interval['difference']):+.3f} [{low:+.3f}, {high:+.3f}]"
    )
    if low > 0:
        meaning = "the challenger is better on nearly every redraw of the held-out images"
    elif high < 0:
        meaning = "the challenger is worse on nearly every redraw of the held-out images"
    else:
        meaning = "it includes zero, so the held-out set cannot tell the two models apart"
    unsure = required and not low > 0
    if required:
        rule = "; promotion needs it above zero (VISIONLOOP_GATE_REQUIRES_INTERVAL): " + (
            "not met" if unsure else "met"
        )
    else:
        rule = " (reported, not required)"
    return unsure, f"{described}; {meaning}{rule}."


def _improvement(metric: str, new: float, old: float, margin: float) -> tuple[bool, list[str]]:
    """Whether ``new`` improves on ``old`` by ``margin`` (a tie never does), and why."""
    delta = new - old
    better = delta > 0 and delta >= margin
    need = f"an improvement of at least {margin:.3f}" if margin > 0 else "an improvement"
    reason = (
        f"{metric} on the held-out set: challenger {new:.3f} vs champion {old:.3f} "
        f"({delta:+.3f}); promotion needs {need}: {'met' if better else 'not met'}."
    )
    return better, [reason]


def _class_drops(
    challenger: Mapping[str, Any],
    champion: Mapping[str, Any],
    class_metric: str,
    tolerance: float,
) -> tuple[dict[str, float], list[str]]:
    """The classes whose ``class_metric`` fell by more than ``tolerance`` (class: drop), and
    why; a class missing from the challenger counts as zero."""
    drops: dict[str, float] = {}
    reasons: list[str] = []
    for name, old_class in sorted(champion.get("per_class", {}).items()):
        before = float(old_class[class_metric])
        after = float(challenger.get("per_class", {}).get(name, {}).get(class_metric, 0.0))
        if before - after > tolerance:
            drops[name] = round(before - after, 6)
            reasons.append(
                f"Class {name!r} {class_metric} fell by {before - after:.3f} ({before:.3f} to "
                f"{after:.3f}), more than the {tolerance:.3f} tolerance."
            )
    if not drops:
        reasons.append(f"No class {class_metric} fell by more than the {tolerance:.3f} tolerance.")
    return drops, reasons


def _unseen(
    class_names: Sequence[str], challenger: Mapping[str, Any], champion: Mapping[str, Any]
) -> list[str]:
    """Classes neither evaluation has an example of in the held-out set."""
    judged = set(champion.get("per_class", {})) | set(challenger.get("per_class", {}))
    return [name for name in class_names if name not in judged]
