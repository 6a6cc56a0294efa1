"""The synthetic defect generator: determinism, label sanity, drift knobs, YOLO layout."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from visionloop.synthetic import (
    DEFAULT_CLASS_NAMES,
    DriftParams,
    FrameJitter,
    SceneParams,
    SyntheticSample,
    apply_drift,
    encode_jpeg,
    generate_frame,
    generate_sample,
    iter_samples,
    write_yolo_dataset,
)

os.environ.setdefault("YOLO_OFFLINE", "1")


def _stack(samples: list[SyntheticSample]) -> np.ndarray:
    return np.stack([s.image for s in samples]).astype(np.float64)


def _laplacian_var(images: np.ndarray) -> float:
    grays = [cv2.cvtColor(im.astype(np.uint8), cv2.COLOR_RGB2GRAY) for im in images]
    return float(np.mean([cv2.Laplacian(g, cv2.CV_64F).var() for g in grays]))


def _high_freq_energy(images: np.ndarray) -> float:
    """Mean squared residual after a 3x3 box blur: what is left is pixel-scale detail."""
    return float(np.mean([np.mean((im - cv2.blur(im, (3, 3))) ** 2) for im in images]))


# --- determinism -------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes() -> None:
    drift = DriftParams(brightness=0.05, blur=0.8, noise=0.03, color_cast=(1.1, 1.0, 0.9))
    for index in range(5):
        a = generate_sample(index, seed=7, drift=drift)
        b = generate_sample(index, seed=7, drift=drift)
        assert a.image.tobytes() == b.image.tobytes()
        assert a.boxes == b.boxes
        assert encode_jpeg(a.image) == encode_jpeg(b.image)


def test_different_seed_or_index_differs() -> None:
    base = generate_sample(3, seed=0)
    assert base.image.tobytes() != generate_sample(3, seed=1).image.tobytes()
    assert base.image.tobytes() != generate_sample(4, seed=0).image.tobytes()


def test_image_depends_only_on_seed_and_index() -> None:
    stream = list(iter_samples(6, seed=5, size=96))
    tail = list(iter_samples(2, seed=5, size=96, start=4))
    assert [s.image.tobytes() for s in stream[4:]] == [s.image.tobytes() for s in tail]
    alone = generate_sample(2, seed=5, size=96)
    assert alone.image.tobytes() == stream[2].image.tobytes()
    assert alone.boxes == stream[2].boxes


def test_drift_keeps_the_scene() -> None:
    plain = generate_sample(1, seed=0)
    drifted = generate_sample(1, seed=0, drift=DriftParams(brightness=0.1, noise=0.05))
    assert drifted.boxes == plain.boxes
    assert drifted.image.tobytes() != plain.image.tobytes()
    assert generate_sample(1, seed=0, drift=DriftParams()).image.tobytes() == plain.image.tobytes()


# --- images and boxes ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 160, 320])
def test_image_format(size: int) -> None:
    sample = generate_sample(0, size=size)
    assert sample.image.shape == (size, size, 3)
    assert sample.image.dtype == np.uint8


@pytest.mark.parametrize(
    "class_names", [list(DEFAULT_CLASS_NAMES), ["defect"], [f"c{i}" for i in range(8)]]
)
def test_boxes_are_valid_and_every_class_appears(class_names: list[str]) -> None:
    n = 60 if len(class_names) <= 3 else 150
    samples = list(iter_samples(n, seed=11, class_names=class_names))
    counts: Counter[int] = Counter()
    per_image = []
    for s in samples:
        per_image.append(len(s.boxes))
        for cls, cx, cy, w, h in s.boxes:
            assert isinstance(cls, int) and 0 <= cls < len(class_names)
            assert cx - w / 2 >= 0 and cx + w / 2 <= 1
            assert cy - h / 2 >= 0 and cy + h / 2 <= 1
            # At least ~2 px each way and never the whole frame.
            assert 2 / 160 <= w < 0.9 and 2 / 160 <= h < 0.9
            counts[cls] += 1
    assert set(counts) == set(range(len(class_names))), counts
    assert max(per_image) <= 3
    assert sum(1 for k in per_image if k == 0) <= n // 6  # empty images stay rare


def test_boxes_are_tight_around_the_defect() -> None:
    """Every box edge touches its defect: a loose box would have plain surface at its border."""
    size = 160
    for s in iter_samples(40, seed=3, size=size, class_names=[f"c{i}" for i in range(8)]):
        image = s.image.astype(np.float64)
        for _, cx, cy, w, h in s.boxes:
            x0, y0 = round((cx - w / 2) * size), round((cy - h / 2) * size)
            x1, y1 = round((cx + w / 2) * size), round((cy + h / 2) * size)
            around = np.concatenate(
                [
                    image[max(0, y0 - 8) : y0].reshape(-1, 3),
                    image[y1 : y1 + 8].reshape(-1, 3),
                    image[y0:y1, max(0, x0 - 8) : x0].reshape(-1, 3),
                    image[y0:y1, x1 : x1 + 8].reshape(-1, 3),
                ]
            )
            distance = np.linalg.norm(image[y0:y1, x0:x1] - np.median(around, axis=0), axis=2)
            # Each 2 px band along an edge holds a pixel far (in RGB) from the surroundings.
            for band in (distance[:2], distance[-2:], distance[:, :2], distance[:, -2:]):
                assert band.max() > 40


# --- drift knobs -----------------------------------------------------------------------------

N_DRIFT = 12


@pytest.fixture(scope="module")
def plain_images() -> np.ndarray:
    return _stack(list(iter_samples(N_DRIFT, seed=21)))


def _drifted(**kwargs: object) -> np.ndarray:
    return _stack(list(iter_samples(N_DRIFT, seed=21, drift=DriftParams(**kwargs))))


def test_brightness_shifts_the_mean(plain_images: np.ndarray) -> None:
    brighter = _drifted(brightness=0.15).mean() - plain_images.mean()
    darker = _drifted(brightness=-0.15).mean() - plain_images.mean()
    assert brighter > 0.8 * 0.15 * 255  # ~38 levels minus a little clipping
    assert darker < -0.8 * 0.15 * 255


def test_blur_lowers_laplacian_variance(plain_images: np.ndarray) -> None:
    sharp = _laplacian_var(plain_images)
    assert _laplacian_var(_drifted(blur=1.5)) < 0.3 * sharp


def test_noise_raises_high_frequency_energy(plain_images: np.ndarray) -> None:
    clean = _high_freq_energy(plain_images)
    noisy = _high_freq_energy(_drifted(noise=0.05))
    assert noisy > 2.5 * clean
    # The mean is untouched: noise is zero-centred.
    assert abs(_drifted(noise=0.05).mean() - plain_images.mean()) < 1.0


def test_color_cast_shifts_channel_means(plain_images: np.ndarray) -> None:
    cast = _drifted(color_cast=(1.2, 1.0, 0.8))
    before, after = plain_images.mean(axis=(0, 1, 2)), cast.mean(axis=(0, 1, 2))
    assert after[0] > before[0] * 1.15
    assert abs(after[1] - before[1]) < 0.5
    assert after[2] < before[2] * 0.85


def test_drift_params_validate_and_apply_to_any_image() -> None:
    with pytest.raises(ValueError):
        DriftParams(blur=-1)
    with pytest.raises(ValueError):
        DriftParams(color_cast=(1.0, 1.0))  # type: ignore[arg-type]
    image = generate_sample(0).image
    out = apply_drift(image, DriftParams(brightness=0.1), seed=1)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out.astype(float).mean() > image.astype(float).mean() + 20


def test_contrast_shrinks_differences_around_the_mean(plain_images: np.ndarray) -> None:
    washed = _drifted(contrast=0.3)
    assert washed.std(axis=(1, 2, 3)).mean() < 0.4 * plain_images.std(axis=(1, 2, 3)).mean()
    assert abs(washed.mean() - plain_images.mean()) < 3.0
    with pytest.raises(ValueError):
        DriftParams(contrast=-0.1)
    assert DriftParams(contrast=1.0).is_identity


# --- harder scenes and near-duplicate frames --------------------------------------------------

FOUR = ("scratch", "dent", "stain", "ring")


def test_default_scene_params_draw_the_default_stream() -> None:
    for index in range(8):
        plain = generate_sample(index, seed=4)
        same = generate_sample(index, seed=4, scene=SceneParams())
        assert plain.image.tobytes() == same.image.tobytes() and plain.boxes == same.boxes


def test_object_scale_shrinks_the_defects() -> None:
    def mean_area(scale: float) -> float:
        scene = SceneParams(object_scale=scale)
        boxes = [b for s in iter_samples(40, seed=6, scene=scene) for b in s.boxes]
        return float(np.mean([b.w * b.h for b in boxes]))

    assert mean_area(0.5) < 0.4 * mean_area(1.0)


def test_object_counts_and_class_frequencies() -> None:
    scene = SceneParams(objects=(3, 5), class_probs=(0.4, 0.3, 0.25, 0.05), object_scale=0.5)
    samples = list(iter_samples(200, seed=8, class_names=FOUR, scene=scene))
    counts = [len(s.boxes) for s in samples if s.boxes]
    assert min(counts) >= 2 and max(counts) <= 5 and np.mean(counts) > 3.3
    classes = Counter(b.cls for s in samples for b in s.boxes)
    total = sum(classes.values())
    assert classes[3] / total < 0.1 and classes[0] / total > 0.3  # "ring" is rare
    with pytest.raises(ValueError):
        SceneParams(class_probs=(0.5, 0.2))
    with pytest.raises(ValueError):
        SceneParams(objects=(3, 2))
    with pytest.raises(ValueError):
        generate_sample(0, scene=SceneParams(class_probs=(0.5, 0.5)))  # 3 classes


def test_frames_of_a_scene_are_near_duplicates() -> None:
    scene = SceneParams(object_scale=0.6, objects=(2, 4))
    frames = [generate_frame(5, f, seed=2, scene=scene) for f in range(4)]
    other = generate_frame(6, 0, seed=2, scene=scene)
    again = generate_frame(5, 1, seed=2, scene=scene)
    assert again.image.tobytes() == frames[1].image.tobytes() and again.boxes == frames[1].boxes
    assert len({f.image.tobytes() for f in frames}) == 4  # no two frames identical
    base = frames[0].image.astype(np.float64)
    for f in frames[1:]:
        assert [b.cls for b in f.boxes] == [b.cls for b in frames[0].boxes]
        for a, b in zip(frames[0].boxes, f.boxes):  # moved by a few percent at most
            assert abs(a.cx - b.cx) < 2.5 * FrameJitter().shift and abs(a.w - b.w) < 0.05
        # Far closer to each other than to another scene.
        near = np.abs(f.image.astype(np.float64) - base).mean()
        assert near < 0.5 * np.abs(other.image.astype(np.float64) - base).mean()


def test_frames_drift_like_samples() -> None:
    dark = DriftParams(brightness=-0.4)
    plain = generate_frame(1, 0, seed=0)
    drifted = generate_frame(1, 0, seed=0, drift=dark)
    assert drifted.boxes == plain.boxes
    assert drifted.image.astype(float).mean() < plain.image.astype(float).mean() - 60
    still = generate_frame(1, 0, seed=0, jitter=FrameJitter(shift=0.0, gain=0.0, noise=0.0))
    assert still.image.tobytes() == generate_sample(1, seed=0).image.tobytes()
    with pytest.raises(ValueError):
        generate_frame(1, -1)


# --- the YOLO dataset -------------------------------------------------------------------------


def test_written_dataset_loads_in_ultralytics(tmp_path: Path) -> None:
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    names = ["scratch", "dent", "stain", "chip"]
    seen: list[int] = []
    root = tmp_path / "ds"
    data_yaml = write_yolo_dataset(
        root, n_train=10, n_val=4, seed=2, size=96, class_names=names, progress=seen.append
    )
    assert seen == list(range(1, 15))

    # A second call replaces the first rather than leaving extra images behind.
    data_yaml = write_yolo_dataset(root, n_train=8, n_val=4, seed=2, size=96, class_names=names)

    data = check_det_dataset(str(data_yaml))
    assert data["names"] == dict(enumerate(names))
    assert data["nc"] == len(names)

    expected = list(iter_samples(12, seed=2, size=96, class_names=names))
    for split, samples in (("train", expected[:8]), ("val", expected[8:])):
        dataset = YOLODataset(
            img_path=data[split], imgsz=96, augment=False, data=data, task="detect"
        )
        assert len(dataset) == len(samples)
        loaded = sorted(dataset.labels, key=lambda label: label["im_file"])
        for label, sample in zip(loaded, samples):
            assert label["cls"].ravel().astype(int).tolist() == [b[0] for b in sample.boxes]
            np.testing.assert_allclose(
                label["bboxes"], np.array([b[1:] for b in sample.boxes]).reshape(-1, 4), atol=1e-6
            )

    train_names = sorted(p.name for p in (root / "images" / "train").iterdir())
    val_names = sorted(p.name for p in (root / "images" / "val").iterdir())
    assert train_names == [f"img_{i:06d}.jpg" for i in range(8)]
    assert val_names == [f"img_{i:06d}.jpg" for i in range(8, 12)]
