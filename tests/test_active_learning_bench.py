"""The active-learning benchmark's pure logic: pool bookkeeping, picks, savings, aggregation
over seeds (no training)."""

from __future__ import annotations

import math

import pytest

from bench.active_learning import (
    EASY,
    Frame,
    LabelPool,
    Point,
    Savings,
    StrategyRun,
    build_frames,
    curve_over_seeds,
    initial_pick,
    labels_saved,
    labels_to_reach,
    mixture,
    over_seeds,
    paired_gaps,
    parse_args,
    pick_uncertain,
    print_results,
    random_pick,
    split_boxes,
    verdict,
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
    assert s.strategy_labels == pytest.approx(96.0)
    assert s.saved == pytest.approx(32.0)
    assert s.saved_pct == pytest.approx(25.0)
    assert s.reached and s.random_improved
    assert s.baseline == 0.30


def test_labels_saved_when_uncertainty_never_gets_there() -> None:
    uncertainty = [(32, 0.30), (64, 0.35), (96, 0.40)]
    random = [(32, 0.30), (64, 0.45), (96, 0.55)]
    s = labels_saved(uncertainty, random, "mAP50")
    assert not s.reached
    assert s.strategy_labels is None and s.saved is None and s.saved_pct is None
    assert s.as_dict()["reached"] is False


def test_uncertainty_behind_random_is_a_negative_saving() -> None:
    uncertainty = [(10, 0.1), (20, 0.2), (30, 0.5)]
    random = [(10, 0.1), (20, 0.4), (25, 0.35)]
    s = labels_saved(uncertainty, random, "mAP50")
    assert s.strategy_labels == pytest.approx(25.0)
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
    policy = SelectionPolicy(strategy="margin", budget=99, audit_rate=0.5, control_rate=0.0)
    # margin scores: 1 -> confident, 2 -> 1.0, 3 -> 0.6, 4 -> 0.76, 5 -> 0.9
    assert pick_uncertain(candidates, policy, 3, seed=0) == [2, 5, 4]
    assert pick_uncertain(candidates, policy, 1, seed=0) == [2]


def test_uncertain_pick_is_deterministic_and_order_independent() -> None:
    candidates = [_c(i, 0.3 + 0.01 * (i % 7)) for i in range(40)]
    policy = SelectionPolicy(strategy="least_confidence", control_rate=0.0)
    first = pick_uncertain(candidates, policy, 10, seed=3)
    assert first == pick_uncertain(list(reversed(candidates)), policy, 10, seed=3)
    # Ties (same score) go by content hash, as in the platform: "img-0" < "img-14" < ... < "img-7".
    assert first[:6] == [0, 14, 21, 28, 35, 7]
    assert len(first) == len(set(first)) == 10


def test_uncertain_pick_fills_with_a_seeded_draw_of_the_unflagged() -> None:
    flagged = [_c(1, 0.5), _c(2, 0.55)]
    confident = [_c(i, 0.99) for i in range(10, 30)] + [_c(30)]  # 30: no box, also confident
    policy = SelectionPolicy(strategy="margin", control_rate=0.0)
    picked = pick_uncertain(flagged + confident, policy, 6, seed=7)
    assert picked[:2] == [1, 2]
    assert len(picked) == len(set(picked)) == 6
    assert set(picked[2:]) <= {c.image_id for c in confident}
    assert picked == pick_uncertain(flagged + confident, policy, 6, seed=7)
    others = [pick_uncertain(flagged + confident, policy, 6, seed=s)[2:] for s in range(8, 12)]
    assert any(fill != picked[2:] for fill in others)


def test_uncertain_pick_never_asks_for_more_than_there_is() -> None:
    policy = SelectionPolicy(control_rate=0.0)
    assert sorted(pick_uncertain([_c(1, 0.5), _c(2, 0.99)], policy, 5, seed=0)) == [1, 2]
    assert pick_uncertain([_c(1, 0.5)], policy, 0, seed=0) == []


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
    assert args.cycles == 3 and args.scenes == 10 and args.initial == 8
    assert args.seeds == [0, 1, 2]
    full = parse_args([])
    assert (full.cycles, full.scenes, full.frames, full.initial, full.per_cycle) == (
        4,
        100,
        5,
        24,
        16,
    )
    assert full.seeds == [0, 1, 2] and "random" not in full.strategies
    assert set(full.strategies) >= {"margin", "entropy"}
    with pytest.raises(SystemExit):
        parse_args(["--initial", "5000"])


def test_strategies_and_policy_tunables_parse() -> None:
    args = parse_args(["--strategies", "margin,random", "--policy", "shortlist_factor=3"])
    assert args.strategies == ["margin"]  # random always runs, as the baseline
    assert args.policy == {"shortlist_factor": 3}
    with pytest.raises(SystemExit):
        parse_args(["--strategies", "no_such_strategy"])
    with pytest.raises(SystemExit):
        parse_args(["--policy", "novalue"])


# --- scenes, frames and the initial set ---------------------------------------------------


def test_test_scenes_are_disjoint_from_pool_scenes() -> None:
    kinds = ["dark", "blur", "cast"]
    pool, test = build_frames(20, 4, 10, 0.6, kinds, seed=3)
    assert len(pool) == 80 and len(test) == 10
    assert {f.scene for f in pool}.isdisjoint({f.scene for f in test})
    assert len({f.scene for f in test}) == 10  # one frame per test scene
    # Frames of a scene share its condition; every scene has all its frames.
    by_scene: dict[int, set[str]] = {}
    for f in pool:
        by_scene.setdefault(f.scene, set()).add(f.condition)
    assert all(len(c) == 1 for c in by_scene.values()) and len(by_scene) == 20
    assert sorted(f.frame for f in pool if f.scene == 7) == [0, 1, 2, 3]
    # Both sets follow the same mixture.
    assert sum(next(iter(c)) != EASY for c in by_scene.values()) == 12
    assert sum(f.condition != EASY for f in test) == 6
    assert (pool, test) == build_frames(20, 4, 10, 0.6, kinds, seed=3)
    assert pool != build_frames(20, 4, 10, 0.6, kinds, seed=4)[0]


def test_initial_labels_come_from_clean_scenes_once_each() -> None:
    pool = [Frame(s, f, EASY if s % 2 else "dark") for s in range(10) for f in range(3)]
    ids = initial_pick(pool, 12, seed=1)
    assert len(ids) == len(set(ids)) == 12
    assert all(pool[i].condition == EASY for i in ids)
    assert ids == initial_pick(pool, 12, seed=1)
    assert any(pool[i].condition != EASY for i in initial_pick(pool, 20, 1, clean_only=False))
    with pytest.raises(ValueError):
        initial_pick(pool, 16, seed=1)  # only 15 clean frames


def test_no_image_is_labelled_twice_over_cycles() -> None:
    pool = LabelPool(50, random_pick(range(50), 10, seed=0))
    for cycle in range(1, 5):
        pool.add(random_pick(pool.unlabelled(), 10, seed=cycle))
    assert len(pool.labelled) == len(set(pool.labelled)) == 50
    assert pool.unlabelled() == []
    with pytest.raises(ValueError):
        pool.add([3])


def test_split_boxes_shows_what_clears_the_display_threshold() -> None:
    classes = [0, 1, 2, 1, 3]
    confs = [0.9, 0.1, 0.25, 0.02, 0.24]
    xyxyn = [[0.1, 0.1, 0.2, 0.2]] * 5
    shown, below = split_boxes(classes, confs, xyxyn, 0.25, max_below=2)
    assert shown == [(0, 0.9, 0.1, 0.1, 0.2, 0.2), (2, 0.25, 0.1, 0.1, 0.2, 0.2)]
    assert below == [(3, 0.24), (1, 0.1)]  # most confident first, capped
    assert split_boxes([], [], [], 0.25) == ([], [])


# --- aggregation over seeds ---------------------------------------------------------------


def test_median_and_spread_over_seeds() -> None:
    s = over_seeds([0.5, 0.3, 0.4])
    assert (s.median, s.low, s.high, s.n) == (0.4, 0.3, 0.5, 3)
    assert s.spread == pytest.approx(0.2)
    never = over_seeds([80.0, math.inf, 100.0])
    assert never.median == 100.0 and math.isinf(never.spread)
    with pytest.raises(ValueError):
        over_seeds([])


def test_curves_aggregate_cycle_by_cycle() -> None:
    curves = [[(10, 0.1), (20, 0.3)], [(10, 0.2), (20, 0.5)], [(10, 0.3)]]
    agg = curve_over_seeds(curves)
    assert [a.median for a in agg] == [0.2, 0.4]
    assert [a.n for a in agg] == [3, 2]
    assert agg[1].spread == pytest.approx(0.2)


def test_verdict_takes_the_median_of_per_seed_savings() -> None:
    random = [[(20, 0.1), (40, 0.2), (60, 0.3), (80, 0.4)] for _ in range(3)]
    strategy = [
        [(20, 0.1), (40, 0.4), (60, 0.5), (80, 0.6)],  # reaches 0.4 at 33.3 labels
        [(20, 0.1), (40, 0.38), (60, 0.5), (80, 0.5)],  # at 43.3
        [(20, 0.1), (40, 0.2), (60, 0.3), (80, 0.35)],  # never
    ]
    v = verdict("hybrid", strategy, random)
    assert v.labels.median == pytest.approx(43.333, abs=1e-3)
    assert math.isinf(v.labels.high)  # one seed never got there: the spread is unbounded
    assert v.share.median == pytest.approx(43.333 / 80, abs=1e-4)
    assert v.saves_enough
    # The strategy's median is ahead of random's at every cycle: never behind.
    assert v.never_behind and v.met


def test_verdict_fails_when_behind_by_more_than_the_spread() -> None:
    tail = [(60, 0.35), (80, 0.4), (100, 0.45)]
    random = [[(20, 0.1), (40, 0.30), *tail], [(20, 0.1), (40, 0.31), *tail]]
    late = [(60, 0.5), (80, 0.6), (100, 0.6)]
    strategy = [[(20, 0.1), (40, 0.1), *late], [(20, 0.1), (40, 0.12), *late]]
    v = verdict("x", strategy, random)
    assert v.share.median == pytest.approx(0.574, abs=0.001)  # 57.5 and 57.4 labels of 100
    assert v.saves_enough and not v.never_behind and not v.met
    assert v.worst_cycle == 1
    assert v.worst_gap == pytest.approx((0.305 - 0.11) - 0.02)
    v = verdict("same", random, random)
    assert v.never_behind and v.share.median == 1.0 and not v.met


def test_no_verdict_when_random_never_improved() -> None:
    flat = [[(10, 0.0), (20, 0.0), (30, 0.0)]] * 3
    v = verdict("x", flat, flat)
    assert not v.comparable and not v.met
    assert v.labels.median == 10.0  # "reached" at the start: meaningless, hence no verdict


def test_paired_gaps_compare_within_a_seed() -> None:
    random = [[(10, 0.1), (20, 0.3)], [(10, 0.5), (20, 0.6)], [(10, 0.2), (20, 0.2)]]
    strategy = [[(10, 0.1), (20, 0.4)], [(10, 0.5), (20, 0.65)], [(10, 0.2), (20, 0.1)]]
    gaps = paired_gaps(strategy, random)
    assert [g.median for g in gaps] == [0.0, pytest.approx(0.05)]
    assert gaps[1].low == pytest.approx(-0.1) and gaps[1].high == pytest.approx(0.1)


def test_results_print_without_training(capsys: pytest.CaptureFixture[str]) -> None:
    def run(name: str, seed: int, values: list[float]) -> StrategyRun:
        points = [
            Point(24 + 16 * i, {"mAP50-95": v, "mAP50": min(1.0, 2 * v)}, picked=16 * i)
            for i, v in enumerate(values)
        ]
        return StrategyRun(name, seed, points)

    runs = {
        "random": [run("random", s, [0.2, 0.3 + s / 20, 0.4]) for s in range(3)],
        "hybrid": [run("hybrid", s, [0.2, 0.4, 0.5 - s / 10]) for s in range(3)],
    }
    verdicts = {
        "hybrid": verdict(
            "hybrid", [r.curve() for r in runs["hybrid"]], [r.curve() for r in runs["random"]]
        )
    }
    results = {
        "config": {"seeds": [0, 1, 2]},
        "_runs": runs,
        "_verdicts": verdicts,
        "pool_shares": [{"hard": 0.6, "blind": 0.3}] * 3,
        "initial_s": [{"wall": 1.0, "cpu": 1.0}] * 3,
        "total_s": 3.0,
    }
    print_results(results)
    out = capsys.readouterr().out
    assert "labels to reach random's final mAP50-95" in out
    assert "strategy minus random" in out and "hybrid" in out
