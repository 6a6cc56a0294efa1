"""The paired bootstrap interval of the mAP50-95 difference, on per-image statistics built by
hand."""

from __future__ import annotations

import numpy as np
import pytest

from training.interval import ImageStats, map50_95, paired_interval


def _image(found: int, targets: int = 2, misses: int = 1, cls: int = 0) -> ImageStats:
    """An image with ``targets`` true boxes of which ``found`` are detected at every IoU
    threshold, plus ``misses`` low-confidence false positives."""
    n = found + misses
    tp = np.zeros((n, 10), dtype=bool)
    tp[:found] = True
    conf = np.concatenate([np.full(found, 0.9), np.full(misses, 0.1)])
    return ImageStats(tp, conf, np.full(n, float(cls)), np.full(targets, float(cls)))


def test_a_known_difference_lies_in_its_interval_and_the_point_is_the_full_set_figure() -> None:
    # The champion finds one of two boxes on every image, the challenger both on two images
    # in three: better, by an amount that depends on which images are drawn.
    champion = [_image(1, cls=i % 2) for i in range(30)]
    challenger = [_image(1 if i % 3 == 0 else 2, cls=i % 2) for i in range(30)]
    interval = paired_interval(champion, challenger, resamples=200)
    known = map50_95(challenger) - map50_95(champion)
    assert known > 0.1
    assert interval.difference == pytest.approx(known, abs=1e-6)
    assert interval.low < known < interval.high and interval.low > 0
    assert (interval.images, interval.resamples, interval.level) == (30, 200, 0.95)


def test_identical_models_give_an_interval_around_zero() -> None:
    rng = np.random.default_rng(3)
    images = [
        _image(int(rng.integers(0, 3)), targets=2, cls=int(rng.integers(0, 3))) for _ in range(25)
    ]
    interval = paired_interval(images, images, resamples=200)
    # Paired: each resample draws the same images for both, so the difference is exactly 0.
    assert interval.difference == interval.low == interval.high == 0.0


def test_two_equally_good_models_that_err_on_different_images_cannot_be_told_apart() -> None:
    # Each model misses a box on the images the other gets fully: no systematic difference.
    champion = [_image(1 if i % 2 else 2) for i in range(40)]
    challenger = [_image(2 if i % 2 else 1) for i in range(40)]
    interval = paired_interval(champion, challenger, resamples=300)
    assert interval.difference == pytest.approx(0.0, abs=1e-9)
    assert interval.low < 0 < interval.high


def test_the_interval_is_reproducible_and_refuses_unpaired_images() -> None:
    champion = [_image(i % 3) for i in range(12)]
    challenger = [_image((i + 1) % 3) for i in range(12)]
    assert paired_interval(champion, challenger, resamples=100) == paired_interval(
        champion, challenger, resamples=100
    )
    with pytest.raises(ValueError, match="same images"):
        paired_interval(champion, challenger[:-1])
