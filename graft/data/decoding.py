"""Opening image bytes defensively: full-decode checks and decoding for training.

``Image.verify()`` only parses headers and passes truncated files, so every check here is a
full decode of the (first) frame.

Pillow's decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) stays on: the library never
changes that process-wide setting. :func:`check_image_bytes` enforces its own ``max_pixels``
from the header before decoding, and gives a file that Pillow's guard refuses the verdict
``too_large`` too. Entry points that want Pillow's limit to match theirs call
:func:`set_pixel_limit`.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


@dataclass(frozen=True)
class ImageCheck:
    """What one file's bytes turned out to be.

    ``verdict`` is ``"accepted"`` or a rejection verdict of graft.data.schemas.VERDICTS, with
    its ``reason`` (empty when accepted). Width and height (pixels), mode and format come from
    the header, and are None when the header could not be read.
    """

    verdict: str
    reason: str
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    format: str | None = None


def set_pixel_limit(max_pixels: int) -> None:
    """Set Pillow's decompression-bomb limit to ``max_pixels`` (width x height) for the process.

    For entry points only (a stage's ``main``, a command): it changes process-wide state. It
    also silences ``Image.DecompressionBombWarning``, which Pillow issues for images between
    the limit and twice the limit: :func:`check_image_bytes` gives those a verdict instead.
    Raises ValueError when ``max_pixels`` is below 1.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def pillow_refuses_above() -> int | None:
    """Pixels (width x height) above which Pillow refuses to open an image in this process.

    Twice ``Image.MAX_IMAGE_PIXELS`` (Pillow only warns between the limit and twice the limit),
    or None when the guard is switched off.
    """
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * limit


def check_image_bytes(data: bytes, *, min_side: int, max_pixels: int) -> ImageCheck:
    """Classify raw file bytes: zero-byte, not an image, too large/small, corrupt or accepted.

    ``min_side`` (pixels) bounds the shorter side from below, ``max_pixels`` (width x height)
    the area from above; both are checked from the header, before any pixel is decoded. A file
    that Pillow's own decompression-bomb guard refuses is ``too_large`` as well (Pillow warns,
    with ``Image.DecompressionBombWarning``, about one between its limit and twice the limit
    unless :func:`set_pixel_limit` silenced that). Never raises for bad bytes: every problem is
    a verdict. Thread-safe: it reads Pillow's limit and changes no process-wide state.
    """
    if not data:
        return ImageCheck("zero_byte", "file is empty")
    found: dict[str, Any] = {}  # what the header told us, kept even when decoding fails
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            found = dict(width=width, height=height, mode=image.mode, format=image.format)
            if width * height > max_pixels:
                return ImageCheck("too_large", _over_max_pixels(found, max_pixels), **found)
            if min(width, height) < min_side:
                reason = f"shorter side {min(width, height)} px < min_side {min_side}"
                return ImageCheck("too_small", reason, **found)
            image.load()  # full decode of the first frame: catches truncation
    except UnidentifiedImageError:
        return ImageCheck("not_image", "not a format Pillow can identify")
    except Image.DecompressionBombError as error:
        return _refused_by_pillow(found, max_pixels, error)
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        return ImageCheck("corrupt", f"decode failed: {error}", **found)
    return ImageCheck("accepted", "", **found)


def _over_max_pixels(found: dict[str, Any], max_pixels: int) -> str:
    width, height = found["width"], found["height"]
    return f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels}"


def _refused_by_pillow(
    found: dict[str, Any], max_pixels: int, error: Image.DecompressionBombError
) -> ImageCheck:
    # Image.open refuses before it hands over the image, so the header's facts are not known
    # here; Pillow's message gives the pixel count and its limit.
    if found and found["width"] * found["height"] > max_pixels:  # refused while decoding
        return ImageCheck("too_large", _over_max_pixels(found, max_pixels), **found)
    refuses_above = pillow_refuses_above()
    limit = f" of {refuses_above} pixels (2 x Image.MAX_IMAGE_PIXELS)" if refuses_above else ""
    reason = f"refused by Pillow's decompression-bomb limit{limit}; max_pixels is {max_pixels}"
    return ImageCheck("too_large", f"{reason}: {error}", **found)


def to_rgb(image: Image.Image) -> Image.Image:
    """Normalise any decodable mode to 8-bit RGB.

    16-bit and 32-bit grayscale are scaled by their actual range (Pillow's own conversion
    clips them to white); transparency is composited onto black, so a transparent pixel
    carries no signal whatever colour it happens to store. Returns a new RGB image of the same
    size; raises OSError when the image's data cannot be decoded.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        gray = np.clip(values * (255.0 / peak), 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: Path, size: int) -> np.ndarray:
    """Decode as an RGB ``size`` x ``size`` uint8 array (H, W, 3), EXIF rotation applied.

    Multi-frame files (GIF, TIFF, ...) contribute their first frame. ``size`` is in pixels;
    the whole image is resized, not cropped. Raises OSError when the file cannot be read or
    decoded, and Image.DecompressionBombError when it exceeds Pillow's limit.
    """
    with Image.open(path) as image:
        image.seek(0)
        upright = ImageOps.exif_transpose(image)
        rgb = to_rgb(upright)
        # Resize the whole image to a square (no crop), so nothing a label depends on is cut.
        resized = rgb.resize((size, size), Image.Resampling.BILINEAR)
        return np.array(resized, dtype=np.uint8)  # a writable copy, as torch expects
