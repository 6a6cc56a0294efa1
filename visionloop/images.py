"""Decoding untrusted image files: a decoded RGB array, or a precise reason to quarantine.

Files in the ``incoming`` bucket come from cameras, scripts and people, so anything can be
there. ``decode_image`` accepts every image a detector can use, however awkward (grayscale,
palette, RGBA, CMYK, 16-bit, progressive, WebP, EXIF-rotated, any file name) and turns it
into one canonical form: an ``H x W x 3`` uint8 RGB array, upright. Everything else raises
``ImageRejected`` whose ``code`` is stable (tests, analytics) and whose message says what
exactly is wrong with this file.
"""

from __future__ import annotations

import contextlib
import io
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Browser-displayable formats (Label Studio shows the stored bytes) plus the two that line
# cameras write. The extension is what the stored copy is named with, whatever the source
# file was called.
FORMATS: dict[str, tuple[str, str]] = {
    "JPEG": (".jpg", "image/jpeg"),
    "MPO": (".jpg", "image/jpeg"),  # multi-picture JPEG from phones: the first frame is a JPEG
    "PNG": (".png", "image/png"),
    "WEBP": (".webp", "image/webp"),
    "GIF": (".gif", "image/gif"),
    "BMP": (".bmp", "image/bmp"),
    "TIFF": (".tif", "image/tiff"),
}

MAX_PIXELS = 50_000_000
"""Larger images are refused before decoding: a small file can expand to gigabytes."""
MIN_SIDE = 16
"""Smaller sides cannot hold a detectable defect."""
MAX_ASPECT = 20.0
"""Longer-than-wide ratios beyond this are line-scan strips or corrupt headers, not frames."""


class ImageRejected(ValueError):
    """The file is not an image the loop can use; ``code`` names the kind of problem."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class DecodedImage:
    rgb: np.ndarray
    """``H x W x 3`` uint8, upright; possibly reduced in size (see ``decode_image``)."""
    width: int
    """Upright width of the full-size image (EXIF orientation applied)."""
    height: int
    format: str
    mode: str
    """Pixel mode of the file (``L``, ``P``, ``CMYK``, ``I;16``...), before conversion to RGB."""

    @property
    def extension(self) -> str:
        return FORMATS[self.format][0]

    @property
    def content_type(self) -> str:
        return FORMATS[self.format][1]


def _sniff_non_image(head: bytes) -> str | None:
    """A description of well-known non-image content, else None (PIL gets to decide)."""
    if head.startswith(b"%PDF-"):
        return "a PDF document"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text[:512]:
        return "an HTML document"
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "an SVG drawing (vector images are not supported)"
    if text.startswith((b"<?xml", b"<")) and b"\x00" not in head:
        return "an XML document"
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as exc:
            # A multi-byte character cut off by the end of the sniffed window is still text.
            if exc.start < len(head) - 4:
                return None
        return "a text file"
    return None


def _check_geometry(width: int, height: int, max_pixels: int) -> None:
    pixels = width * height
    if pixels > max_pixels:
        raise ImageRejected(
            "decompression_bomb",
            f"{width}x{height} is {pixels:,} pixels, over the {max_pixels:,} limit",
        )
    if min(width, height) < MIN_SIDE:
        raise ImageRejected("absurd_dimensions", f"{width}x{height}: a side is under {MIN_SIDE} px")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ImageRejected(
            "absurd_dimensions",
            f"{width}x{height}: aspect ratio over {MAX_ASPECT:g}:1",
        )


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode as ``H x W x 3`` uint8 RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (and 32-bit integer) grey: PIL's convert("L") clips at 255 and would turn
        # most of the image white; scale the full 16-bit range down instead.
        grey = np.asarray(image).astype(np.float32)
        grey = np.clip(grey, 0, 65535) * np.float32(255.0 / 65535.0)
        grey = (grey + 0.5).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode in ("P", "PA") and "transparency" in image.info:
        # Through RGBA, as PIL asks for palette images with transparency.
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def decode_image(
    data: bytes, *, max_side: int | None = None, max_pixels: int = MAX_PIXELS
) -> DecodedImage:
    """Decode and validate ``data``; raise ``ImageRejected`` with the reason it is unusable.

    With ``max_side``, JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose
    longer side is still at least ``max_side``: a 4000 px frame costs a fraction of a full
    decode when the detector or the features only look at 640 px. ``width`` and ``height``
    always describe the full-size image.
    """
    if not data:
        raise ImageRejected("empty", "the file is empty (0 bytes)")
    kind = _sniff_non_image(data[:1024])
    if kind is not None:
        raise ImageRejected("not_an_image", f"the file is {kind}")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageRejected("decompression_bomb", str(exc)) from None
    except (UnidentifiedImageError, ImportError):
        # ImportError: once imported, ultralytics patches Image.open to retry unidentified
        # files with a HEIF plugin, and raises ImportError when that plugin is not installed.
        raise ImageRejected(
            "not_an_image", f"unrecognised format (starts with {data[:8].hex(' ')})"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected("corrupt", f"unreadable image header: {exc}") from None

    if image.format not in FORMATS:
        raise ImageRejected(
            "unsupported_format",
            f"{image.format} images are not supported (use one of {', '.join(sorted(FORMATS))})",
        )
    width, height = image.size
    _check_geometry(width, height, max_pixels)
    mode = image.mode
    fmt = image.format

    if max_side and fmt in ("JPEG", "MPO"):
        scale = max_side / max(width, height)
        if scale < 1:
            image.draft(None, (max(1, round(width * scale)), max(1, round(height * scale))))
    try:
        image.load()
    except OSError as exc:
        message = str(exc)
        code = (
            "truncated" if "truncated" in message or "premature" in message.lower() else "corrupt"
        )
        raise ImageRejected(code, f"the image data is broken: {message}") from None
    except (SyntaxError, ValueError, zlib.error, EOFError) as exc:
        raise ImageRejected("corrupt", f"the image data is broken: {exc}") from None

    decoded_size = image.size
    # A broken EXIF block leaves the pixels as decoded: orientation is a courtesy, not a need.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(image, in_place=True)
    if image.size != decoded_size:  # rotated by 90 degrees
        width, height = height, width
    return DecodedImage(_to_rgb(image), width, height, fmt, mode)
