"""Score parts and batch diversity on crafted cases (pure numpy, no servers)."""

from __future__ import annotations

import numpy as np
import pytest

from labeling import scoring
from labeling.diversity import collapse_near_duplicates, k_center_greedy
from labeling.scoring import (
    MAX_CLASS_WEIGHT,
    batch_uncertainty,
    class_weights_from_ap,
    flip_disagreement,
    image_uncertainty,
    novelty,
    novelty_part,
    novelty_scale,
)


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _near(base: np.ndarray, count: int, noise: float, seed: int) -> np.ndarray:
    """``count`` frames of one scene: ``base`` plus a little noise, normalised."""
    rng = np.random.default_rng(seed)
    return _unit(base + noise * rng.standard_normal((count, len(base))).astype(np.float32))


# --- uncertainty over every candidate box -----------------------------------------------------


def test_no_shown_box_but_candidates_just_under_the_threshold_scores_uncertain() -> None:
    # A drifted champion shows nothing, but it almost saw a scratch at 0.2.
    almost, conf, _ = image_uncertainty(shown=[], below=[(0, 0.2), (1, 0.03)])
    clear, _, _ = image_uncertainty(shown=[(0, 0.97), (1, 0.95)], below=[(0, 0.01)])
    nothing, none_conf, _ = image_uncertainty(shown=[], below=[])
    assert almost > 0.7 and conf == pytest.approx(0.2)  # the candidate that decided
    assert almost > 2 * clear
    # No candidate at all: nothing to be unsure about here (novelty judges such images).
    assert nothing == 0.0 and none_conf is None


def test_uncertainty_takes_the_most_doubtful_box_not_the_clutter() -> None:
    """Dozens of 0.01 candidates (every image has them) do not add up to one coin flip."""
    clutter, _, _ = image_uncertainty(shown=[], below=[(0, 0.01)] * 32)
    coin_flip, conf, _ = image_uncertainty(shown=[(0, 0.5)])
    assert coin_flip == pytest.approx(1.0) and conf == 0.5
    assert clutter < 0.1


def test_weak_class_boxes_weigh_more() -> None:
    weights = {0: 1.0, 2: 2.5}
    strong, _, w_strong = image_uncertainty([(0, 0.6)], class_weights=weights)
    weak, _, w_weak = image_uncertainty([(2, 0.6)], class_weights=weights)
    unknown, _, w_unknown = image_uncertainty([(7, 0.6)], class_weights=weights)
    assert (w_strong, w_weak, w_unknown) == (1.0, 2.5, 1.0)
    assert weak == pytest.approx(2.5 * strong) and unknown == pytest.approx(strong)
    # The weight can promote a less doubtful box of a weak class over a doubtful strong one.
    score, conf, _ = image_uncertainty([(0, 0.5), (2, 0.85)], class_weights=weights)
    assert conf == 0.85 and score > 1.0


def test_batch_uncertainty_scores_each_image_on_its_own_boxes() -> None:
    images = [[(0, 0.5)], [], [(1, 0.9), (0, 0.15)], [(1, 0.99)]]
    conf = np.array([c for boxes in images for _, c in boxes])
    cls = np.array([k for boxes in images for k, _ in boxes])
    owner = np.array([i for i, boxes in enumerate(images) for _ in boxes])
    result = batch_uncertainty(conf, cls, owner, len(images), {1: 2.0})
    for i, boxes in enumerate(images):
        score, decided, weight = image_uncertainty(boxes, class_weights={1: 2.0})
        assert result.score[i] == pytest.approx(score)
        assert result.class_weight[i] == weight
        assert (np.isnan(result.confidence[i]) and decided is None) or (
            result.confidence[i] == pytest.approx(decided)
        )


# --- flip consistency -------------------------------------------------------------------------


def test_flip_disagreement_is_zero_for_identical_and_one_for_disjoint_boxes() -> None:
    boxes = [(0, 0.9, 0.1, 0.1, 0.3, 0.3), (1, 0.6, 0.5, 0.5, 0.8, 0.9)]
    assert flip_disagreement(boxes, boxes) == pytest.approx(0.0)
    assert flip_disagreement(boxes, list(reversed(boxes))) == pytest.approx(0.0)
    elsewhere = [(0, 0.9, 0.6, 0.0, 0.7, 0.1)]
    assert flip_disagreement(boxes, elsewhere) == pytest.approx(1.0)
    # The same place but another class is no agreement either.
    assert flip_disagreement([boxes[0]], [(1, *boxes[0][1:])]) == pytest.approx(1.0)
    assert flip_disagreement([], []) == 0.0
    assert flip_disagreement(boxes, []) == pytest.approx(1.0)


def test_flip_disagreement_weighs_boxes_by_confidence_and_overlap() -> None:
    strong = (0, 0.9, 0.1, 0.1, 0.3, 0.3)
    weak = (1, 0.3, 0.6, 0.6, 0.8, 0.8)
    # Losing the weak box in the mirror costs less than losing the strong one.
    lost_weak = flip_disagreement([strong, weak], [strong])
    lost_strong = flip_disagreement([strong, weak], [weak])
    assert 0.0 < lost_weak < lost_strong < 1.0
    # A box that shifts a little agrees partly; one that shifts a lot agrees less.
    shifted = flip_disagreement([strong], [(0, 0.9, 0.12, 0.1, 0.32, 0.3)])
    moved = flip_disagreement([strong], [(0, 0.9, 0.2, 0.1, 0.4, 0.3)])
    assert 0.0 < shifted < moved < 1.0
    # The same box found with much less confidence is doubt too.
    assert flip_disagreement([strong], [(0, 0.3, 0.1, 0.1, 0.3, 0.3)]) == pytest.approx(0.5)


# --- novelty ----------------------------------------------------------------------------------


def test_novelty_is_the_cosine_distance_to_the_nearest_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(0)
    queries = _unit(rng.standard_normal((37, 16)))
    reference = _unit(rng.standard_normal((11, 16)))
    brute = 1.0 - (queries @ reference.T).max(axis=1)
    assert novelty(queries, reference) == pytest.approx(brute, abs=1e-5)
    # Chunking (a few rows at a time) changes nothing.
    monkeypatch.setattr(scoring, "NOVELTY_CHUNK_CELLS", 30)
    assert novelty(queries, reference) == pytest.approx(brute, abs=1e-5)
    # Leave-one-out: a reference row's own match does not count.
    own = novelty(reference, reference, exclude_self=True)
    sims = reference @ reference.T
    np.fill_diagonal(sims, -np.inf)
    assert own == pytest.approx(1.0 - sims.max(axis=1), abs=1e-5)
    assert scoring.neighbour_distances(reference) == pytest.approx(own)
    assert len(scoring.neighbour_distances(reference[:1])) == 0
    assert novelty_scale(reference[:1]) == 0.0
    assert novelty(queries, None) is None
    assert novelty(queries, np.empty((0, 16), np.float32)) is None


def test_an_image_unlike_the_training_set_scores_novel_and_ordinary_ones_do_not() -> None:
    rng = np.random.default_rng(1)
    # Training images: frames around three scenes; new images: the same scenes and one
    # lit in a way training never saw (another direction of the feature space).
    scenes = _unit(rng.standard_normal((3, 64)))
    reference = np.vstack([_near(s, 40, 0.05, seed=i) for i, s in enumerate(scenes)])
    ordinary = np.vstack([_near(s, 5, 0.05, seed=10 + i) for i, s in enumerate(scenes)])
    unseen = _near(_unit(rng.standard_normal((1, 64)))[0], 3, 0.05, seed=20)
    scale = novelty_scale(reference)
    part_ordinary = novelty_part(novelty(ordinary, reference), scale)
    part_unseen = novelty_part(novelty(unseen, reference), scale)
    assert part_ordinary.max() < 0.3
    assert part_unseen.min() > 0.8
    assert novelty_part(np.array([0.0, scale, 2 * scale]), scale) == pytest.approx([0.0, 0.0, 0.5])


# --- class weights ----------------------------------------------------------------------------


def test_rare_and_weak_classes_weigh_more_within_bounds() -> None:
    # As training.evaluation stores it (RetrainingRun.metrics[...]["per_class"]).
    per_class = {
        "scratch": {"AP50": 0.99, "AP50-95": 0.9, "instances": 400},
        "dent": {"AP50": 0.6, "AP50-95": 0.3, "instances": 400},
        "stain": {"AP50": 0.99, "AP50-95": 0.9, "instances": 12},
    }
    weights = class_weights_from_ap(per_class, ["scratch", "dent", "stain", "crack"])
    assert set(weights) == {0, 1, 2, 3}
    assert weights[1] > weights[0]  # weak
    assert weights[2] > weights[0]  # rare
    assert weights[3] == MAX_CLASS_WEIGHT  # never evaluated: weakest
    assert all(1.0 <= w <= MAX_CLASS_WEIGHT for w in weights.values())
    assert weights[0] == pytest.approx(1.1)  # strong and the most frequent: near 1
    # Snake-case keys read the same; no evaluation at all: everything weighs 1.
    snake = {
        name: {"ap50_95": m["AP50-95"], "instances": m["instances"]}
        for name, m in per_class.items()
    }
    assert class_weights_from_ap(snake, ["scratch", "dent", "stain"]) == pytest.approx(
        {k: weights[k] for k in (0, 1, 2)}
    )
    assert class_weights_from_ap({}, ["scratch"]) == {}


# --- diversity --------------------------------------------------------------------------------


def test_near_duplicates_collapse_onto_the_best_scored_frame() -> None:
    rng = np.random.default_rng(2)
    scene = _unit(rng.standard_normal((1, 64)))[0]
    frames = _near(scene, 10, 0.01, seed=3)  # ten frames of one scene
    others = _unit(rng.standard_normal((3, 64)))
    embeddings = np.vstack([frames, others])
    scores = np.array([0.5, 0.9, 0.4, 0.8, 0.7, 0.6, 0.3, 0.2, 0.1, 0.85, 0.05, 0.5, 0.3])
    keep = collapse_near_duplicates(embeddings, 0.05, scores)
    assert keep.tolist() == [1, 11, 12, 10]  # frame 1 (0.9) stands for all ten; best first
    # Far enough apart, nothing collapses; ``limit`` stops early.
    assert len(collapse_near_duplicates(embeddings, 0.0001, scores)) == 13
    assert collapse_near_duplicates(embeddings, 0.05, scores, limit=2).tolist() == [1, 11]


def test_collapse_holds_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    from labeling import diversity

    monkeypatch.setattr(diversity, "CHUNK", 4)
    rng = np.random.default_rng(4)
    scenes = _unit(rng.standard_normal((5, 32)))
    embeddings = np.vstack([_near(s, 6, 0.01, seed=i) for i, s in enumerate(scenes)])
    keep = collapse_near_duplicates(embeddings, 0.05)
    assert keep.tolist() == [0, 6, 12, 18, 24]  # one per scene, in index order


def test_k_center_greedy_trades_score_for_spread() -> None:
    rng = np.random.default_rng(5)
    scene = _unit(rng.standard_normal((1, 64)))[0]
    # Eight almost identical top scorers and four distinct images scoring a little lower.
    embeddings = np.vstack([_near(scene, 8, 0.03, seed=6), _unit(rng.standard_normal((4, 64)))])
    scores = np.array([1.0, 0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.8, 0.7, 0.6, 0.5])
    picked, distance = k_center_greedy(embeddings, scores, 4)
    assert picked[0] == 0 and distance[0] == 1.0  # seeded by the best score
    assert sorted(picked[1:].tolist()) == [8, 9, 10]  # spread beats a near-duplicate
    assert (distance[1:] > 0.5).all()
    # Diversity 0: plain score order.
    assert k_center_greedy(embeddings, scores, 4, diversity=0.0)[0].tolist() == [0, 1, 2, 3]
    # Asking for more than there is returns everything once.
    assert sorted(k_center_greedy(embeddings, scores, 50)[0].tolist()) == list(range(12))


def test_k_center_greedy_can_spread_away_from_labelled_images() -> None:
    rng = np.random.default_rng(7)
    embeddings = _unit(rng.standard_normal((6, 16)))
    scores = np.array([1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    # The best-scored image is (almost) labelled already: with ``initial`` it goes last.
    initial = np.array([1e-6, 1.0, 1.0, 1.0, 1.0, 1.0])
    plain, _ = k_center_greedy(embeddings, scores, 6)
    covered, distance = k_center_greedy(embeddings, scores, 6, initial=initial)
    assert plain[0] == 0 and covered[0] == 1 and covered[-1] == 0
    assert distance[-1] <= 1e-6
