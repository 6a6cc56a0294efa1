"""Decoding untrusted files and measuring image quality (no servers needed)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from samples import EXIF_ORIENTATION, awkward_files, corrupt_files, deep_png, malformed_files

from monitoring.features import ANALYSIS_SIDE, FEATURE_NAMES, extract_features, features_from_array
from visionloop.images import (
    DecodeLimits,
    ImageRejected,
    decode_image,
    estimated_decode_bytes,
)
from visionloop.synthetic import DriftParams, apply_drift, encode_jpeg, generate_sample


@pytest.mark.parametrize("name", sorted(malformed_files(0)))
def test_malformed_files_are_rejected_with_their_reason(name: str) -> None:
    data, code = malformed_files(0)[name]
    with pytest.raises(ImageRejected) as caught:
        decode_image(data)
    assert caught.value.code == code
    assert str(caught.value).startswith(f"{code}: ")


def test_unknown_formats_are_rejected_with_ultralytics_loaded() -> None:
    import ultralytics  # noqa: F401 - it patches PIL's Image.open

    data, code = malformed_files(0)["noise.jpg"]
    with pytest.raises(ImageRejected) as caught:
        decode_image(data)
    assert caught.value.code == code == "not_an_image"


def test_rejection_messages_say_what_the_file_is() -> None:
    files = malformed_files(0)
    messages = {}
    for name, (data, _) in files.items():
        with pytest.raises(ImageRejected) as caught:
            decode_image(data)
        messages[name] = caught.value.detail
    assert "HTML" in messages["page.jpg"]
    assert "PDF" in messages["report.jpg"]
    assert "text" in messages["notes.txt"]
    assert "0 bytes" in messages["empty.jpg"]
    assert "truncated" in messages["truncated.jpg"]
    assert "1x20000" in messages["strip.png"]


@pytest.mark.parametrize("name", sorted(corrupt_files(0)))
def test_broken_files_of_a_known_format_are_corrupt_not_unknown(name: str) -> None:
    data, fmt = corrupt_files(0)[name]
    with pytest.raises(ImageRejected) as caught:
        decode_image(data)
    assert caught.value.code == "corrupt"
    assert caught.value.detail.startswith(f"corrupt {fmt}: ")
    assert len(caught.value.detail) > len(f"corrupt {fmt}: ")  # with what PIL found wrong


def test_truncated_files_say_their_format() -> None:
    data, _ = malformed_files(0)["truncated.png"]
    with pytest.raises(ImageRejected) as caught:
        decode_image(data)
    assert caught.value.detail.startswith("truncated PNG: ")


def test_the_pixel_limit_is_the_callers() -> None:
    data = deep_png(100, 100)
    decode_image(data, limits=DecodeLimits(max_pixels=10_000, max_bytes=2**30))
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, limits=DecodeLimits(max_pixels=9_999, max_bytes=2**30))
    assert caught.value.code == "decompression_bomb"
    assert "10,000 pixels, over the 9,999 limit" in caught.value.detail


def test_features_are_measured_under_the_callers_limits() -> None:
    data = deep_png(100, 100)
    assert extract_features(data, limits=DecodeLimits(max_pixels=10_000, max_bytes=2**30))
    with pytest.raises(ImageRejected) as caught:
        extract_features(data, limits=DecodeLimits(max_pixels=9_999, max_bytes=2**30))
    assert caught.value.code == "decompression_bomb"


def test_an_image_too_large_to_decode_is_refused_with_the_numbers() -> None:
    data = deep_png(4000, 4000)  # about 30 kB
    needed = estimated_decode_bytes(4000, 4000, "I;16")
    limits = DecodeLimits(max_pixels=40_000_000, max_bytes=needed - 1)
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, limits=limits)
    assert caught.value.code == "too_large"
    assert caught.value.detail == (
        f"4000x4000 I;16 pixels would take about {needed / 2**20:,.0f} MiB to decode, "
        f"over the {(needed - 1) / 2**20:,.0f} MiB limit"
    )
    assert decode_image(data, limits=DecodeLimits(40_000_000, needed)).rgb.shape == (4000, 4000, 3)


_PEAK_RSS = """
import resource, sys
from visionloop.images import decode_image
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rgb = decode_image(data).rgb
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024, rgb.shape[0] * rgb.shape[1])
"""


def test_a_small_sixteen_bit_file_decodes_within_its_estimate(tmp_path: Path) -> None:
    # A 30 kB file of 16 Mpx 16-bit pixels: float arithmetic on it once took 14 bytes a pixel.
    path = tmp_path / "deep.png"
    path.write_bytes(deep_png(4000, 4000))
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, str(path)], capture_output=True, text=True, check=True
    )
    grown, pixels = map(int, done.stdout.split())
    assert pixels == 16_000_000
    assert grown <= estimated_decode_bytes(4000, 4000, "I;16"), f"{grown / 2**20:.0f} MiB"


@pytest.mark.parametrize("name", sorted(awkward_files(0)))
def test_awkward_valid_files_decode_to_upright_rgb(name: str) -> None:
    expected = awkward_files(0)[name]
    decoded = decode_image(expected.data)
    assert (decoded.format, decoded.width, decoded.height) == (
        expected.format,
        expected.width,
        expected.height,
    )
    assert decoded.extension == expected.extension
    assert decoded.rgb.dtype == np.uint8
    assert decoded.rgb.shape == (expected.height, expected.width, 3)
    assert 20 < decoded.rgb.mean() < 235  # a real picture, not blown out or black


def test_exif_orientation_is_applied_to_the_pixels() -> None:
    # Left half black, right half white, stored with "rotate 90 degrees clockwise to view":
    # upright, the black half is on top.
    stored = np.zeros((100, 200), np.uint8)
    stored[:, 100:] = 255
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, "JPEG", exif=exif)
    decoded = decode_image(buffer.getvalue())
    assert (decoded.width, decoded.height) == (100, 200)
    grey = decoded.rgb[..., 0].astype(int)
    assert grey[:90].mean() < 30 and grey[110:].mean() > 225


def test_sixteen_bit_grey_keeps_its_range() -> None:
    ramp = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (32, 1))
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, "PNG")
    rgb = decode_image(buffer.getvalue()).rgb
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255
    assert 100 < rgb.mean() < 155  # not clipped to white as a plain convert("L") would


def test_reduced_decode_keeps_the_full_size() -> None:
    data = encode_jpeg(generate_sample(0, seed=1, size=640).image)
    decoded = decode_image(data, max_side=160)
    assert (decoded.width, decoded.height) == (640, 640)
    assert max(decoded.rgb.shape[:2]) == 160  # DCT scaling 1/4


def test_features_are_complete_and_on_documented_scales() -> None:
    features = extract_features(encode_jpeg(generate_sample(3, seed=2, size=640).image))
    assert set(features) == set(FEATURE_NAMES)
    assert 0 < features["brightness"] < 1 and 0 < features["contrast"] < 1
    assert 0 <= features["saturation"] <= 1 and 0 < features["entropy"] <= 8
    assert features["blur"] > 0 and features["noise"] >= 0
    assert (features["width"], features["height"]) == (640, 640)


def test_features_respond_to_the_drift_they_measure() -> None:
    image = generate_sample(5, seed=2, size=ANALYSIS_SIDE).image
    base = features_from_array(image)
    brighter = features_from_array(apply_drift(image, DriftParams(brightness=0.2)))
    blurred = features_from_array(apply_drift(image, DriftParams(blur=2.0)))
    noisy = features_from_array(apply_drift(image, DriftParams(noise=0.06)))
    warm = features_from_array(apply_drift(image, DriftParams(color_cast=(1.3, 1.0, 0.7))))
    assert brighter["brightness"] > base["brightness"] + 0.15
    assert blurred["blur"] < base["blur"] / 5
    assert noisy["noise"] > base["noise"] * 2
    assert (
        warm["colorfulness"] > base["colorfulness"] + 10 and warm["saturation"] > base["saturation"]
    )


def test_features_do_not_depend_on_the_image_size() -> None:
    large = generate_sample(4, seed=2, size=1280).image
    small = features_from_array(large[::2, ::2].copy())
    full = features_from_array(large)
    for name in ("brightness", "contrast", "saturation", "entropy"):
        assert full[name] == pytest.approx(small[name], rel=0.05, abs=0.01)
