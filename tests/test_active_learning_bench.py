"""The active-learning benchmark's pure logic: pool bookkeeping, picks, savings (no training)."""

from __future__ import annotations

import pytest

from bench.active_learning import (
    EASY,
    LabelPool,
    Savings,
    labels_saved,
    labels_to_reach,
    mixture,
    parse_args,
    pick_uncertain,
    random_pick,
)
from labeling.selection import Candidate, SelectionPolicy


def _c(image_id: int, *confs: float) -> Candidate:
    return Candidate(image_id, f"img-{image_id}", list(confs))


# --- savings ------------------------------------------------------------------------------


def test_interpolates_between_the_points_that_bracket_the_target() -> None:
    curve = [(10, 0.2), (20, 0.4), (30, 0.6)]
    assert labels_to_reach(curve, 0.5) == pytest.approx(25.0)
    assert labels_to_reach(curve, 0.4) == pytest.approx(20.0)
    assert labels_to_reach(curve, 0.45) == pytest.approx(22.5)


def test_first_crossing_counts_on_a_curve_that_dips() -> None:
    curve = [(10, 0.2), (20, 0.5), (30, 0.3), (40, 0.6)]
    assert labels_to_reach(curve, 0.35) == pytest.approx(15.0)


def test_a_target_already_met_at_the_start_costs_no_more_labels() -> None:
    assert labels_to_reach([(10, 0.5), (20, 0.6)], 0.3) == 10.0


def test_never_reaching_the_target_is_none() -> None:
    assert labels_to_reach([(10, 0.2), (20, 0.4), (30, 0.45)], 0.5) is None
    assert labels_to_reach([], 0.1) is None


def test_labels_must_ascend() -> None:
    with pytest.raises(ValueError):
        labels_to_reach([(20, 0.2), (10, 0.4)], 0.3)


def test_labels_saved_against_randoms_final_point() -> None:
    uncertainty = [(32, 0.30), (64, 0.50), (96, 0.60), (128, 0.70)]
    random = [(32, 0.30), (64, 0.40), (96, 0.50), (128, 0.60)]
    s = labels_saved(uncertainty, random, "mAP50-95")
    assert (s.metric, s.target, s.random_labels) == ("mAP50-95", 0.60, 128)
    assert s.uncertainty_labels == pytest.approx(96.0)
    assert s.saved == pytest.approx(32.0)
    assert s.saved_pct == pytest.approx(25.0)
    assert s.reached and s.random_improved
    assert s.baseline == 0.30


def test_labels_saved_when_uncertainty_never_gets_there() -> None:
    uncertainty = [(32, 0.30), (64, 0.35), (96, 0.40)]
    random = [(32, 0.30), (64, 0.45), (96, 0.55)]
    s = labels_saved(uncertainty, random, "mAP50")
    assert not s.reached
    assert s.uncertainty_labels is None and s.saved is None and s.saved_pct is None
    assert s.as_dict()["reached"] is False


def test_uncertainty_behind_random_is_a_negative_saving() -> None:
    uncertainty = [(10, 0.1), (20, 0.2), (30, 0.5)]
    random = [(10, 0.1), (20, 0.4), (25, 0.35)]
    s = labels_saved(uncertainty, random, "mAP50")
    assert s.uncertainty_labels == pytest.approx(25.0)
    assert s.saved == pytest.approx(0.0)
    s = labels_saved([(10, 0.1), (20, 0.2), (30, 0.4)], [(10, 0.1), (20, 0.3)], "mAP50")
    assert s.saved == pytest.approx(-5.0)
    assert s.saved_pct == pytest.approx(-25.0)


def test_a_random_curve_that_never_improved_is_flagged() -> None:
    s = labels_saved([(8, 0.2), (16, 0.1)], [(8, 0.2), (16, 0.15)], "mAP50")
    assert not s.random_improved
    assert Savings("m", 0.3, 16, 8.0, baseline=0.2).random_improved


# --- picks --------------------------------------------------------------------------------


def test_uncertain_pick_takes_the_highest_scores_first() -> None:
    candidates = [_c(1, 0.95), _c(2, 0.5), _c(3, 0.3), _c(4, 0.62), _c(5, 0.9, 0.45)]
    policy = SelectionPolicy(strategy="margin", budget=99, audit_rate=0.5)
    # margin scores: 1 -> confident, 2 -> 1.0, 3 -> 0.6, 4 -> 0.76, 5 -> 0.9
    assert pick_uncertain(candidates, policy, 3, seed=0) == [2, 5, 4]
    assert pick_uncertain(candidates, policy, 1, seed=0) == [2]


def test_uncertain_pick_is_deterministic_and_order_independent() -> None:
    candidates = [_c(i, 0.3 + 0.01 * (i % 7)) for i in range(40)]
    policy = SelectionPolicy(strategy="least_confidence")
    first = pick_uncertain(candidates, policy, 10, seed=3)
    assert first == pick_uncertain(list(reversed(candidates)), policy, 10, seed=3)
    # Ties (same score) go by content hash, as in the platform: "img-0" < "img-14" < ... < "img-7".
    assert first[:6] == [0, 14, 21, 28, 35, 7]
    assert len(first) == len(set(first)) == 10


def test_uncertain_pick_fills_with_a_seeded_draw_of_the_unflagged() -> None:
    flagged = [_c(1, 0.5), _c(2, 0.55)]
    confident = [_c(i, 0.99) for i in range(10, 30)] + [_c(30)]  # 30: no box, also confident
    policy = SelectionPolicy(strategy="margin")
    picked = pick_uncertain(flagged + confident, policy, 6, seed=7)
    assert picked[:2] == [1, 2]
    assert len(picked) == len(set(picked)) == 6
    assert set(picked[2:]) <= {c.image_id for c in confident}
    assert picked == pick_uncertain(flagged + confident, policy, 6, seed=7)
    others = [pick_uncertain(flagged + confident, policy, 6, seed=s)[2:] for s in range(8, 12)]
    assert any(fill != picked[2:] for fill in others)


def test_uncertain_pick_never_asks_for_more_than_there_is() -> None:
    assert sorted(pick_uncertain([_c(1, 0.5), _c(2, 0.99)], SelectionPolicy(), 5, seed=0)) == [1, 2]
    assert pick_uncertain([_c(1, 0.5)], SelectionPolicy(), 0, seed=0) == []


def test_random_pick_is_seeded() -> None:
    ids = list(range(100))
    a = random_pick(ids, 10, seed=1)
    assert a == random_pick(ids, 10, seed=1)
    assert a == random_pick(list(reversed(ids)), 10, seed=1)
    assert a != random_pick(ids, 10, seed=2)
    assert len(set(a)) == 10 and set(a) <= set(ids)
    assert sorted(random_pick([5, 3], 10, seed=0)) == [3, 5]
    assert random_pick(ids, 0, seed=0) == []


# --- pool bookkeeping ----------------------------------------------------------------------


def test_label_pool_tracks_labelled_and_unlabelled() -> None:
    pool = LabelPool(6, [4, 1])
    assert pool.labelled == [4, 1] and len(pool) == 2
    assert pool.unlabelled() == [0, 2, 3, 5]
    copy = pool.copy()
    copy.add([0])
    assert pool.unlabelled() == [0, 2, 3, 5]  # the copy is independent
    assert copy.labelled == [4, 1, 0]


@pytest.mark.parametrize("ids", [[1], [6], [-1], [2, 2]])
def test_label_pool_rejects_bad_additions(ids: list[int]) -> None:
    pool = LabelPool(6, [1])
    with pytest.raises(ValueError):
        pool.add(ids)
    assert pool.labelled == [1]  # nothing half-added


def test_mixture_has_the_requested_share_of_hard_images() -> None:
    kinds = ["dark", "blur", "noise", "cast"]
    conditions = mixture(100, 0.3, kinds, seed=0)
    assert len(conditions) == 100
    assert conditions.count(EASY) == 70
    assert {c: conditions.count(c) for c in kinds} == {"dark": 8, "blur": 8, "noise": 7, "cast": 7}
    assert conditions == mixture(100, 0.3, kinds, seed=0)
    assert conditions != mixture(100, 0.3, kinds, seed=1)
    assert mixture(10, 0.0, [], seed=0) == [EASY] * 10
    with pytest.raises(ValueError):
        mixture(10, 1.5, kinds, seed=0)


def test_quick_shrinks_only_what_was_not_given() -> None:
    args = parse_args(["--quick", "--cycles", "3"])
    assert args.cycles == 3 and args.pool == 64 and args.initial == 16
    full = parse_args([])
    assert (full.cycles, full.pool, full.initial, full.per_cycle) == (4, 400, 32, 32)
    with pytest.raises(SystemExit):
        parse_args(["--initial", "500"])
