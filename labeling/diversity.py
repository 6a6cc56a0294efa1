"""Keeping a review batch from asking the same question twice: pure numpy on embeddings.

Embeddings are L2-normalised rows (the champion's pooled features), so the distance between
two images is the cosine distance ``1 - a . b``: 0 for the same picture, about 1 for
unrelated ones.

- ``collapse_near_duplicates``: ten frames of one scene are one question; keep the
  highest-scored frame of each.
- ``k_center_greedy``: among the images worth asking, pick ``k`` that are far apart, each pick
  trading its score against its distance to those already picked.
"""

from __future__ import annotations

import numpy as np

CHUNK = 1024
"""Rows compared at once while collapsing: a (CHUNK, CHUNK) similarity block is 4 MB."""


def collapse_near_duplicates(
    embeddings: np.ndarray,
    max_distance: float,
    scores: np.ndarray | None = None,
    *,
    limit: int | None = None,
) -> np.ndarray:
    """Indices to keep, highest score first: each kept image is farther than ``max_distance``
    from every other kept one.

    Greedy in score order (ties by index): an image is dropped when it lies within
    ``max_distance`` of an image already kept, so each group of near-duplicates is
    represented by its highest-scored member. (Grouping is by the kept leader, not
    transitive: a chain of small steps can still keep its two far ends.)

    ``limit`` stops once that many are kept: the cost is then about ``n x limit`` products
    rather than ``n x n``, so a shortlist can be drawn from 100k images. Rows are compared
    in chunks against the kept set, then one by one within the chunk.
    """
    emb = np.asarray(embeddings, np.float32)
    n = len(emb)
    order = (
        np.arange(n)
        if scores is None
        else np.lexsort((np.arange(n), -np.asarray(scores, np.float64)))
    )
    cap = n if limit is None else max(0, min(limit, n))
    threshold = 1.0 - max_distance  # similarity at or above this: a near-duplicate
    kept: list[int] = []
    kept_rows = np.empty((0, emb.shape[1] if emb.ndim == 2 else 0), np.float32)
    for start in range(0, n, CHUNK):
        if len(kept) >= cap:
            break
        block = order[start : start + CHUNK]
        rows = emb[block]
        alive = np.ones(len(block), bool)
        if len(kept_rows):
            alive &= (rows @ kept_rows.T).max(axis=1) < threshold
        sims = rows @ rows.T
        new: list[int] = []
        for i in range(len(block)):
            if not alive[i]:
                continue
            new.append(i)
            if len(kept) + len(new) >= cap:
                break
            alive[i + 1 :] &= sims[i, i + 1 :] < threshold
        kept.extend(int(block[i]) for i in new)
        kept_rows = np.vstack([kept_rows, rows[new]])
    return np.asarray(kept, np.int64)


def k_center_greedy(
    embeddings: np.ndarray,
    scores: np.ndarray,
    k: int,
    *,
    diversity: float = 1.0,
    initial: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``k`` indices picked for score and spread, in pick order, with each pick's distance to
    the nearest earlier pick (or labelled image, with ``initial``; else the first one's is 1:
    nothing earlier).

    The first pick is the highest score. Every next pick maximises
    ``score * distance ** diversity``, ``distance`` being the cosine distance to the nearest
    image picked so far: k-center greedy (farthest-first traversal) weighted by the score.
    ``diversity`` 0 is plain score order, 1 values an image twice as far from the batch as
    much as one twice as uncertain, higher values spread the batch at the cost of score.
    An image identical to a picked one (distance 0) is picked only when nothing else is
    left with a positive value. Ties go to the lower index.

    ``initial``: each image's distance to images labelled already (e.g. its nearest training
    image): the batch then spreads away from those too, as a core-set does, and even the
    first pick weighs score by that distance.
    """
    emb = np.asarray(embeddings, np.float32)
    score = np.asarray(scores, np.float64)
    n = len(emb)
    k = max(0, min(k, n))
    picked: list[int] = []
    distances: list[float] = []
    if k == 0:
        return np.empty(0, np.int64), np.empty(0)
    nearest = np.full(n, np.inf) if initial is None else np.asarray(initial, np.float64).copy()
    available = np.ones(n, bool)
    for _ in range(k):
        if picked or initial is not None:
            spread = np.clip(nearest, 0.0, 2.0) ** diversity
            value = np.where(available, score * spread, -np.inf)
            best = int(np.argmax(value))
            if value[best] <= 0.0:
                # Nothing left adds anything: fall back to score order among the rest.
                best = int(np.argmax(np.where(available, score, -np.inf)))
            distances.append(float(nearest[best]))
        else:
            best = int(np.argmax(score))
            distances.append(1.0)
        picked.append(best)
        available[best] = False
        nearest = np.minimum(nearest, 1.0 - emb @ emb[best])
    return np.asarray(picked, np.int64), np.asarray(distances)
