"""How sure a verdict is: a paired bootstrap interval of the mAP50-95 difference.

On a held-out set of a few images, which images happened to be drawn moves mAP as much as a
better model does. Resampling the images with replacement, the same resample for both models
(they saw the same images, so their errors are paired), shows how far the difference between
them would move with another draw of the same size. mAP of a resample is ultralytics' own
``ap_per_class`` over the per-image statistics its validator recorded, so the full-set point
estimate is exactly the figure ``model.val`` reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
DEFAULT_SEED = 0  # fixed: the same evaluation gives the same interval on every run


@dataclass(frozen=True)
class ImageStats:
    """One image as the validator matched it: per prediction, whether it is a true positive at
    each of the ten IoU thresholds 0.5:0.95, its confidence and class; the image's true classes."""

    tp: np.ndarray  # (predictions, 10) bool
    conf: np.ndarray  # (predictions,)
    pred_cls: np.ndarray  # (predictions,)
    target_cls: np.ndarray  # (ground-truth boxes,)


@dataclass(frozen=True)
class DifferenceInterval:
    """mAP50-95(challenger) - mAP50-95(champion) on the full set, and its bootstrap interval."""

    difference: float
    low: float
    high: float
    level: float
    resamples: int
    images: int
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def map50_95(images: Sequence[ImageStats]) -> float:
    """mAP50-95 over ``images`` as ultralytics computes it (mean AP of the classes that have
    ground truth among them; 0 when none has)."""
    from ultralytics.utils.metrics import ap_per_class

    targets = np.concatenate([i.target_cls for i in images]) if images else np.zeros(0)
    if not len(targets):
        return 0.0
    ap = ap_per_class(
        np.concatenate([i.tp for i in images]),
        np.concatenate([i.conf for i in images]),
        np.concatenate([i.pred_cls for i in images]),
        targets,
    )[5]
    return float(ap.mean()) if len(ap) else 0.0


def paired_interval(
    champion: Sequence[ImageStats],
    challenger: Sequence[ImageStats],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = DEFAULT_SEED,
) -> DifferenceInterval:
    """The percentile interval of the mAP50-95 difference over ``resamples`` paired resamples
    of the images; ``champion[i]`` and ``challenger[i]`` must be the same image."""
    if len(champion) != len(challenger):
        raise ValueError(
            f"paired bootstrap needs the same images for both models, got {len(champion)} "
            f"and {len(challenger)}"
        )
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"need 0 < level < 1 and resamples >= 1, got {level} and {resamples}")
    n = len(champion)
    difference = map50_95(challenger) - map50_95(champion)
    if n == 0:
        return DifferenceInterval(0.0, 0.0, 0.0, level, resamples, 0, seed)
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for r in range(resamples):
        pick = rng.integers(0, n, n)
        draws[r] = map50_95([challenger[i] for i in pick]) - map50_95([champion[i] for i in pick])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return DifferenceInterval(
        round(difference, 6), round(float(low), 6), round(float(high), 6), level, resamples, n, seed
    )


def image_map(image: ImageStats) -> float:
    """One image's own mAP50-95: which images the two models disagree on most."""
    return map50_95([image])
