"""Uncertainty sampling: strategies, budget and the audit sample (no servers needed)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from labeling.selection import (
    AUDIT_REASON,
    STRATEGIES,
    Candidate,
    SelectionPolicy,
    audit_draw,
    select,
    uncertainty,
)
from visionloop.settings import Settings


def _c(image_id: int, *confs: float) -> Candidate:
    return Candidate(image_id, f"hash-{image_id}", list(confs))


def test_policy_defaults_come_from_the_settings() -> None:
    settings = Settings(uncertainty_low=0.3, uncertainty_high=0.8, labeling_budget=7, seed=5)
    policy = SelectionPolicy.from_settings(settings, strategy="margin")
    assert (policy.low, policy.high, policy.budget, policy.seed, policy.strategy) == (
        0.3,
        0.8,
        7,
        5,
        "margin",
    )


def test_drift_widens_the_audit_of_confident_images() -> None:
    settings = Settings(labeling_budget=40, drift_audit_rate=0.5)
    # A drifted model sees nothing with confidence: only the audit can bring these to review.
    blind = [_c(i) for i in range(200)]
    calm = SelectionPolicy.from_settings(settings, drift_level="green")
    drifted = SelectionPolicy.from_settings(settings, drift_level="red")
    assert calm.audit_rate == 0.02 and drifted.audit_rate == 0.5
    assert SelectionPolicy.from_settings(settings, drift_level="yellow").audit_rate == 0.5
    assert SelectionPolicy.from_settings(settings).audit_rate == 0.02  # never measured
    assert len(select(blind, calm)) == 1  # ceil(40 * 0.02)
    picked = select(blind, drifted)
    assert len(picked) == 20  # the audit's share of the budget: ceil(40 * 0.5)
    assert {s.reason for s in picked} == {AUDIT_REASON}
    # Uncertain images still fill the rest of the budget.
    mixed = select(blind + [_c(1000 + i, 0.55) for i in range(30)], drifted)
    assert len(mixed) == 40 and sum(s.reason != AUDIT_REASON for s in mixed) == 20


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValidationError):
        SelectionPolicy(low=0.8, high=0.4)
    with pytest.raises(ValidationError):
        SelectionPolicy(strategy="vibes")  # type: ignore[arg-type]


def test_confidence_band_takes_images_with_a_box_in_the_band() -> None:
    policy = SelectionPolicy(strategy="confidence_band", low=0.4, high=0.7, budget=10, audit_rate=0)
    chosen = select([_c(1, 0.95, 0.55), _c(2, 0.3), _c(3, 0.69, 0.2), _c(4, 0.9), _c(5)], policy)
    assert [(s.image_id, s.reason) for s in chosen] == [
        (1, "confidence_band"),
        (3, "confidence_band"),
    ]
    # The box that decided is recorded, nearest the middle first.
    assert [s.confidence for s in chosen] == [0.55, 0.69]


def test_ranking_strategies_order_by_their_own_uncertainty() -> None:
    candidates = [_c(1, 0.3), _c(2, 0.5), _c(3, 0.65, 0.6, 0.55), _c(4, 0.95)]
    order = {
        name: [
            s.image_id
            for s in select(candidates, SelectionPolicy(strategy=name, budget=10, audit_rate=0))
        ]
        for name in ("least_confidence", "margin", "entropy")
    }
    assert order["least_confidence"] == [1, 2, 3]  # image 4 is confident: never uncertain
    assert order["margin"] == [2, 3, 1]
    assert order["entropy"] == [3, 2, 1]  # three doubtful boxes outweigh one coin flip


def test_budget_caps_the_queue_most_uncertain_first() -> None:
    candidates = [_c(i, 0.4 + i / 100) for i in range(20)]
    chosen = select(candidates, SelectionPolicy(strategy="margin", budget=3, audit_rate=0))
    # 0.49 and 0.51 are equally far from a coin flip: the tie goes by content hash
    # ("hash-11" < "hash-9"), whatever order the ids say.
    assert [s.image_id for s in chosen] == [10, 11, 9]
    assert select(candidates, SelectionPolicy(budget=0)) == []


def test_ties_follow_content_not_ids() -> None:
    """The same images under other ids (another commit order) give the same queue."""
    policy = SelectionPolicy(strategy="margin", budget=3, audit_rate=0.5, seed=1)
    hashes = [f"{i:02d}-image" for i in range(12)]
    confs = [[0.5] if i % 2 else [] for i in range(12)]  # six exact ties, six confident
    first = select([Candidate(i, h, c) for i, (h, c) in enumerate(zip(hashes, confs))], policy)
    ids = {i: 100 - i for i in range(12)}  # reversed id order
    second = select(
        [Candidate(ids[i], h, c) for i, (h, c) in enumerate(zip(hashes, confs))], policy
    )
    content = {i: h for i, h in enumerate(hashes)} | {ids[i]: h for i, h in enumerate(hashes)}
    assert [content[s.image_id] for s in first] == [content[s.image_id] for s in second]
    assert [s.reason for s in first].count("margin") >= 1


def test_audit_samples_confident_images_reproducibly_within_its_share() -> None:
    confident = [_c(i, 0.99) for i in range(200)] + [_c(1000 + i) for i in range(200)]
    uncertain = [_c(5000 + i, 0.5) for i in range(100)]
    policy = SelectionPolicy(budget=40, audit_rate=0.1, seed=3)
    chosen = select(confident + uncertain, policy)
    audited = [s for s in chosen if s.reason == AUDIT_REASON]
    assert len(chosen) == 40 and len(audited) == 4  # ceil(40 * 0.1)
    assert all(s.image_id < 5000 for s in audited)
    assert all(audit_draw(f"hash-{s.image_id}", 3) < 0.1 for s in audited)
    # Same images, another order, same choice; another seed, another sample.
    assert select(list(reversed(confident + uncertain)), policy) == chosen
    other = select(confident + uncertain, policy.model_copy(update={"seed": 4}))
    assert {s.image_id for s in other if s.reason == AUDIT_REASON} != {s.image_id for s in audited}


def test_uncertainty_is_closeness_to_a_coin_flip() -> None:
    assert uncertainty([]) == 0.0
    assert uncertainty([0.5]) == pytest.approx(1.0)
    assert uncertainty([0.9, 0.75]) == pytest.approx(0.5)


def test_strategies_are_pluggable() -> None:
    assert set(STRATEGIES) >= {"confidence_band", "least_confidence", "margin", "entropy"}
