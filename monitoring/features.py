"""Image-quality features: the numbers drift detection compares between image populations.

Every feature is computed on one fixed analysis scale (longer side ``ANALYSIS_SIDE`` px,
never enlarged) so that a 4000 px frame and a 640 px frame of the same scene measure the
same: blur and noise depend on scale. All of it is whole-array OpenCV/numpy work, a few
milliseconds per image, done once at ingest and stored with the image.

``extract_features(bytes)`` is the platform's definition: ingest stores its result, and
anything compared with stored features (drift references) must come from it too. It
decodes JPEGs directly at the analysis scale (DCT scaling), which is fast but not
bit-identical to a full decode followed by a resize: chroma in particular comes out
differently, so colourfulness and saturation of the two paths must never be mixed.

| feature | unit / range | meaning |
| --- | --- | --- |
| ``brightness`` | 0..1 | mean luma |
| ``contrast`` | 0..1 | RMS contrast: standard deviation of luma |
| ``blur`` | grey levels², >= 0 | variance of the Laplacian; *lower* means blurrier |
| ``colorfulness`` | 0..~150 | Hasler & Süsstrunk (2003) colourfulness on 8-bit RGB |
| ``saturation`` | 0..1 | mean HSV saturation |
| ``noise`` | grey levels | sensor-noise sigma, Immerkær's (1996) fast estimator |
| ``entropy`` | bits, 0..8 | Shannon entropy of the 256-bin luma histogram |
| ``width``, ``height`` | px | upright size of the full image |
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from visionloop.images import DEFAULT_LIMITS, DecodeLimits, decode_image

ANALYSIS_SIDE = 320

FEATURE_NAMES: tuple[str, ...] = (
    "brightness",
    "contrast",
    "blur",
    "colorfulness",
    "saturation",
    "noise",
    "entropy",
    "width",
    "height",
)

# Immerkær's kernel: the difference of two Laplacians, which cancels image structure up to
# second order and leaves (mostly) noise.
_NOISE_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)
_OPPONENT = np.array([[1.0, -1.0, 0.0], [0.5, 0.5, -1.0]], dtype=np.float32)


def _analysis_copy(rgb: np.ndarray) -> np.ndarray:
    height, width = rgb.shape[:2]
    scale = ANALYSIS_SIDE / max(height, width)
    if scale >= 1:
        return rgb
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def features_from_array(
    rgb: np.ndarray, *, width: int | None = None, height: int | None = None
) -> dict[str, float]:
    """Features of an ``H x W x 3`` uint8 RGB image.

    ``width``/``height`` give the full image's size when ``rgb`` is a reduced decode;
    they default to ``rgb``'s own size.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"need an H x W x 3 uint8 RGB array, got {rgb.shape} {rgb.dtype}")
    small = _analysis_copy(rgb)
    grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)

    mean, std = cv2.meanStdDev(grey)
    _, lap_std = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_32F))

    # The opponent channels rg = R - G and yb = (R + G) / 2 - B in one pass.
    opponent = cv2.transform(small.astype(np.float32), _OPPONENT)
    (rg_mean, yb_mean), (rg_std, yb_std) = (v.ravel() for v in cv2.meanStdDev(opponent))
    colorfulness = math.hypot(rg_std, yb_std) + 0.3 * math.hypot(rg_mean, yb_mean)
    saturation = float(cv2.cvtColor(small, cv2.COLOR_RGB2HSV)[..., 1].mean()) / 255.0

    h, w = grey.shape
    if h > 2 and w > 2:
        residual = cv2.filter2D(grey.astype(np.float32), -1, _NOISE_KERNEL)[1:-1, 1:-1]
        noise = math.sqrt(math.pi / 2) * float(np.abs(residual).sum()) / (6.0 * (w - 2) * (h - 2))
    else:
        noise = 0.0

    histogram = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    p = histogram[histogram > 0] / grey.size
    entropy = float(-(p * np.log2(p)).sum())

    return {
        "brightness": float(mean[0, 0]) / 255.0,
        "contrast": float(std[0, 0]) / 255.0,
        "blur": float(lap_std[0, 0]) ** 2,
        "colorfulness": colorfulness,
        "saturation": saturation,
        "noise": noise,
        "entropy": entropy,
        "width": float(width if width is not None else rgb.shape[1]),
        "height": float(height if height is not None else rgb.shape[0]),
    }


def extract_features(
    image: bytes | np.ndarray, *, limits: DecodeLimits = DEFAULT_LIMITS
) -> dict[str, float]:
    """Features of encoded image bytes (the stored definition) or of an RGB array.

    ``ImageRejected`` says why bytes are not an image, or are over ``limits`` (pass the
    settings' ``DecodeLimits.from_settings``: the defaults ignore what an operator set).
    """
    if isinstance(image, np.ndarray):
        return features_from_array(image)
    decoded = decode_image(image, max_side=ANALYSIS_SIDE, limits=limits)
    return features_from_array(decoded.rgb, width=decoded.width, height=decoded.height)
