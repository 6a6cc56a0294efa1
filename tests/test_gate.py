"""The promotion gate is a pure function: every rule and its reason, without servers."""

from __future__ import annotations

import pytest

from training.gate import decide


def _eval(primary: float, **per_class: float) -> dict:
    return {
        "metrics": {"mAP50": primary + 0.2, "mAP50-95": primary, "precision": 0.5, "recall": 0.5},
        "per_class": {
            name: {"AP50": ap + 0.2, "AP50-95": ap, "instances": 5}
            for name, ap in per_class.items()
        },
    }


def test_better_challenger_is_promoted_with_its_reasons() -> None:
    decision = decide(
        _eval(0.40, dent=0.4, stain=0.4),
        _eval(0.30, dent=0.3, stain=0.3),
        margin=0.05,
        tolerance=0.05,
    )
    assert decision.promote and decision.delta == pytest.approx(0.10)
    assert "challenger 0.400 vs champion 0.300 (+0.100)" in decision.reasons[0]
    assert "at least 0.050: met" in decision.reasons[0]
    assert decision.reasons[-1] == "Verdict: promote the challenger."


def test_improvement_below_the_margin_or_a_tie_keeps_the_champion() -> None:
    short = decide(_eval(0.33), _eval(0.30), margin=0.05, tolerance=0.05)
    assert not short.promote and "not met" in short.reasons[0]
    tie = decide(_eval(0.30), _eval(0.30), margin=0.0, tolerance=0.05)
    assert not tie.promote and "needs an improvement: not met" in tie.reasons[0]


def test_a_class_that_falls_beyond_the_tolerance_blocks_promotion() -> None:
    decision = decide(
        _eval(0.50, scratch=0.9, dent=0.2, stain=0.4),
        _eval(0.30, scratch=0.3, dent=0.3, stain=0.3),
        margin=0.0,
        tolerance=0.05,
    )
    assert not decision.promote
    assert decision.class_drops == {"dent": pytest.approx(0.1)}
    assert any("Class 'dent' AP50-95 fell by 0.100 (0.300 to 0.200)" in r for r in decision.reasons)
    within = decide(_eval(0.50, dent=0.26), _eval(0.30, dent=0.3), margin=0.0, tolerance=0.05)
    assert within.promote


def test_a_class_missing_from_the_challenger_counts_as_zero() -> None:
    decision = decide(
        _eval(0.5, dent=0.5), _eval(0.3, dent=0.3, stain=0.2), margin=0.0, tolerance=0.05
    )
    assert not decision.promote and decision.class_drops == {"stain": pytest.approx(0.2)}


def test_first_model_needs_no_champion_and_per_class_gaps_are_named() -> None:
    first = decide(_eval(0.01), None, margin=0.5, tolerance=0.0)
    assert first.promote and "no champion yet" in first.reasons[0]
    noted = decide(
        _eval(0.4, dent=0.4),
        _eval(0.3, dent=0.3),
        margin=0,
        tolerance=0.05,
        class_names=["dent", "stain"],
    )
    assert any("no held-out examples: stain" in r for r in noted.reasons)


def test_primary_metric_is_configurable_and_checked() -> None:
    on_map50 = decide(
        _eval(0.30, dent=0.3),
        _eval(0.30, dent=0.3),
        margin=0.0,
        tolerance=0.05,
        primary_metric="mAP50",
    )
    assert not on_map50.promote and on_map50.primary_metric == "mAP50"
    with pytest.raises(ValueError, match="unknown primary metric"):
        decide(_eval(0.3), _eval(0.2), margin=0, tolerance=0, primary_metric="accuracy")


def test_a_held_out_set_below_the_minimum_size_never_promotes_over_a_champion() -> None:
    better = (_eval(0.40, dent=0.4), _eval(0.30, dent=0.3))
    small = decide(*better, margin=0.0, tolerance=0.05, holdout_images=4, min_holdout_images=5)
    assert not small.promote and small.reasons[-1] == "Verdict: keep the champion."
    assert "has 4 images; a promotion needs at least 5" in small.reasons[-2]
    enough = decide(*better, margin=0.0, tolerance=0.05, holdout_images=5, min_holdout_images=5)
    assert enough.promote and not any("held-out set has" in r for r in enough.reasons)
    first = decide(
        better[0], None, margin=0.0, tolerance=0.05, holdout_images=1, min_holdout_images=5
    )
    assert first.promote  # no champion to protect: the first model is better than none


def _interval(low: float, high: float) -> dict:
    return {
        "difference": (low + high) / 2,
        "low": low,
        "high": high,
        "level": 0.95,
        "resamples": 1000,
        "images": 40,
        "seed": 0,
    }


def test_the_bootstrap_interval_is_always_a_reason_and_blocks_only_when_required() -> None:
    better = (_eval(0.40, dent=0.4), _eval(0.30, dent=0.3))
    unsure = _interval(-0.02, 0.2)
    reported = decide(*better, margin=0.0, tolerance=0.05, interval=unsure)
    assert reported.promote and reported.interval == unsure
    assert any(
        "95% bootstrap interval" in r
        and "[-0.020, +0.200]" in r
        and "includes zero" in r
        and "not required" in r
        for r in reported.reasons
    )
    required = decide(*better, margin=0.0, tolerance=0.05, interval=unsure, require_interval=True)
    assert not required.promote
    assert any("above zero" in r and r.endswith("not met.") for r in required.reasons)
    sure = decide(
        *better, margin=0.0, tolerance=0.05, interval=_interval(0.03, 0.2), require_interval=True
    )
    assert sure.promote and any(r.endswith("met.") and "better" in r for r in sure.reasons)
    # Without an interval (no per-image results) the gate decides as before.
    assert decide(*better, margin=0.0, tolerance=0.05).interval is None
