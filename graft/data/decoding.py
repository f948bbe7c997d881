"""Decoding images as every stage sees them: the first frame, upright, 8-bit RGB, resized.

Ingest's check (graft.data.image_check) runs :func:`upright_rgb` on every file, and training
(:func:`load_rgb`) runs it again on the files the check accepted, so an accepted file always
decodes in training.

Pillow's process-wide settings (its decompression-bomb guard, its PNG text limits, the HEIF
opener) are set only by :func:`configure_pillow`, which entry points call: nothing here
changes them on import.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from graft.config.settings import Ingest

HIGH_BIT_DEPTH_GRAY = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
COLLAPSED_LEVELS = 32  # fewer distinct 8-bit values than this after conversion: warned


@dataclass(frozen=True)
class PillowLimits:
    """Pillow's safety limits, as params set them (``ingest.*``).

    ``max_pixels`` is width x height (Pillow's decompression-bomb guard refuses above twice
    it, and graft's check above it); ``png_max_text_chunk`` is the largest decompressed PNG
    text chunk and ``png_max_text_memory`` the most text of one PNG, both in bytes.
    """

    max_pixels: int
    png_max_text_chunk: int = PngImagePlugin.MAX_TEXT_CHUNK
    png_max_text_memory: int = PngImagePlugin.MAX_TEXT_MEMORY

    @classmethod
    def of(cls, ingest: Ingest) -> PillowLimits:
        """The limits params.yaml's ``ingest`` section sets."""
        return cls(ingest.max_pixels, ingest.png_max_text_chunk, ingest.png_max_text_memory)

    def key(self) -> str:
        """The limits as text, for cache keys."""
        return (
            f"max_pixels={self.max_pixels}:png_max_text_chunk={self.png_max_text_chunk}"
            f":png_max_text_memory={self.png_max_text_memory}"
        )


def configure_pillow(limits: PillowLimits) -> None:
    """Set Pillow's limits for the process and register the HEIF/HEIC opener.

    For entry points only (a stage's ``main``, a command, a verification worker): it changes
    process-wide state. It also silences ``Image.DecompressionBombWarning``, which Pillow
    issues for images between the limit and twice the limit: ingest's check gives those a
    verdict instead (graft.data.image_check). Raises ValueError when a limit is below 1.
    """
    if min(limits.max_pixels, limits.png_max_text_chunk, limits.png_max_text_memory) < 1:
        raise ValueError(f"every Pillow limit must be >= 1, got {limits}")
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    PngImagePlugin.MAX_TEXT_CHUNK = limits.png_max_text_chunk
    PngImagePlugin.MAX_TEXT_MEMORY = limits.png_max_text_memory
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    # Imported here: registering is process-wide, and only entry points may do that.
    from pillow_heif import register_heif_opener

    register_heif_opener()


def pillow_refuses_above() -> int | None:
    """Pixels (width x height) above which Pillow refuses to open an image in this process.

    Twice ``Image.MAX_IMAGE_PIXELS`` (Pillow only warns between the limit and twice the limit),
    or None when the guard is switched off.
    """
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * limit


def upright_rgb(image: Image.Image) -> tuple[Image.Image, str]:
    """The first frame as training sees it: EXIF rotation applied, 8-bit RGB; and a warning.

    An EXIF orientation that cannot be read or applied leaves the pixels as stored, with a
    warning saying so (the file's pixels are fine; only its metadata is broken). High bit
    depth follows :func:`to_rgb`'s rule, with a warning when few grey levels survive. The
    warning is empty when there is nothing to say. ``image`` itself is decoded and rotated in
    place (no copy of its pixels). Raises OSError (or any decoder's error) when the pixels
    cannot be decoded.
    """
    image.seek(0)
    high_bit_depth = _is_high_bit_depth(image)  # before load(), which forgets the raw mode
    image.load()  # full decode of the first frame: catches truncation
    warning = ""
    try:
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of the pixels
    except Exception as error:  # a malformed EXIF block: keep the stored orientation
        problem = f"{type(error).__name__}: {error}"
        warning = f"EXIF orientation not applied, pixels kept as stored ({problem})"
    rgb = to_rgb(image, stretch=high_bit_depth)
    collapsed = _collapse(image, rgb) if high_bit_depth else ""
    return rgb, "; ".join(part for part in (warning, collapsed) if part)


def _collapse(source: Image.Image, rgb: Image.Image) -> str:
    """A warning when converting to 8 bits left few of the levels the image had; else ''.

    Few means under COLLAPSED_LEVELS where the source had more. Pillow hands 16-bit colour
    over as 8 bits already, so its own levels are all there is to count.
    """
    after = len(np.unique(np.asarray(rgb)))
    before = len(np.unique(np.asarray(source))) if source.mode in HIGH_BIT_DEPTH_GRAY else None
    if after >= COLLAPSED_LEVELS or (before is not None and before <= after):
        return ""
    had = f" of {before}" if before is not None else ""
    return f"high-bit-depth image keeps only {after}{had} levels in 8 bits"


def _is_high_bit_depth(image: Image.Image) -> bool:
    # Pillow decodes 16-bit colour (PNG, TIFF) straight to 8-bit RGB, taking each value's
    # high byte; only the raw mode of the first tile still says 16 bits.
    if image.mode in HIGH_BIT_DEPTH_GRAY:
        return True
    tiles = getattr(image, "tile", None) or []
    raw_mode = tiles[0].args if tiles else None
    raw_mode = raw_mode[0] if isinstance(raw_mode, tuple) and raw_mode else raw_mode
    return isinstance(raw_mode, str) and ";16" in raw_mode


def to_rgb(image: Image.Image, *, stretch: bool = False) -> Image.Image:
    """Normalise any decodable mode to 8-bit RGB.

    High bit depth, one rule for every format: the image's own range [min, max] is mapped
    linearly onto 0-255 (a constant image becomes black). So a 12-bit scan stored in 16 bits
    trains at full contrast whether it came as PNG, TIFF or PGM. 16- and 32-bit grayscale
    modes always follow it; 8-bit modes only with ``stretch`` (Pillow hands 16-bit colour
    over as its high bytes, so the rule then works on those). Transparency is composited
    onto black, so a transparent pixel carries no signal whatever colour it happens to store.
    Returns an RGB image of the same size (``image`` itself when it is 8-bit RGB already and
    not stretched); raises OSError when the data cannot be decoded.
    """
    if image.mode in HIGH_BIT_DEPTH_GRAY:
        gray = _stretch(np.asarray(image, dtype=np.float64))
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return Image.fromarray(_stretch(np.asarray(rgb, dtype=np.float64))) if stretch else rgb


def _stretch(values: np.ndarray) -> np.ndarray:
    """``values`` mapped linearly from their own [min, max] onto 0-255, as uint8."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - low) * (255.0 / (high - low))
    return np.clip(scaled, 0, 255).round().astype(np.uint8)


def resize_square(rgb: Image.Image, size: int) -> Image.Image:
    """``rgb`` resized, whole, to ``size`` x ``size`` pixels (bilinear; no crop, so nothing a
    label depends on is cut)."""
    return rgb.resize((size, size), Image.Resampling.BILINEAR)


def load_rgb(path: Path, size: int) -> np.ndarray:
    """Decode as an RGB ``size`` x ``size`` uint8 array (H, W, 3), as ingest's check did.

    Multi-frame files (GIF, TIFF, ...) contribute their first frame; EXIF rotation and the
    mode rule of :func:`upright_rgb`. ``size`` is in pixels. Raises OSError when the file
    cannot be read or decoded, and Image.DecompressionBombError when it exceeds Pillow's limit.
    """
    # Through decode_square, so a file and its bytes (the decoded cache) never decode apart.
    return decode_square(path.read_bytes(), size)


def decode_square(data: bytes, size: int) -> np.ndarray:
    """Decode an image file's bytes exactly as :func:`load_rgb` decodes the file.

    Returns a writable uint8 array of shape (``size``, ``size``, 3), HWC, RGB; ``size`` is in
    pixels. Raises OSError (PIL.UnidentifiedImageError among them) when ``data`` cannot be
    decoded, and Image.DecompressionBombError when it exceeds Pillow's limit.
    """
    with Image.open(io.BytesIO(data)) as image:
        rgb, _ = upright_rgb(image)  # ingest recorded the warning, if any
        return np.array(resize_square(rgb, size), dtype=np.uint8)  # writable, as torch expects
