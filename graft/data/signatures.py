"""Image formats told apart by their first bytes, for files Pillow cannot identify.

When no Pillow plugin accepts a file, its signature says which of two things happened: a
format Pillow reads whose header is broken (``corrupt``), or a format nothing here decodes
(``unsupported``, with what would decode it). A file with no known signature is not an image.
Signatures are from each format's specification (PNG, JFIF/EXIF, GIF, RIFF/WebP, TIFF, BMP,
ISO BMFF ``ftyp`` brands for HEIF and AVIF, JPEG XL, JPEG 2000, PSD, DDS, ICNS, QOI).
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import features


@dataclass(frozen=True)
class Signature:
    """A format recognised from its first bytes.

    ``name`` is the format as people know it; ``pillow_reads`` says whether the Pillow of
    this process has a plugin for it, and ``decoder`` what decodes it when not.
    """

    name: str
    pillow_reads: bool
    decoder: str


# Leading bytes -> format name, for formats Pillow reads whenever it is installed.
_PILLOW_FORMATS = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
    (b"8BPS", "PSD"),
    (b"DDS ", "DDS"),
    (b"icns", "ICNS"),
    (b"qoif", "QOI"),
    (b"\x00\x00\x01\x00", "ICO"),
)
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_JPEG2000 = (b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")
_JPEG_XL = (b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")


def sniff(data: bytes) -> Signature | None:
    """The image format ``data`` starts like, or None when it starts like no known image."""
    for prefix, name in _PILLOW_FORMATS:
        if data.startswith(prefix):
            return Signature(name, True, "Pillow")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return Signature("WEBP", _built_with("webp"), "Pillow built with libwebp")
    brand = data[8:12] if data[4:8] == b"ftyp" else b""
    if brand in _HEIF_BRANDS:
        return Signature("HEIF", _heif_registered(), "the pillow-heif plugin")
    if brand in _AVIF_BRANDS:
        return Signature("AVIF", _built_with("avif"), "Pillow built with libavif")
    if data.startswith(_JPEG2000):
        return Signature("JPEG2000", _built_with("jpg_2000"), "Pillow built with OpenJPEG")
    if data.startswith(_JPEG_XL):
        return Signature("JPEG XL", False, "a JPEG XL plugin such as pillow-jxl-plugin")
    return None


def _built_with(feature: str) -> bool:
    return bool(features.check(feature))


def _heif_registered() -> bool:
    from PIL import Image

    Image.init()
    return "HEIF" in Image.OPEN
