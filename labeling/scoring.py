"""The parts an image's review score is made of: pure numpy, no model, no servers.

Each part answers one question about an image the champion has predicted on:

- ``batch_uncertainty`` / ``image_uncertainty``: is the detector unsure about some box, counting
  the candidates it did not show (what it *almost* saw)? Weighted by how weak the box's class is.
- ``flip_disagreement``: does the detector find the same boxes in the mirrored image?
- ``novelty`` / ``novelty_part``: how far is the image from everything the champion was
  trained on?
- ``class_weights_from_ap``: which classes the champion is weak at or has seen little of.

``labeling.selection``'s "hybrid" strategy combines them; each part is stored with the queued
item (``score_parts``) so a reviewer can see why it was asked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from visionloop.boxes import greedy_pairs, iou_matrix

MAX_CLASS_WEIGHT = 3.0
"""Upper bound of a class weight: a weak class should lead the queue, not own it."""
NOVELTY_QUANTILE = 0.95
"""Training images' own nearest-neighbour distances up to this quantile count as "not novel"."""
OVERLAPPING = float(np.nextafter(0.0, 1.0))
"""Flip pairs match on any overlap at all: a box that moved is partly agreed with."""
NOVELTY_CHUNK_CELLS = 8_000_000
"""Similarity cells computed at once by ``novelty`` (32 MB of float32): bounds its memory."""


# --- uncertainty over every candidate box -----------------------------------------------------


def box_uncertainty(conf: np.ndarray) -> np.ndarray:
    """Binary entropy (bits) of each box's confidence, in [0, 1].

    Entropy rather than a distance to the display threshold: it needs no threshold (the
    display threshold lives with the predictor), peaks at a coin flip and still gives a box
    at 0.1 a good part (0.47) of the peak, so a candidate just under the display threshold
    counts while the 0.01 noise every image has barely does (0.08).
    """
    p = np.clip(np.asarray(conf, np.float64), 1e-12, 1.0 - 1e-12)
    h = -(p * np.log2(p) + (1.0 - p) * np.log2(1.0 - p))
    return np.where((p <= 1e-12) | (p >= 1.0 - 1e-12), 0.0, h)


class Uncertainty(NamedTuple):
    """Per image: the score and the box that decided it (``confidence`` is NaN without boxes)."""

    score: np.ndarray
    confidence: np.ndarray
    class_weight: np.ndarray


def batch_uncertainty(
    conf: np.ndarray,
    cls: np.ndarray,
    owner: np.ndarray,
    n_images: int,
    class_weights: Mapping[int, float] | None = None,
) -> Uncertainty:
    """Each image's most uncertain candidate box, weighted by its class: ``max w(cls) h(conf)``.

    ``conf``, ``cls`` and ``owner`` (the image's index, 0..n_images-1) describe every candidate
    box of the batch, shown and sub-threshold alike, flattened: one pass over 100k images.
    An image whose shown boxes are all clear-cut but which has a candidate just under the
    display threshold scores as uncertain (that candidate is what a drifted model "almost
    saw"); an image with no candidate at all scores 0 here (the novelty part judges it).

    The maximum, not a sum: any image carries dozens of near-zero candidates, whose sum
    would rank cluttered images first whatever the model believes about them. A class
    without a weight (or ``cls`` -1, unknown) weighs 1.
    """
    conf = np.asarray(conf, np.float64)
    cls = np.asarray(cls, np.int64)
    owner = np.asarray(owner, np.int64)
    weight = np.ones(len(conf))
    if class_weights and len(conf):
        known = {int(k): float(v) for k, v in class_weights.items() if int(k) >= 0}
        if known:
            table = np.ones(max(max(known), int(cls.max(initial=0))) + 1)
            for k, v in known.items():
                table[k] = v
            weight = np.where(cls >= 0, table[np.clip(cls, 0, None)], 1.0)
    contribution = box_uncertainty(conf) * weight
    score = np.zeros(n_images)
    confidence = np.full(n_images, np.nan)
    class_weight = np.ones(n_images)
    if len(conf):
        # Per image, its largest contribution first: the first row of each image decides.
        order = np.lexsort((-contribution, owner))
        first = np.unique(owner[order], return_index=True)[1]
        decided = order[first]
        images = owner[decided]
        score[images] = contribution[decided]
        confidence[images] = conf[decided]
        class_weight[images] = weight[decided]
    return Uncertainty(score, confidence, class_weight)


def image_uncertainty(
    shown: Iterable[tuple[int, float]],
    below: Iterable[tuple[int, float]] = (),
    class_weights: Mapping[int, float] | None = None,
) -> tuple[float, float | None, float]:
    """``batch_uncertainty`` of one image from ``(cls, conf)`` pairs: (score, deciding
    confidence or None, its class weight)."""
    boxes = [*shown, *below]
    result = batch_uncertainty(
        np.array([c for _, c in boxes], np.float64),
        np.array([k for k, _ in boxes], np.int64),
        np.zeros(len(boxes), np.int64),
        1,
        class_weights,
    )
    confidence = float(result.confidence[0])
    return (
        float(result.score[0]),
        None if np.isnan(confidence) else confidence,
        float(result.class_weight[0]),
    )


# --- consistency under a horizontal flip ------------------------------------------------------


def flip_disagreement(
    boxes: Sequence[Sequence[float]], flipped_boxes: Sequence[Sequence[float]]
) -> float:
    """How much the detector's boxes on the mirrored image disagree with those on the image.

    Both sets are ``(cls, conf, x1, y1, x2, y2)`` normalised, the flipped ones already mapped
    back into the original frame. A detector that understands an object finds it in the
    mirror image too; one that guesses does not, so disagreement marks doubt that a single
    confidence hides (e.g. a confident box that vanishes when mirrored).

    Boxes are matched one to one within each class, best overlap first. A matched pair
    agrees with ``2 min(conf) IoU`` of its ``conf + conf'`` mass; an unmatched box agrees
    with none of its confidence. The result is ``1 - agreed / total mass``: 0 when both sets
    are identical (or both empty), 1 when nothing overlaps.
    """
    a = np.asarray(boxes, np.float64).reshape(-1, 6)
    b = np.asarray(flipped_boxes, np.float64).reshape(-1, 6)
    total = float(a[:, 1].sum() + b[:, 1].sum())
    if total <= 0.0:
        return 0.0
    agreed = 0.0
    for cls in np.union1d(a[:, 0], b[:, 0]):
        mine, theirs = a[a[:, 0] == cls], b[b[:, 0] == cls]
        if not len(mine) or not len(theirs):
            continue
        ious = iou_matrix(mine[:, 2:], theirs[:, 2:])
        for i, j, iou in greedy_pairs(ious, min_iou=OVERLAPPING):
            agreed += 2.0 * min(mine[i, 1], theirs[j, 1]) * iou
    return float(np.clip(1.0 - agreed / total, 0.0, 1.0))


# --- novelty against the champion's training images -------------------------------------------


def novelty(
    embeddings: np.ndarray,
    reference: np.ndarray | None,
    *,
    exclude_self: bool = False,
) -> np.ndarray | None:
    """Cosine distance of each embedding to its nearest reference embedding, ``(n,)``.

    Both are L2-normalised rows (float32), so the distance is ``1 - max dot``: one float32
    matrix product per chunk of rows, sized so a chunk's similarities stay within
    ``NOVELTY_CHUNK_CELLS`` (100k images against 5k references: 32 MB at a time, not 2 GB).
    ``exclude_self`` (``embeddings`` *is* ``reference``): each row's own match is ignored,
    giving the leave-one-out distances that calibrate ``novelty_part``.

    None without a reference (no training images known): there is nothing to be novel to.
    """
    if reference is None or len(reference) == 0:
        return None
    queries = np.asarray(embeddings, np.float32)
    ref = np.asarray(reference, np.float32)
    out = np.empty(len(queries), np.float32)
    step = max(1, NOVELTY_CHUNK_CELLS // len(ref))
    for start in range(0, len(queries), step):
        sims = queries[start : start + step] @ ref.T
        if exclude_self:
            rows = np.arange(len(sims))
            sims[rows, start + rows] = -np.inf
        out[start : start + step] = sims.max(axis=1)
    return np.clip(1.0 - out, 0.0, 2.0)


def neighbour_distances(reference: np.ndarray | None) -> np.ndarray:
    """Each training image's distance to its nearest *other* training image (empty with
    fewer than two): the scale of the features' distances.

    That scale differs a lot between models: pooled features of a detector share a large
    common component, so unrelated images of one model can be 0.003 apart and those of
    another 0.03. Thresholds on distances are therefore set relative to it.
    """
    if reference is None or len(reference) < 2:
        return np.empty(0, np.float32)
    distances = novelty(reference, reference, exclude_self=True)
    assert distances is not None
    return distances


def novelty_scale(reference: np.ndarray | None, quantile: float = NOVELTY_QUANTILE) -> float:
    """How far a training image lies from its nearest other one, at most: the ``quantile``
    of ``neighbour_distances``. An image no farther than that from the training set looks
    like the training set. 0 with fewer than two references."""
    distances = neighbour_distances(reference)
    return float(np.quantile(distances, quantile)) if len(distances) else 0.0


def novelty_part(distance: np.ndarray, scale: float) -> np.ndarray:
    """``max(0, 1 - scale / distance)``: 0 for an image as close to the training set as
    training images are to each other, rising towards 1 as it lies many times farther.

    A hinge rather than a rank within the batch: in a batch without anything new, no image
    should gain from being the least ordinary of ordinary images. Without a scale (fewer
    than two training images) the distance itself, clipped to [0, 1].
    """
    distance = np.asarray(distance, np.float64)
    if scale <= 0.0:
        # Fewer than two training images: nothing to calibrate with, the raw distance.
        return np.clip(distance, 0.0, 1.0)
    return np.clip(1.0 - scale / np.maximum(distance, 1e-12), 0.0, 1.0)


# --- class weights from the last evaluation ---------------------------------------------------


def _ap(metrics: Mapping[str, float]) -> float | None:
    """A class's AP from an evaluation's per-class entry (``training.evaluation`` writes
    ``AP50-95`` and ``AP50``; snake-case spellings are read too)."""
    for key in ("AP50-95", "ap50_95", "AP50", "ap50"):
        if key in metrics:
            return float(metrics[key])
    return None


def class_weights_from_ap(
    per_class: Mapping[str, Mapping[str, float]],
    class_names: Sequence[str],
    *,
    max_weight: float = MAX_CLASS_WEIGHT,
) -> dict[int, float]:
    """Class id -> weight in ``[1, max_weight]``: weak classes (low AP) and rare classes (few
    instances in the evaluation) weigh more, so their doubtful boxes outrank the same doubt
    about a class the model already does well.

    ``weakness = 1 - AP`` and ``rarity = 1 - log(1 + n) / log(1 + n_max)`` (0 for the most
    frequent class, 1 for one never seen), averaged: ``w = 1 + (max_weight - 1) *
    (weakness + rarity) / 2``. A class missing from the evaluation (no ground truth in the
    held-out set, so nothing is known about it) is weakest and rarest: ``max_weight``.
    Without any evaluation every class weighs 1 (an empty dict).
    """
    if not per_class:
        return {}
    counts = [float(m.get("instances", 0.0)) for m in per_class.values()]
    most = max(max(counts, default=0.0), 1.0)
    weights: dict[int, float] = {}
    for cls, name in enumerate(class_names):
        metrics = per_class.get(name)
        ap = _ap(metrics) if metrics is not None else None
        if metrics is None or ap is None:
            weights[cls] = max_weight
            continue
        weakness = 1.0 - min(max(ap, 0.0), 1.0)
        instances = max(float(metrics.get("instances", 0.0)), 0.0)
        rarity = 1.0 - np.log1p(instances) / np.log1p(most)
        weights[cls] = float(1.0 + (max_weight - 1.0) * (weakness + rarity) / 2.0)
    return weights
