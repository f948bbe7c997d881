"""Judging one file's bytes: every problem a verdict, never an exception.

``Image.verify()`` only parses headers and passes truncated files, so the check is a full
decode of the (first) frame through training's own path (graft.data.decoding.upright_rgb:
EXIF rotation, mode conversion), then a perceptual hash for near-duplicates. Formats that
carry checksums (PNG's chunk CRCs) are checked against them as well. Files Pillow cannot
identify are told apart by their signature (graft.data.signatures).
"""

from __future__ import annotations

import io
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from graft.data.decoding import pillow_refuses_above, resize_square, upright_rgb
from graft.data.near_duplicates import perceptual_hash
from graft.data.signatures import sniff


class ImageCheck(NamedTuple):
    """What one file's bytes turned out to be.

    ``verdict`` is ``"accepted"`` or a rejection verdict of graft.data.schemas.VERDICTS, with
    its ``reason``; an accepted file's ``reason`` is empty or a warning (for instance an EXIF
    orientation that could not be applied). Width and height (pixels), mode and format come
    from the header, and are None when the header could not be read. ``phash`` is an accepted
    image's 64-bit perceptual hash (16 hex digits, graft.data.near_duplicates).

    A named tuple, not a dataclass: a re-run loads one per known content from the ingest
    cache, and at 250,000 images a frozen dataclass's construction took a second.
    """

    verdict: str
    reason: str
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    format: str | None = None
    phash: str | None = None


def check_image_bytes(data: bytes, *, min_side: int, max_pixels: int) -> ImageCheck:
    """Classify raw file bytes: every problem is a verdict, never an exception.

    ``min_side`` (pixels) bounds the shorter side from below, ``max_pixels`` (width x height)
    the area from above; both are checked from the header, before any pixel is decoded. Then
    the checksums the format carries are checked, the first frame is fully decoded through
    training's path (graft.data.decoding.upright_rgb) and hashed. Verdicts: ``zero_byte``,
    ``not_image`` (no known image signature), ``corrupt`` (a known signature whose header,
    checksums or data are broken), ``unsupported`` (a format Pillow recognises but cannot
    decode here; the reason says what would), ``too_small``, ``too_large`` (the header, or
    one of Pillow's limits: the reason names it) and ``accepted``. A ``MemoryError`` is left
    to the caller, which knows the memory budget it ran under. Uses Pillow's process-wide
    limits (graft.data.decoding.configure_pillow) and changes no process-wide state.
    """
    return _inspect(data, min_side, max_pixels, size=None)[0]


def decode_checked(
    data: bytes, *, min_side: int, max_pixels: int, size: int
) -> tuple[ImageCheck, np.ndarray | None]:
    """:func:`check_image_bytes`'s verdict on ``data`` and, for an accepted image, its pixels
    as training sees them (graft.data.decoding.decode_square): a writable uint8 array of shape
    (``size``, ``size``, 3), HWC, RGB; None for any other verdict.

    One decode serves both, so a prediction sees exactly the pixels the verdict judged. The
    check's ``phash`` is left None (nothing downstream of a prediction needs it). Raises
    MemoryError as check_image_bytes does, and nothing else.
    """
    return _inspect(data, min_side, max_pixels, size=size)


def _inspect(
    data: bytes, min_side: int, max_pixels: int, *, size: int | None
) -> tuple[ImageCheck, np.ndarray | None]:
    """The check, and with ``size`` the accepted image's resized pixels instead of its phash."""
    if not data:
        return ImageCheck("zero_byte", "file is empty"), None
    found: dict[str, Any] = {}  # what the header told us, kept even when decoding fails
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            found = dict(width=width, height=height, mode=image.mode, format=image.format)
            if width * height > max_pixels:
                return ImageCheck("too_large", _over_max_pixels(found, max_pixels), **found), None
            if min(width, height) < min_side:
                reason = f"shorter side {min(width, height)} px < min_side {min_side}"
                return ImageCheck("too_small", reason, **found), None
            broken = _checksum_problem(data)
            if broken:
                return ImageCheck("corrupt", broken, **found), None
            rgb, warning = upright_rgb(image)  # a full decode of the first frame, and more
            if size is not None:
                pixels = np.array(resize_square(rgb, size), dtype=np.uint8)
                return ImageCheck("accepted", warning, **found), pixels
            # The hash's own resize stands for training's: Pillow's resampling of decoded
            # pixels cannot fail where decoding and conversion did not.
            return ImageCheck("accepted", warning, **found, phash=perceptual_hash(rgb)), None
    except UnidentifiedImageError:
        return _unidentified(data), None
    except Image.DecompressionBombError as error:
        return _refused_by_pillow(found, max_pixels, error), None
    except MemoryError:
        raise
    except Exception as error:  # any decoder's failure is this file's verdict, nothing more
        return _failed(error, found, data), None


def _checksum_problem(data: bytes) -> str:
    """Why the checksums and structure ``data``'s format carries do not hold; empty if they do.

    ``Image.verify()`` checks what a format can check without decoding (PNG: every chunk's
    CRC), which ``load()`` skips. It needs an image of its own: it leaves the one it ran on
    unusable.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except MemoryError:
        raise
    except Exception as error:
        return f"checksum or structure check failed: {type(error).__name__}: {error}"
    return ""


def _unidentified(data: bytes) -> ImageCheck:
    signature = sniff(data)
    if signature is None:
        return ImageCheck("not_image", "not a format Pillow can identify")
    if signature.pillow_reads:
        reason = f"{signature.name} signature, but Pillow cannot read its header"
        return ImageCheck("corrupt", reason, format=signature.name)
    reason = f"{signature.name}: no decoder for it here ({signature.decoder})"
    return ImageCheck("unsupported", reason, format=signature.name)


def _failed(error: Exception, found: dict[str, Any], data: bytes) -> ImageCheck:
    described = f"{type(error).__name__}: {error}"
    text = str(error)
    if "MAX_TEXT_CHUNK" in text:
        reason = f"a PNG text chunk is larger than ingest.png_max_text_chunk ({described})"
        return ImageCheck("too_large", reason, **found)
    if "MAX_TEXT_MEMORY" in text or "Too much memory used in text chunks" in text:
        reason = f"the PNG's text is larger than ingest.png_max_text_memory ({described})"
        return ImageCheck("too_large", reason, **found)
    signature = sniff(data)
    if not found and signature is not None:  # refused at open: only the signature names it
        found = {"format": signature.name}
    name = found.get("format") or "this format"
    if isinstance(error, NotImplementedError):
        reason = f"{name}: Pillow recognises this variant but cannot decode it ({described})"
        return ImageCheck("unsupported", reason, **found)
    if isinstance(error, OSError) and text.startswith("decoder ") and "not available" in text:
        reason = f"{name}: this Pillow was built without its decoder ({described})"
        return ImageCheck("unsupported", reason, **found)
    return ImageCheck("corrupt", f"decode failed: {described}", **found)


def _over_max_pixels(found: dict[str, Any], max_pixels: int) -> str:
    width, height = found["width"], found["height"]
    return f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels}"


def _refused_by_pillow(
    found: dict[str, Any], max_pixels: int, error: Image.DecompressionBombError
) -> ImageCheck:
    # Pillow refuses at open (the header), or while decoding a frame, tile or embedded image
    # larger than the header says (an ICNS that says 256x256 can hold a far larger PNG).
    refuses_above = pillow_refuses_above()
    limit = f" of {refuses_above} pixels (2 x Image.MAX_IMAGE_PIXELS)" if refuses_above else ""
    reason = f"refused by Pillow's decompression-bomb limit{limit}; max_pixels is {max_pixels}"
    return ImageCheck("too_large", f"{reason}: {error}", **found)
