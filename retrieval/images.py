"""Opening user images safely: any source, any PIL mode, EXIF orientation, pixel limits, clear errors."""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

#: default decompression-bomb limit (pixels); override per call or with IVL_MAX_PIXELS
DEFAULT_MAX_PIXELS = int(os.environ.get("IVL_MAX_PIXELS", 100_000_000))

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
HEIF_EXTENSIONS = frozenset({".heic", ".heif"})

try:  # optional HEIC/HEIF support
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF_AVAILABLE = True
except ImportError:
    HEIF_AVAILABLE = False


class ImageDecodeError(ValueError):
    """The input is not a decodable image. ``reason`` is a short machine-readable tag."""

    def __init__(self, message: str, reason: str = "undecodable") -> None:
        super().__init__(message)
        self.reason = reason


class ImageTooLarge(ImageDecodeError):
    """The image has more pixels than the configured limit (decompression-bomb guard)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="too_large")


def supported_extensions() -> frozenset[str]:
    """File extensions the folder walker should pick up (HEIC only when pillow-heif is installed)."""
    return IMAGE_EXTENSIONS | HEIF_EXTENSIONS if HEIF_AVAILABLE else IMAGE_EXTENSIONS


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB the way the official code does (alpha dropped, not composited).

    Modes PIL cannot convert to RGB directly (``I;16``, ``I``, ``F``) are rescaled to 8 bit first.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        lo, hi = image.getextrema()
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        image = image.point(lambda v: (v - lo) * scale).convert("L")
    return image.convert("RGB")


def open_image(
    source: str | os.PathLike | bytes | BinaryIO,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    exif_transpose: bool = True,
    convert_rgb: bool = True,
) -> Image.Image:
    """Decode an image fully (first frame), apply EXIF orientation, convert to RGB.

    Raises :class:`ImageDecodeError` (reason ``empty``, ``undecodable``, ``truncated``, ``unreadable``)
    or :class:`ImageTooLarge`; never returns a half-decoded image.
    """
    label = str(source) if isinstance(source, (str, os.PathLike)) else "<bytes>"
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise ImageDecodeError("empty image data (0 bytes)", reason="empty")
        fp: BinaryIO | str | os.PathLike = io.BytesIO(source)
    else:
        fp = source
        if isinstance(source, (str, os.PathLike)):
            try:
                if Path(source).stat().st_size == 0:
                    raise ImageDecodeError(f"{label}: empty file (0 bytes)", reason="empty")
            except OSError as exc:
                raise ImageDecodeError(f"{label}: cannot read file: {exc}", reason="unreadable") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(fp)
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLarge(
                    f"{label}: image has {width}x{height} = {width * height} pixels, "
                    f"over the limit of {max_pixels}"
                )
            image.seek(0)
            image.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"{label}: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"{label}: not a recognised image format", reason="undecodable") from exc
    except OSError as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else "unreadable"
        raise ImageDecodeError(f"{label}: cannot decode image ({exc})", reason=reason) from exc
    except (ValueError, SyntaxError, EOFError) as exc:  # malformed headers raise these in some plugins
        raise ImageDecodeError(f"{label}: corrupt image ({exc})", reason="undecodable") from exc
    if exif_transpose:
        try:
            image = ImageOps.exif_transpose(image)
        except (OSError, ValueError, SyntaxError) as exc:  # broken EXIF block: keep the pixels as stored
            logger.warning("%s: ignoring unreadable EXIF orientation (%s)", label, exc)
    return to_rgb(image) if convert_rgb else image
