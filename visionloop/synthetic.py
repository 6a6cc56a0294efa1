"""Synthetic "defect inspection" images with exact YOLO labels, plus drift knobs.

Used to bootstrap a first model and to exercise the loop end to end without real data:
textured surfaces (brushed metal, woven fabric, concrete) under uneven lighting, with one
to three defects per image (none in about one image in twenty). Every class index has its
own shape and its own hue, so any list of class names yields a learnable task:

    0 scratch  a scuff of a few near-parallel dark blue strokes
    1 dent     round teal dome, shaded from one side, in a dark rim
    2 stain    soft irregular rust patch
    3+         ring, chip, cross, dots, crack (cycled), each class in its own hue

The look is tuned for a small model trained from scratch in minutes (the default bootstrap:
yolov8n, 48 images at 160 px, 40 epochs on a CPU): defects are large, saturated and set on
calm, grey surfaces. Subtler defects would need far more training to show any mAP.

Image ``i`` of a given ``seed`` depends only on ``(seed, i)`` and the parameters, so a
dataset can be regenerated (or extended) byte for byte. Drift is applied after drawing,
with its own random stream: a drifted sample shows the same scene as the undrifted one.
"""

from __future__ import annotations

import colorsys
import io
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml
from PIL import Image

from visionloop.boxes import YoloBox, format_yolo_labels
from visionloop.settings import DEFAULT_CLASS_NAMES

_EMPTY_IMAGE_RATE = 0.05  # background-only images: rare, but a detector must see some
_MAX_PLACEMENT_TRIES = 12
_BOX_ALPHA_THRESHOLD = 64  # mask level (of 255) a pixel needs to count inside the box
_EXTRA_SHAPES = ("ring", "chip", "cross", "dots", "crack")


@dataclass(frozen=True)
class DriftParams:
    """Acquisition drift applied to a finished image, in the order a camera would apply it.

    All intensities are on a 0..1 scale (1.0 = 255 grey levels); the identity is the default.

    - ``color_cast``: per-channel (R, G, B) gain, e.g. ``(1.15, 1.0, 0.85)`` for warm light.
    - ``brightness``: additive exposure shift, e.g. ``0.15`` lifts every pixel ~38 levels,
      ``-0.2`` darkens; the result is clipped to the valid range.
    - ``blur``: gaussian blur sigma in pixels of the generated image (0 = sharp). Scale it
      with ``size``: sigma 2 at 640 px is about sigma 0.5 at 160 px.
    - ``noise``: standard deviation of additive gaussian sensor noise (0.05 ≈ 13 levels).
    - ``contrast``: gain around the image's mean grey level, applied after the colour cast
      (``0.3`` keeps 30% of every difference: a washed-out, low-contrast frame; 1 = none).
    """

    brightness: float = 0.0
    blur: float = 0.0
    noise: float = 0.0
    color_cast: tuple[float, float, float] = (1.0, 1.0, 1.0)
    contrast: float = 1.0

    def __post_init__(self) -> None:
        if self.blur < 0 or self.noise < 0:
            raise ValueError(f"blur and noise must be >= 0, got {self.blur} and {self.noise}")
        if self.contrast < 0:
            raise ValueError(f"contrast must be >= 0, got {self.contrast}")
        if len(self.color_cast) != 3 or any(c < 0 for c in self.color_cast):
            raise ValueError(f"color_cast needs three gains >= 0, got {self.color_cast}")
        object.__setattr__(self, "color_cast", tuple(float(c) for c in self.color_cast))

    @property
    def is_identity(self) -> bool:
        return self == DriftParams()


@dataclass(frozen=True)
class SceneParams:
    """What a scene holds, for harder tasks than the default bootstrap one.

    The defaults are the generator's own (``SceneParams()`` draws exactly what no params do).

    - ``object_scale``: size of every defect relative to the default look (0.5 = half).
    - ``objects``: ``(min, max)`` defects per non-empty image, uniform; None = the default
      one to three.
    - ``class_probs``: each class's probability per defect (a rare class gets a small one);
      classes may then repeat within an image. None = distinct classes, evenly.
    """

    object_scale: float = 1.0
    objects: tuple[int, int] | None = None
    class_probs: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.object_scale <= 0:
            raise ValueError(f"object_scale must be > 0, got {self.object_scale}")
        if self.objects is not None:
            low, high = self.objects
            if not 1 <= low <= high:
                raise ValueError(f"objects must be (min, max) with 1 <= min <= max: {self.objects}")
            object.__setattr__(self, "objects", (int(low), int(high)))
        if self.class_probs is not None:
            probs = tuple(float(p) for p in self.class_probs)
            if any(p < 0 for p in probs) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
                raise ValueError(f"class_probs must be >= 0 and sum to 1, got {probs}")
            object.__setattr__(self, "class_probs", probs)


@dataclass(frozen=True)
class FrameJitter:
    """How the frames of one scene differ: a line camera sees the same part a few times,
    shifted a little, under slightly varying exposure, with fresh sensor noise.

    - ``shift``: largest translation as a share of the image side (boxes move with it).
    - ``gain``: largest relative exposure change.
    - ``noise``: standard deviation of the per-frame sensor noise (0..1 scale).
    """

    shift: float = 0.03
    gain: float = 0.04
    noise: float = 0.012


@dataclass
class SyntheticSample:
    image: np.ndarray  # H x W x 3 uint8 RGB
    boxes: list[YoloBox]


# --- surfaces --------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Unit-variance-ish noise with features ~size/cells px wide (cheap: upsampled grid)."""
    grid = rng.standard_normal((cells, cells), dtype=np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def _surface(rng: np.random.Generator, size: int) -> np.ndarray:
    """A low-contrast, low-saturation texture so defects stay the salient thing."""
    kind = rng.integers(3)
    fine = _smooth_noise(rng, size, max(8, size // 2))
    if kind == 0:  # brushed metal: streaks smeared along one axis
        streaks = cv2.resize(
            rng.standard_normal((size, max(4, size // 8)), dtype=np.float32), (size, size)
        )
        streaks = cv2.blur(streaks, (max(3, size // 6), 1))
        luma = 0.025 * streaks / (streaks.std() + 1e-6) + 0.008 * fine
        if rng.random() < 0.5:
            luma = luma.T
        base, tint_scale = rng.uniform(0.5, 0.68), 0.02
    elif kind == 1:  # woven fabric: two crossed sinusoids with a slight weave jitter
        period = rng.uniform(size / 40, size / 22)
        axis = np.arange(size, dtype=np.float32) * (2 * math.pi / period)
        weave = np.sin(axis)[None, :] * np.sin(axis)[:, None]
        luma = 0.025 * weave + 0.01 * fine
        base, tint_scale = rng.uniform(0.45, 0.65), 0.03
    else:  # concrete: blotchy low-frequency variation plus grain
        luma = 0.03 * _smooth_noise(rng, size, 6) + 0.012 * fine
        base, tint_scale = rng.uniform(0.5, 0.7), 0.03
    tint = rng.uniform(-tint_scale, tint_scale, 3).astype(np.float32)
    return (base + luma)[None] + tint[:, None, None]


def _illumination(rng: np.random.Generator, size: int) -> np.ndarray:
    """Global exposure times a linear gradient in a random direction (H x W)."""
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    gradient = math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None]
    gain = rng.uniform(0.85, 1.1)
    return gain * (1.0 + rng.uniform(0.03, 0.12) * gradient)


# --- defects ---------------------------------------------------------------------------


# Each class's own hue: blue scratch, teal dent, rust stain, then well-separated hues for the
# extra classes. Colour is what a small detector picks up first, so a class with a hue of its
# own is learnt in minutes, where a grey-on-grey one needs far longer.
_CLASS_HUES = (0.62, 0.46, 0.07, 0.85, 0.16, 0.28, 0.97, 0.75)


def _class_hue(class_id: int, rng: np.random.Generator) -> float:
    if class_id < len(_CLASS_HUES):
        hue = _CLASS_HUES[class_id]
    else:  # past the palette: golden-ratio steps keep hues apart
        hue = (_CLASS_HUES[-1] + 0.618034 * (class_id - len(_CLASS_HUES) + 1)) % 1.0
    return (hue + rng.uniform(-0.02, 0.02)) % 1.0


def _rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    """An HSV colour as an RGB column that broadcasts over a 3 x H x W canvas."""
    return np.asarray(colorsys.hsv_to_rgb(hue, saturation, value), np.float32)[:, None, None]


def _draw_scratch(
    mask: np.ndarray, rng: np.random.Generator, cx: float, cy: float, scale: float = 1.0
) -> None:
    # A scuff of a few near-parallel strokes: one thin line alone gives a box so narrow that
    # few detector cells fall inside it, and a tiny model barely learns it.
    s = float(mask.shape[0]) * scale
    length = rng.uniform(0.22, 0.38) * s
    angle = rng.integers(2) * math.pi / 2 + rng.uniform(-0.4, 0.4)  # along/across the grain
    strokes = int(rng.integers(3, 6))
    spread = rng.uniform(0.1, 0.16) * s
    t = np.linspace(-0.5, 0.5, 5)
    for offset in np.linspace(-spread / 2, spread / 2, strokes):
        bend = rng.uniform(-0.06, 0.06) * length  # scratches are rarely perfectly straight
        part = rng.uniform(0.7, 1.0)
        along = t * length * part + rng.uniform(-0.1, 0.1) * length
        across = offset + bend * (1 - 4 * t**2)
        xs = cx + along * math.cos(angle) - across * math.sin(angle)
        ys = cy + along * math.sin(angle) + across * math.cos(angle)
        pts = np.round(np.stack([xs, ys], axis=1)).astype(np.int32)
        width = max(2, round(s * rng.uniform(0.012, 0.02)))
        cv2.polylines(mask, [pts], False, 255, width, cv2.LINE_AA)


def _draw_dent(
    mask: np.ndarray, rng: np.random.Generator, cx: float, cy: float, scale: float = 1.0
) -> None:
    r = rng.uniform(0.09, 0.15) * (mask.shape[0] * scale)
    axes = (round(r), round(r * rng.uniform(0.75, 1.0)))
    angle = rng.uniform(0, 180)
    cv2.ellipse(mask, (round(cx), round(cy)), axes, angle, 0, 360, 255, -1, cv2.LINE_AA)


def _draw_stain(
    mask: np.ndarray, rng: np.random.Generator, cx: float, cy: float, scale: float = 1.0
) -> None:
    r = rng.uniform(0.08, 0.14) * (mask.shape[0] * scale)
    for _ in range(rng.integers(4, 8)):
        ox, oy = rng.uniform(-0.5, 0.5, 2) * r
        axes = (round(r * rng.uniform(0.4, 0.8)), round(r * rng.uniform(0.3, 0.7)))
        centre = (round(cx + ox), round(cy + oy))
        cv2.ellipse(mask, centre, axes, rng.uniform(0, 180), 0, 360, 255, -1, cv2.LINE_AA)
    sigma = 0.6
    x, y, w, h = cv2.boundingRect(mask)
    pad = math.ceil(3 * sigma)  # blur just around the patch: a full-frame blur is slow
    x0, y0 = max(0, x - pad), max(0, y - pad)
    roi = mask[y0 : y + h + pad, x0 : x + w + pad]
    roi[...] = cv2.GaussianBlur(roi, (0, 0), sigma, borderType=cv2.BORDER_CONSTANT)


def _draw_ring(
    mask: np.ndarray, rng: np.random.Generator, cx: float, cy: float, scale: float = 1.0
) -> None:
    s = mask.shape[0] * scale
    r = rng.uniform(0.07, 0.12) * s
    thickness = max(2, round(0.025 * s))
    cv2.circle(mask, (round(cx), round(cy)), round(r), 255, thickness, cv2.LINE_AA)


def _draw_chip(
    mask: np.ndarray, rng: np.random.Generator, cx: float, cy: float, scale: float = 1.0
) -> None:
    r = rng.uniform(0.07, 0.12) * (mask.shape[0] * scale)
    n = int(rng.integers(3, 5))
    angles = rng.uniform(0, 2 * math.pi) + np.arange(n) * (2 * math.pi / n)
    pts = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], axis=1)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 255, cv2.LINE_AA)


def _draw_cross(
    mask: np.ndarray, rng: np.random.Generator, cx: float, cy: float, scale: float = 1.0
) -> None:
    s = mask.shape[0] * scale
    half, angle = rng.uniform(0.07, 0.12) * s, rng.uniform(0, math.pi / 2)
    for a in (angle, angle + math.pi / 2):
        dx, dy = half * math.cos(a), half * math.sin(a)
        p0, p1 = (round(cx - dx), round(cy - dy)), (round(cx + dx), round(cy + dy))
        cv2.line(mask, p0, p1, 255, max(2, round(0.028 * s)), cv2.LINE_AA)


def _draw_dots(
    mask: np.ndarray, rng: np.random.Generator, cx: float, cy: float, scale: float = 1.0
) -> None:
    s = mask.shape[0] * scale
    spread = rng.uniform(0.06, 0.1) * s
    for _ in range(rng.integers(5, 9)):
        ox, oy = rng.uniform(-spread, spread, 2)
        r = max(1, round(rng.uniform(0.015, 0.025) * s))
        cv2.circle(mask, (round(cx + ox), round(cy + oy)), r, 255, -1, cv2.LINE_AA)


def _draw_crack(
    mask: np.ndarray, rng: np.random.Generator, cx: float, cy: float, scale: float = 1.0
) -> None:
    # A jagged walk.
    s = float(mask.shape[0])
    step = 0.055 * (s * scale)
    heading = rng.uniform(0, 2 * math.pi)
    pts = [(cx, cy)]
    for _ in range(rng.integers(5, 8)):
        heading += rng.uniform(-1.0, 1.0)
        x, y = pts[-1]
        pts.append((x + step * math.cos(heading), y + step * math.sin(heading)))
    arr = np.clip(np.round(pts), 0, s - 1).astype(np.int32)
    cv2.polylines(mask, [arr], False, 255, max(2, round(0.02 * (s * scale))), cv2.LINE_AA)


_DRAW_SHAPE: dict[str, Callable[[np.ndarray, np.random.Generator, float, float, float], None]] = {
    "scratch": _draw_scratch,
    "dent": _draw_dent,
    "stain": _draw_stain,
    "ring": _draw_ring,
    "chip": _draw_chip,
    "cross": _draw_cross,
    "dots": _draw_dots,
    "crack": _draw_crack,
}


def _shape_of(class_id: int) -> str:
    """The shape class ``class_id`` draws: the default classes are named after their shapes,
    later ids cycle through the extra shapes."""
    if class_id < len(DEFAULT_CLASS_NAMES):
        return DEFAULT_CLASS_NAMES[class_id]
    return _EXTRA_SHAPES[(class_id - len(DEFAULT_CLASS_NAMES)) % len(_EXTRA_SHAPES)]


def _draw_mask(
    class_id: int, rng: np.random.Generator, size: int, scale: float = 1.0
) -> np.ndarray:
    """The defect's coverage (uint8, 255 = fully covered) at a random place; ``scale``
    shrinks (< 1) or grows the shape, and its margin from the border with it."""
    mask = np.zeros((size, size), np.uint8)
    margin = 0.12 * float(size) * min(scale, 1.0)
    cx, cy = rng.uniform(margin, float(size) - margin, 2)
    _DRAW_SHAPE[_shape_of(class_id)](mask, rng, cx, cy, scale)
    return mask


def _paint(canvas: np.ndarray, mask: np.ndarray, class_id: int, rng: np.random.Generator) -> None:
    """Blend the defect into ``canvas`` (3 x H x W float32, in place) inside the mask only."""
    x, y, w, h = cv2.boundingRect(mask)
    region = canvas[:, y : y + h, x : x + w]
    alpha = mask[y : y + h, x : x + w].astype(np.float32) / 255.0
    hue = _class_hue(class_id, rng)
    if class_id == 0:  # scratch: grooves down to a blue primer
        colour = _rgb(hue, rng.uniform(0.85, 0.95), rng.uniform(0.65, 0.75))
        region += alpha * 0.95 * (colour - region)
    elif class_id == 1:  # dent: a dome lit from one side inside a dark rim
        light = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        u = (xx - (w - 1) / 2) / max(w / 2, 1) * math.cos(light)
        v = (yy - (h - 1) / 2) / max(h / 2, 1) * math.sin(light)
        dome = 0.8 + rng.uniform(0.1, 0.15) * np.clip(u + v, -1.0, 1.0)
        region += alpha * (_rgb(hue, rng.uniform(0.75, 0.9), 1.0) * dome - region)
        rim_px = max(1, round(0.015 * canvas.shape[1]))
        rim = alpha - cv2.erode(alpha, np.ones((3, 3), np.uint8), iterations=rim_px)
        region += 0.5 * rim * (np.float32(0.12) - region)
    elif class_id == 2:  # stain: rust/brown
        colour = _rgb(hue, rng.uniform(0.85, 0.95), rng.uniform(0.65, 0.75))
        region += alpha * rng.uniform(0.9, 1.0) * (colour - region)
    else:
        colour = _rgb(hue, 0.85, rng.uniform(0.6, 0.85))
        region += alpha * 0.92 * (colour - region)


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], pad: int) -> bool:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return ax < bx + bw + pad and bx < ax + aw + pad and ay < by + bh + pad and by < ay + ah + pad


def _defects(
    canvas: np.ndarray,
    rng: np.random.Generator,
    num_classes: int,
    params: SceneParams | None = None,
) -> list[YoloBox]:
    """Draw the image's defects onto ``canvas`` and return their normalised boxes."""
    size = canvas.shape[1]
    params = params or SceneParams()
    if params.class_probs is not None and len(params.class_probs) != num_classes:
        raise ValueError(f"class_probs has {len(params.class_probs)} entries for {num_classes}")
    # Leaning towards more defects per image gives a small training set more to learn from.
    if rng.random() < _EMPTY_IMAGE_RATE:
        count = 0
    elif params.objects is None:
        count = int(rng.choice(3, p=(0.2, 0.35, 0.45))) + 1
    else:
        count = int(rng.integers(params.objects[0], params.objects[1] + 1))
    placed: list[tuple[int, int, int, int]] = []
    boxes: list[YoloBox] = []
    if params.class_probs is not None:
        classes = rng.choice(num_classes, size=count, p=params.class_probs)
    # Distinct classes within an image (while there are enough) keep a small set balanced.
    elif num_classes >= count:
        classes = rng.permutation(num_classes)
    else:
        classes = rng.integers(num_classes, size=count)
    for class_id in map(int, classes[:count]):
        for _ in range(_MAX_PLACEMENT_TRIES):
            mask = _draw_mask(class_id, rng, size, params.object_scale)
            core = (mask >= _BOX_ALPHA_THRESHOLD).astype(np.uint8)
            rect = cv2.boundingRect(core)
            # Overlapping defects make ambiguous targets; keep them apart instead.
            if rect[2] > 1 and rect[3] > 1 and not any(_overlaps(rect, p, 2) for p in placed):
                break
        else:
            continue
        _paint(canvas, mask, class_id, rng)
        placed.append(rect)
        x, y, w, h = rect
        boxes.append(YoloBox(class_id, (x + w / 2) / size, (y + h / 2) / size, w / size, h / size))
    return boxes


# --- drift -----------------------------------------------------------------------------


def _drift(image: np.ndarray, drift: DriftParams, noise_seed: int) -> np.ndarray:
    """Apply ``drift`` to an H x W x 3 float32 0..1 RGB image (new array, unclipped)."""
    out = cv2.transform(image, np.diag(np.asarray(drift.color_cast, np.float32)))
    if drift.contrast != 1.0:
        mean = np.float32(out.mean())
        out = (out - mean) * np.float32(drift.contrast) + mean
    out += np.float32(drift.brightness)
    if drift.blur > 0:
        out = cv2.GaussianBlur(out, (0, 0), drift.blur)
    if drift.noise > 0:
        # OpenCV's (thread-local) RNG fills a frame ~3x faster than numpy's gaussian.
        cv2.setRNGSeed(noise_seed)
        grain = np.empty_like(out)
        cv2.randn(grain, 0.0, drift.noise)
        out += grain
    return out


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Float 0..1 to uint8 with rounding; convertScaleAbs saturates at 255 and is fast."""
    np.maximum(image, 0.0, out=image)
    return cv2.convertScaleAbs(image, alpha=255.0)


def apply_drift(image: np.ndarray, drift: DriftParams, *, seed: int = 0) -> np.ndarray:
    """Drift any H x W x 3 uint8 RGB image (real ones too); ``seed`` fixes the noise."""
    return _to_uint8(_drift(image.astype(np.float32) / np.float32(255.0), drift, seed))


# --- public API ------------------------------------------------------------------------


def _scene(
    index: int, seed: int, size: int, class_names: Sequence[str], scene: SceneParams | None
) -> tuple[np.ndarray, list[YoloBox]]:
    """Scene ``index`` of the stream ``seed`` before drift: H x W x 3 float32 RGB, boxes."""
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got {index} and {seed}")
    if size < 32:
        raise ValueError(f"size must be >= 32 px, got {size}")
    if len(class_names) < 1:
        raise ValueError("class_names must name at least one class")
    rng = np.random.default_rng((seed, index))
    canvas = _surface(rng, size)
    boxes = _defects(canvas, rng, len(class_names), scene)
    canvas *= _illumination(rng, size)
    # Drawing works channel-first because numpy broadcasts slowly over a last axis of 3.
    return cv2.merge(list(canvas)), boxes


def generate_sample(
    index: int,
    *,
    seed: int = 0,
    size: int = 160,
    class_names: Sequence[str] = DEFAULT_CLASS_NAMES,
    drift: DriftParams | None = None,
    scene: SceneParams | None = None,
) -> SyntheticSample:
    """Image ``index`` of the stream ``seed``: a square ``size`` px RGB image and its boxes."""
    image, boxes = _scene(index, seed, size, class_names, scene)
    if drift is not None and not drift.is_identity:
        # Noise from a seed of its own, so drift never changes what the scene looks like.
        noise_seed = int(np.random.default_rng((seed, index, 1)).integers(2**31))
        image = _drift(image, drift, noise_seed)
    return SyntheticSample(image=_to_uint8(image), boxes=boxes)


def _shift_box(box: YoloBox, dx: float, dy: float) -> YoloBox | None:
    """``box`` moved by ``(dx, dy)`` (normalised) and clipped to the frame; None when less
    than half of it stays inside."""
    x1, x2 = box.cx - box.w / 2 + dx, box.cx + box.w / 2 + dx
    y1, y2 = box.cy - box.h / 2 + dy, box.cy + box.h / 2 + dy
    cx1, cx2, cy1, cy2 = max(x1, 0.0), min(x2, 1.0), max(y1, 0.0), min(y2, 1.0)
    if cx2 <= cx1 or cy2 <= cy1 or (cx2 - cx1) * (cy2 - cy1) < 0.5 * box.w * box.h:
        return None
    return YoloBox(box.cls, (cx1 + cx2) / 2, (cy1 + cy2) / 2, cx2 - cx1, cy2 - cy1)


def generate_frame(
    scene_index: int,
    frame: int,
    *,
    seed: int = 0,
    size: int = 160,
    class_names: Sequence[str] = DEFAULT_CLASS_NAMES,
    drift: DriftParams | None = None,
    scene: SceneParams | None = None,
    jitter: FrameJitter = FrameJitter(),
) -> SyntheticSample:
    """Frame ``frame`` of scene ``scene_index`` of the stream ``seed``: the scene of
    ``generate_sample(scene_index, ...)`` shifted, re-exposed and re-noised a little
    (``jitter``, from a stream of its own per frame), then drifted. Frames of one scene are
    near-duplicates: one question for a reviewer, asked several times."""
    if frame < 0:
        raise ValueError(f"frame must be >= 0, got {frame}")
    image, boxes = _scene(scene_index, seed, size, class_names, scene)
    rng = np.random.default_rng((seed, scene_index, frame, 2))
    dx, dy = rng.uniform(-jitter.shift, jitter.shift, 2) * size
    move = np.float32([[1, 0, dx], [0, 1, dy]])
    image = cv2.warpAffine(image, move, (size, size), borderMode=cv2.BORDER_REFLECT)
    image *= np.float32(1.0 + rng.uniform(-jitter.gain, jitter.gain))
    if jitter.noise > 0:
        cv2.setRNGSeed(int(rng.integers(2**31)))
        grain = np.empty_like(image)
        cv2.randn(grain, 0.0, jitter.noise)
        image += grain
    moved = [_shift_box(b, dx / size, dy / size) for b in boxes]
    if drift is not None and not drift.is_identity:
        noise_seed = int(np.random.default_rng((seed, scene_index, frame, 1)).integers(2**31))
        image = _drift(image, drift, noise_seed)
    return SyntheticSample(image=_to_uint8(image), boxes=[b for b in moved if b is not None])


def iter_samples(
    n: int,
    *,
    seed: int = 0,
    size: int = 160,
    class_names: Sequence[str] = DEFAULT_CLASS_NAMES,
    drift: DriftParams | None = None,
    start: int = 0,
    scene: SceneParams | None = None,
) -> Iterator[SyntheticSample]:
    """Samples ``start .. start + n - 1`` of the stream ``seed``."""
    for index in range(start, start + n):
        yield generate_sample(
            index, seed=seed, size=size, class_names=class_names, drift=drift, scene=scene
        )


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_yolo_dataset(
    root: Path,
    *,
    n_train: int,
    n_val: int,
    seed: int = 0,
    size: int = 160,
    class_names: Sequence[str] = DEFAULT_CLASS_NAMES,
    drift: DriftParams | None = None,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write a YOLO detection dataset under ``root`` and return its ``data.yaml``.

    Train uses indices ``0 .. n_train - 1`` and val the next ``n_val``, so the splits never
    share an image. Images left by an earlier call in the split folders are removed first.
    ``progress`` is called with the number of images written so far.
    """
    root = Path(root).expanduser().resolve()
    written = 0
    for split, start, count in (("train", 0, n_train), ("val", n_train, n_val)):
        image_dir, label_dir = root / "images" / split, root / "labels" / split
        for folder, pattern in ((image_dir, "img_*.jpg"), (label_dir, "img_*.txt")):
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob(pattern):
                stale.unlink()
        samples = iter_samples(
            count, seed=seed, size=size, class_names=class_names, drift=drift, start=start
        )
        for index, sample in enumerate(samples, start=start):
            stem = f"img_{index:06d}"
            (image_dir / f"{stem}.jpg").write_bytes(encode_jpeg(sample.image))
            (label_dir / f"{stem}.txt").write_text(format_yolo_labels(sample.boxes))
            written += 1
            if progress is not None:
                progress(written)
    data_yaml = root / "data.yaml"
    spec = {
        "path": str(root),
        "train": "images/train",
        "val": "images/val",
        "names": dict(enumerate(class_names)),
    }
    data_yaml.write_text(yaml.safe_dump(spec, sort_keys=False))
    return data_yaml
