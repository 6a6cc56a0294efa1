"""Image files for ingest tests: malformed ones with the reason code each must get, and
awkward but valid ones with what decoding them must give."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image

from visionloop.synthetic import generate_sample

EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Awkward:
    data: bytes
    format: str
    width: int
    height: int
    extension: str


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _scene(index: int, seed: int, size: int = 160) -> Image.Image:
    return Image.fromarray(generate_sample(index, seed=seed, size=size).image)


@cache  # the bomb takes seconds to encode
def malformed_files(seed: int) -> dict[str, tuple[bytes, str]]:
    """File name -> (bytes, expected quarantine code); every content distinct per ``seed``."""
    jpeg = _encode(_scene(0, seed), "JPEG", quality=90)
    png = _encode(_scene(1, seed), "PNG")
    noise = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    return {
        "empty.jpg": (b"", "empty"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "truncated.png": (png[: len(png) // 2], "truncated"),
        "notes.txt": (f"camera 7 calibration notes, run {seed}\n".encode(), "not_an_image"),
        "page.jpg": (
            f"<!DOCTYPE html><html><body>404 {seed}</body></html>".encode(),
            "not_an_image",
        ),
        "report.jpg": (
            f"%PDF-1.4\n%{seed}\n1 0 obj<<>>endobj\ntrailer<<>>\n".encode(),
            "not_an_image",
        ),
        "noise.jpg": (noise, "not_an_image"),
        # 30000 x 30000 one-bit pixels compress to ~100 kB and would decode to 900 MP.
        "bomb.png": (
            _encode(Image.new("1", (30000, 30000 + seed % 7)), "PNG"),
            "decompression_bomb",
        ),
        "strip.png": (
            _encode(Image.new("RGB", (1, 20000), (seed % 255, 0, 0)), "PNG"),
            "absurd_dimensions",
        ),
    }


@cache
def awkward_files(seed: int) -> dict[str, Awkward]:
    """File name -> valid but awkward image and what ingesting it must record."""
    scenes = [_scene(i, seed) for i in range(12)]
    grey16 = np.asarray(scenes[4].convert("L")).astype(np.uint16) * 257
    # Stored landscape 200 x 120 with orientation 6 ("rotate 90 CW to view"): upright it is
    # 120 x 200, with the stored image's left column on top.
    stored = scenes[7].resize((200, 120))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return {
        "grey.jpg": Awkward(_encode(scenes[0].convert("L"), "JPEG"), "JPEG", 160, 160, ".jpg"),
        "alpha.png": Awkward(_encode(scenes[1].convert("RGBA"), "PNG"), "PNG", 160, 160, ".png"),
        "palette.png": Awkward(
            _encode(scenes[2].convert("P"), "PNG", transparency=0), "PNG", 160, 160, ".png"
        ),
        "cmyk.jpg": Awkward(_encode(scenes[3].convert("CMYK"), "JPEG"), "JPEG", 160, 160, ".jpg"),
        "depth16.png": Awkward(_encode(Image.fromarray(grey16), "PNG"), "PNG", 160, 160, ".png"),
        "progressive.jpg": Awkward(
            _encode(scenes[5], "JPEG", progressive=True), "JPEG", 160, 160, ".jpg"
        ),
        "frame.webp": Awkward(_encode(scenes[6], "WEBP"), "WEBP", 160, 160, ".webp"),
        "rotated.jpg": Awkward(_encode(stored, "JPEG", exif=exif), "JPEG", 120, 200, ".jpg"),
        "UPPER.JPG": Awkward(_encode(scenes[8], "JPEG"), "JPEG", 160, 160, ".jpg"),
        "no_extension": Awkward(_encode(scenes[9], "PNG"), "PNG", 160, 160, ".png"),
        "wrong_extension.png": Awkward(_encode(scenes[10], "JPEG"), "JPEG", 160, 160, ".jpg"),
    }


def good_jpegs(count: int, seed: int, size: int = 160) -> dict[str, bytes]:
    return {
        f"img_{i:03d}.jpg": _encode(_scene(i, seed, size), "JPEG", quality=90) for i in range(count)
    }


def _noise(count: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, count, dtype=np.uint8).tobytes()


def _with_chunk_data(png: bytes, chunk: bytes, data: bytes) -> bytes:
    """``png`` with the data of its first ``chunk`` replaced, the chunk's CRC kept valid."""
    at = png.index(chunk)
    length = struct.unpack(">I", png[at - 4 : at])[0]
    crc = struct.pack(">I", zlib.crc32(chunk + data))
    head, tail = png[: at - 4], png[at + 8 + length :]
    return head + struct.pack(">I", len(data)) + chunk + data + crc + tail


@cache
def corrupt_files(seed: int) -> dict[str, tuple[bytes, str]]:
    """File name -> (bytes that start like a known format but are broken, that format)."""
    scene = _scene(2, seed, size=64)
    png = _encode(scene, "PNG")
    bad_crc = bytearray(png)
    bad_crc[29] ^= 0xFF  # the IHDR chunk's checksum
    return {
        "bad_crc.png": (bytes(bad_crc), "PNG"),
        "garbage_idat.png": (_with_chunk_data(png, b"IDAT", _noise(600, seed)), "PNG"),
        "garbage.jpg": (b"\xff\xd8\xff" + _noise(3000, seed + 1), "JPEG"),
        "garbage.webp": (_encode(scene, "WEBP")[:12] + _noise(300, seed + 2), "WEBP"),
        "garbage.bmp": (b"BM" + _noise(300, seed + 3), "BMP"),
        "garbage.tif": (_encode(scene, "TIFF")[:4] + _noise(300, seed + 4), "TIFF"),
    }


def deep_png(width: int, height: int) -> bytes:
    """A 16-bit grey PNG of a few kilobytes that decodes to ``width x height`` pixels."""
    return _encode(Image.new("I;16", (width, height)), "PNG")
