"""Uncertainty sampling: strategies, budget and the audit sample (no servers needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pytest
from pydantic import ValidationError

from labeling.selection import (
    AUDIT_REASON,
    CONTROL_REASON,
    STRATEGIES,
    BatchStrategy,
    Candidate,
    SelectionContext,
    SelectionPolicy,
    audit_draw,
    select,
    uncertainty,
    uses_context,
)
from visionloop.settings import CONTROL_RATE, Settings


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
    band = {"strategy": "confidence_band"}  # a per-image strategy: it cannot see them itself
    calm = SelectionPolicy.from_settings(settings, drift_level="green", **band)
    drifted = SelectionPolicy.from_settings(settings, drift_level="red", **band)
    assert calm.audit_rate == 0.02 and drifted.audit_rate == 0.5
    assert SelectionPolicy.from_settings(settings, drift_level="yellow", **band).audit_rate == 0.5
    assert SelectionPolicy.from_settings(settings, **band).audit_rate == 0.02  # never measured
    assert len(select(blind, calm)) == 1  # ceil(40 * 0.02)
    picked = select(blind, drifted)
    assert len(picked) == 20  # the audit's share of the budget: ceil(40 * 0.5)
    assert {s.reason for s in picked} == {AUDIT_REASON}
    # Uncertain images still fill the rest of the budget.
    mixed = select(blind + [_c(1000 + i, 0.55) for i in range(30)], drifted)
    assert len(mixed) == 40 and sum(s.reason != AUDIT_REASON for s in mixed) == 20


def test_drift_leaves_a_batch_strategy_its_budget() -> None:
    # Hybrid scores blind and empty images itself: drift does not hand its budget to audits.
    settings = Settings(labeling_budget=40, drift_audit_rate=0.5)
    red = SelectionPolicy.from_settings(settings, drift_level="red", strategy="hybrid")
    assert red.audit_rate == 0.02
    pinned = {"strategy": "hybrid", "audit_rate": 0.3}
    assert SelectionPolicy.from_settings(settings, drift_level="red", **pinned).audit_rate == 0.3
    margin = SelectionPolicy.from_settings(settings, drift_level="red", strategy="margin")
    assert margin.audit_rate == 0.5


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
    policy = SelectionPolicy(strategy="confidence_band", budget=40, audit_rate=0.1, seed=3)
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


def test_only_batch_strategies_need_a_cycle_context() -> None:
    # The ingest flow embeds the champion's training images only for a strategy that reads them.
    assert uses_context("hybrid")
    assert not any(uses_context(name) for name in ("confidence_band", "margin", "entropy"))
    assert not uses_context("no-such-strategy")


# --- the control arm --------------------------------------------------------------------------


def _mixed(n: int) -> list[Candidate]:
    """Confident, empty and uncertain images alike: the control draws from all of them."""
    kinds = ([0.99], [], [0.5], [0.3, 0.95])
    return [_c(i, *kinds[i % len(kinds)]) for i in range(n)]


def test_policy_takes_the_control_rate_from_the_settings() -> None:
    settings = Settings(control_rate=0.25)
    assert SelectionPolicy.from_settings(settings).control_rate == 0.25
    assert SelectionPolicy().control_rate == CONTROL_RATE
    with pytest.raises(ValidationError):
        SelectionPolicy(control_rate=1.5)


def test_control_arm_draws_its_exact_share_from_all_candidates_reproducibly() -> None:
    candidates = _mixed(400)
    policy = SelectionPolicy(strategy="margin", budget=40, control_rate=0.1, audit_rate=0.1)
    chosen = select(candidates, policy, SelectionContext(cycle="run-1"))
    control = [s for s in chosen if s.arm == "control"]
    assert len(control) == 4 and len(chosen) == 40  # ceil(40 * 0.1), the rest as before
    assert all(s.reason == CONTROL_REASON and 0.0 <= s.parts["draw"] < 1.0 for s in control)
    assert [s.arm for s in chosen[:4]] == ["control"] * 4
    # Never queued twice: the other arms choose from what the control left.
    assert len({s.image_id for s in chosen}) == 40
    assert {s.arm for s in chosen[4:]} == {"audit", "selected"}
    # Same cycle, any order: the same draw; another cycle or seed: another draw.
    again = select(list(reversed(candidates)), policy, SelectionContext(cycle="run-1"))
    assert again == chosen
    other = select(candidates, policy, SelectionContext(cycle="run-2"))
    assert {s.image_id for s in other if s.arm == "control"} != {s.image_id for s in control}
    reseeded = select(candidates, policy.model_copy(update={"seed": 9}), SelectionContext("x"))
    assert reseeded != chosen
    # Drawn from all candidates: over cycles every kind of image (confident, empty,
    # uncertain) turns up, not just the ones a strategy would flag.
    drawn = {
        s.image_id % 4
        for cycle in range(30)
        for s in select(candidates, policy, SelectionContext(cycle=str(cycle)))
        if s.arm == "control"
    }
    assert drawn == {0, 1, 2, 3}


def test_no_control_arm_outside_a_cycle_or_at_rate_zero() -> None:
    candidates = _mixed(100)
    policy = SelectionPolicy(strategy="margin", budget=20, control_rate=0.5, audit_rate=0)
    assert all(s.arm == "selected" for s in select(candidates, policy))
    assert all(s.arm == "selected" for s in select(candidates, policy, SelectionContext()))
    off = policy.model_copy(update={"control_rate": 0.0})
    assert all(s.arm == "selected" for s in select(candidates, off, SelectionContext(cycle="c")))
    # The whole budget can go to the control.
    everything = policy.model_copy(update={"control_rate": 1.0})
    assert {s.arm for s in select(candidates, everything, SelectionContext(cycle="c"))} == {
        "control"
    }


def test_control_draw_is_uniform_over_the_candidates() -> None:
    """Each image's share of control draws over many cycles stays within a chi-square bound
    (deterministic: the cycles are fixed, so this cannot flake)."""
    n, cycles = 20, 2000
    candidates = _mixed(n)
    policy = SelectionPolicy(strategy="margin", budget=10, control_rate=0.3, audit_rate=0)
    counts = np.zeros(n)
    for cycle in range(cycles):
        for s in select(candidates, policy, SelectionContext(cycle=f"cycle-{cycle}")):
            if s.arm == "control":
                counts[s.image_id] += 1
    assert counts.sum() == 3 * cycles
    expected = 3 * cycles / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 43.8  # chi-square, 19 degrees of freedom, p = 0.001


# --- hybrid -----------------------------------------------------------------------------------


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def _hybrid(budget: int, **update: object) -> SelectionPolicy:
    values: dict[str, object] = {
        "strategy": "hybrid",
        "budget": budget,
        "audit_rate": 0.0,
        "control_rate": 0.0,
    }
    return SelectionPolicy(**(values | update))


def test_hybrid_is_a_registered_batch_strategy() -> None:
    assert isinstance(STRATEGIES["hybrid"], BatchStrategy)
    assert SelectionPolicy(strategy="hybrid").strategy == "hybrid"


def test_hybrid_asks_about_images_a_drifted_model_almost_saw() -> None:
    """No shown box, candidates just under the threshold: wanted, unlike a clear-cut image
    (which the per-image strategies would take as confident and never ask about)."""
    almost = Candidate(1, "hash-1", [], below=[(0, 0.2), (0, 0.05)])
    clear = Candidate(2, "hash-2", [0.97], classes=[0], below=[(0, 0.02)])
    nothing = Candidate(3, "hash-3", [])
    chosen = select([clear, almost, nothing], _hybrid(3))
    # Clear-cut, or nothing at all and nothing new: not asked, though the budget has room.
    assert [s.image_id for s in chosen] == [1]
    assert chosen[0].reason == "hybrid" and chosen[0].arm == "selected"
    assert chosen[0].confidence == pytest.approx(0.2)
    assert chosen[0].parts["uncertainty"] > 0.7
    assert {"uncertainty", "novelty", "class_weight", "score"} <= set(chosen[0].parts)
    assert select([clear, almost, nothing], SelectionPolicy(strategy="margin", audit_rate=0)) == []
    # With the bar at 0, anything with a candidate box may fill the budget.
    assert [s.image_id for s in select([clear, almost, nothing], _hybrid(3, min_score=0.0))] == [
        1,
        2,
    ]


def test_hybrid_asks_about_empty_images_unlike_the_training_set() -> None:
    rng = np.random.default_rng(0)
    scenes = _unit(rng.standard_normal((4, 32)))
    reference = _unit(np.repeat(scenes, 25, axis=0) + 0.05 * rng.standard_normal((100, 32)))
    familiar = [
        Candidate(i, f"f{i}", [], embedding=_unit(scenes[i % 4] + 0.05 * rng.standard_normal(32)))
        for i in range(20)
    ]
    unseen = [
        Candidate(100 + i, f"u{i}", [], embedding=_unit(rng.standard_normal(32))) for i in range(3)
    ]
    context = SelectionContext(reference=reference)
    chosen = select(familiar + unseen, _hybrid(5), context)
    # The model found nothing anywhere; only the unseen images are new enough to ask about.
    assert sorted(s.image_id for s in chosen) == [100, 101, 102]
    assert all(s.parts["novelty"] > 0.5 and s.confidence is None for s in chosen)
    # Without a reference nothing is novel, and nothing is uncertain either.
    assert select(familiar + unseen, _hybrid(5)) == []


def test_hybrid_weighs_weak_classes_up() -> None:
    strong = Candidate(1, "hash-1", [0.6], classes=[0])
    weak = Candidate(2, "hash-2", [0.8], classes=[1])
    policy = _hybrid(1)
    assert select([strong, weak], policy)[0].image_id == 1  # the more doubtful box
    picked = select([strong, weak], policy, SelectionContext(class_weights={1: 2.0}))
    assert picked[0].image_id == 2 and picked[0].parts["class_weight"] == 2.0


def test_hybrid_picks_a_diverse_batch_over_near_identical_high_scorers() -> None:
    rng = np.random.default_rng(1)
    scene = _unit(rng.standard_normal(32))
    # Ten frames of one scene, all coin flips, and five different images a little less so.
    frames = [
        Candidate(i, f"a{i}", [0.5], embedding=_unit(scene + 0.001 * rng.standard_normal(32)))
        for i in range(10)
    ]
    distinct = [
        Candidate(20 + i, f"b{i}", [0.7], embedding=_unit(rng.standard_normal(32)))
        for i in range(5)
    ]
    chosen = select(frames + distinct, _hybrid(4))
    ids = [s.image_id for s in chosen]
    assert sum(i < 10 for i in ids) == 1  # the scene is one question
    assert len(set(ids)) == 4
    assert all(s.parts["distance"] > 0.5 for s in chosen)
    # The per-image margin strategy fills the batch with the frames.
    margin_ids = [
        s.image_id
        for s in select(
            frames + distinct, SelectionPolicy(strategy="margin", budget=4, audit_rate=0)
        )
    ]
    assert all(i < 10 for i in margin_ids)
    # Without embeddings the hybrid degrades to score order.
    bare = [Candidate(c.image_id, c.content_hash, c.confidences) for c in frames + distinct]
    assert [s.image_id for s in select(bare, _hybrid(4))] == [0, 1, 2, 3]


def test_hybrid_refines_its_shortlist_by_flip_disagreement() -> None:
    candidates = [Candidate(i, f"h{i}", [0.6 + i / 100]) for i in range(10)]
    asked: list[list[int]] = []

    def flip(shortlist: Sequence[Candidate]) -> Mapping[int, float]:
        asked.append([c.image_id for c in shortlist])
        return {c.image_id: (1.0 if c.image_id == 3 else 0.0) for c in shortlist}

    chosen = select(candidates, _hybrid(2, shortlist_factor=2.0), SelectionContext(flip=flip))
    # Only the shortlist (2 x budget, the best scores) takes the mirrored pass.
    assert asked == [[0, 1, 2, 3]]
    assert chosen[0].image_id == 3 and chosen[0].parts["flip"] == 1.0
    assert chosen[0].score == pytest.approx(chosen[0].parts["uncertainty"] + 1.0)


def test_hybrid_shares_the_budget_with_control_and_audit() -> None:
    candidates = [_c(i, 0.99) for i in range(200)] + [_c(1000 + i, 0.55) for i in range(100)]
    policy = SelectionPolicy(strategy="hybrid", budget=20, audit_rate=0.1, control_rate=0.1)
    chosen = select(candidates, policy, SelectionContext(cycle="c1"))
    arms = [s.arm for s in chosen]
    assert len(chosen) == 20 and len({s.image_id for s in chosen}) == 20
    assert (arms.count("control"), arms.count("audit"), arms.count("selected")) == (2, 2, 16)
    assert all(s.reason == "hybrid" and s.parts for s in chosen if s.arm == "selected")
    # Same batch in another order, same queue.
    assert select(list(reversed(candidates)), policy, SelectionContext(cycle="c1")) == chosen


def test_hybrid_copes_with_missing_or_mismatched_embeddings() -> None:
    rng = np.random.default_rng(2)
    with_emb = [
        Candidate(i, f"e{i}", [0.5], embedding=_unit(rng.standard_normal(8))) for i in range(3)
    ]
    without = [Candidate(10, "n10", [0.5]), Candidate(11, "n11", [0.5], embedding=np.ones(4))]
    for reference in (None, np.empty((0, 8), np.float32), _unit(rng.standard_normal((5, 16)))):
        chosen = select(with_emb + without, _hybrid(5), SelectionContext(reference=reference))
        # Images without a comparable embedding are treated as unlike all others.
        assert sorted(s.image_id for s in chosen) == [0, 1, 2, 10, 11]
        assert all(s.parts["novelty"] == 0.0 for s in chosen)


def test_hybrid_collapses_frames_of_one_scene_relative_to_the_training_images() -> None:
    """Ten frames of one scene fill a shortlist of the best scores; collapsed to one, the
    shortlist reaches the other images. The threshold follows the features' own scale (the
    distance between neighbouring training images), so it holds for any model."""
    rng = np.random.default_rng(3)
    for scale in (1.0, 0.05):  # unrelated images 1 or 0.05 apart: two models' features
        common = _unit(rng.standard_normal(32))

        def feature(x: np.ndarray, scale: float = scale, common: np.ndarray = common) -> np.ndarray:
            return _unit(common + scale * x)

        reference = np.stack([feature(rng.standard_normal(32)) for _ in range(60)])
        scene = rng.standard_normal(32)
        frames = [
            Candidate(i, f"a{i}", [0.5], embedding=feature(scene + 0.01 * rng.standard_normal(32)))
            for i in range(10)
        ]
        distinct = [
            Candidate(20 + i, f"b{i}", [0.7], embedding=feature(rng.standard_normal(32)))
            for i in range(5)
        ]
        policy = _hybrid(4, shortlist_factor=1.0, novelty_weight=0.0)
        chosen = select(frames + distinct, policy, SelectionContext(reference=reference))
        assert sum(s.image_id < 10 for s in chosen) == 1, scale
        # Without the collapse, the shortlist holds nothing but frames.
        off = policy.model_copy(update={"duplicate_distance": 0.0})
        chosen = select(frames + distinct, off, SelectionContext(reference=reference))
        assert all(s.image_id < 10 for s in chosen), scale


def test_hybrid_keeps_the_batch_away_from_the_training_images() -> None:
    rng = np.random.default_rng(4)
    reference = _unit(rng.standard_normal((20, 16)))
    known = Candidate(1, "k", [0.5], embedding=reference[3])  # labelled already, as good as
    others = [
        Candidate(10 + i, f"o{i}", [0.6], embedding=_unit(rng.standard_normal(16)))
        for i in range(3)
    ]
    context = SelectionContext(reference=reference)
    # The most doubtful image is a training image again: its label answers it already.
    assert select([known, *others], _hybrid(1), context)[0].image_id != 1
    # Not taken for a duplicate, it still loses to images far from the training set...
    kept = _hybrid(1, duplicate_distance=0.0)
    assert select([known, *others], kept, context)[0].image_id != 1
    # ...unless the pick ignores the training images: then the score alone decides.
    plain = _hybrid(1, duplicate_distance=0.0, spread_from_reference=False)
    assert select([known, *others], plain, context)[0].image_id == 1
