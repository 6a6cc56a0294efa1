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
from PIL import Image, ImageMode, ImageOps, UnidentifiedImageError

from visionloop.settings import Settings

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

# A file that starts like one of these but that PIL cannot open is a broken image of that
# format, not an unknown kind of file.
MAGIC: dict[bytes, str] = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}
CONVERSION_BYTES = 4
"""Bytes per pixel of the one intermediate image a conversion to RGB may hold (PIL's RGB)."""
MIN_SIDE = 16
"""Smaller sides cannot hold a detectable defect."""
MAX_ASPECT = 20.0
"""Longer-than-wide ratios beyond this are line-scan strips or corrupt headers, not frames."""


@dataclass(frozen=True)
class DecodeLimits:
    """How large a file may be decoded: refused before any pixel is decoded when over."""

    max_pixels: int
    max_bytes: int
    """Estimated bytes one decode may hold at its peak (``estimated_decode_bytes``)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> DecodeLimits:
        # One file may take the whole decode budget of its process, never more.
        return cls(settings.max_image_pixels, settings.decode_budget_bytes)


DEFAULT_LIMITS = DecodeLimits(
    Settings.model_fields["max_image_pixels"].default,
    Settings.model_fields["decode_budget_bytes"].default,
)
"""The settings' defaults, for callers without settings at hand."""


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


def _magic_format(head: bytes) -> str | None:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in MAGIC.items() if head.startswith(magic)), None)


def _why_unopenable(data: bytes, fmt: str) -> str:
    """What the format's own PIL plugin says about ``data`` (``Image.open`` only says that no
    plugin accepted it)."""
    Image.init()
    factory, _ = Image.OPEN[fmt]
    try:
        factory(io.BytesIO(data), "").close()
    except Exception as exc:
        return str(exc) or type(exc).__name__
    return "PIL cannot identify it"


def _stored_bytes_per_pixel(mode: str) -> int:
    """Bytes PIL holds per pixel of ``mode`` (images of several 8-bit bands are padded to 4)."""
    described = ImageMode.getmode(mode)
    bands = len(described.bands)
    return np.dtype(described.typestr).itemsize * (4 if bands > 1 else bands)


def estimated_decode_bytes(width: int, height: int, mode: str) -> int:
    """Peak bytes decoding a ``width x height`` image of ``mode`` may hold: its pixels as
    decoded, one conversion buffer and the ``H x W x 3`` uint8 output."""
    return width * height * (_stored_bytes_per_pixel(mode) + CONVERSION_BYTES + 3)


def _check_decode_bytes(image: Image.Image, max_bytes: int) -> None:
    width, height = image.size
    needed = estimated_decode_bytes(width, height, image.mode)
    if needed > max_bytes:
        raise ImageRejected(
            "too_large",
            f"{width}x{height} {image.mode} pixels would take about {needed / 2**20:,.0f} MiB "
            f"to decode, over the {max_bytes / 2**20:,.0f} MiB limit",
        )


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


# 16-bit grey to 8 bits, rounded: a table lookup writes the output bytes directly, where
# float arithmetic would hold several 4-byte copies of a large image at once.
_ROWS_PER_BLOCK = 256
_GREY16_TO_8 = (np.arange(65536, dtype=np.float64) * (255.0 / 65535.0) + 0.5).astype(np.uint8)


def _grey16_to_rgb(image: Image.Image) -> np.ndarray:
    # PIL's convert("L") clips at 255 and would turn most of the image white; scale the
    # full 16-bit range down instead. ``frombuffer`` over ``tobytes`` costs one copy of the
    # pixels where ``np.asarray`` briefly holds two.
    width, height = image.size
    grey = np.frombuffer(image.tobytes(), ImageMode.getmode(image.mode).typestr)
    grey = grey.reshape(height, width)
    rgb = np.empty((height, width, 3), np.uint8)
    # A block of rows at a time: the lookup's temporaries stay small whatever the image.
    for top in range(0, height, _ROWS_PER_BLOCK):
        block = grey[top : top + _ROWS_PER_BLOCK]
        if block.dtype != np.uint16:  # 32-bit integers
            block = np.clip(block, 0, 65535).astype(np.uint16)
        rgb[top : top + _ROWS_PER_BLOCK] = _GREY16_TO_8[block][:, :, None]
    return rgb


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode as ``H x W x 3`` uint8 RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return _grey16_to_rgb(image)
    if image.mode in ("P", "PA") and "transparency" in image.info:
        # Through RGBA, as PIL asks for palette images with transparency.
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def _reduce(image: Image.Image, max_side: int | None) -> None:
    """Have a JPEG decoded at the smallest DCT scale whose longer side is still ``max_side``."""
    width, height = image.size
    if max_side and image.format in ("JPEG", "MPO"):
        scale = max_side / max(width, height)
        if scale < 1:
            image.draft(None, (max(1, round(width * scale)), max(1, round(height * scale))))


def decode_cost(data: bytes, *, max_side: int | None = None) -> int:
    """``estimated_decode_bytes`` of ``data`` from its header alone (0 when it has no image
    header: such a file is refused before anything is decoded)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            _reduce(image, max_side)
            return estimated_decode_bytes(*image.size, image.mode)
    except Exception:  # whatever the header's trouble, decode_image names it
        return 0


def _broken(fmt: str, message: str) -> ImageRejected:
    """A file of a known format that PIL cannot read: cut short, or corrupt."""
    if "truncated" in message or "premature" in message.lower():
        return ImageRejected("truncated", f"truncated {fmt}: {message}")
    return ImageRejected("corrupt", f"corrupt {fmt}: {message}")


def decode_image(
    data: bytes, *, max_side: int | None = None, limits: DecodeLimits = DEFAULT_LIMITS
) -> DecodedImage:
    """Decode and validate ``data``; raise ``ImageRejected`` with the reason it is unusable.

    ``limits`` are checked from the header, before any pixel is decoded: a small file can
    expand to gigabytes.

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
        fmt = _magic_format(data[:16])
        if fmt is not None:
            raise _broken(fmt, _why_unopenable(data, fmt)) from None
        raise ImageRejected(
            "not_an_image", f"unrecognised format (starts with {data[:8].hex(' ')})"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        fmt = _magic_format(data[:16]) or "image"
        raise _broken(fmt, f"unreadable header: {exc}") from None

    if image.format not in FORMATS:
        raise ImageRejected(
            "unsupported_format",
            f"{image.format} images are not supported (use one of {', '.join(sorted(FORMATS))})",
        )
    width, height = image.size
    _check_geometry(width, height, limits.max_pixels)
    mode = image.mode
    fmt = image.format

    _reduce(image, max_side)
    _check_decode_bytes(image, limits.max_bytes)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, zlib.error, EOFError) as exc:
        raise _broken(fmt, str(exc) or type(exc).__name__) from None

    decoded_size = image.size
    # A broken EXIF block leaves the pixels as decoded: orientation is a courtesy, not a need.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(image, in_place=True)
    if image.size != decoded_size:  # rotated by 90 degrees
        width, height = height, width
    return DecodedImage(_to_rgb(image), width, height, fmt, mode)
