"""Builders of the odd files real folders hold, one per kind of fault, rebuilt from their specs.

The real-world fixtures (``../shared/fixtures/real-world``) are not part of the repository, so
each kind is rebuilt here, byte by byte where Pillow cannot write it.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image, PngImagePlugin


def chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, body and the CRC of type + body."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int, *, color_type: int = 0) -> bytes:
    """A PNG whose header says ``width`` x ``height`` (8 bits; gray, or RGBA with 6), holding
    almost no pixel data: judged by its header, or by what decoding it costs."""
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(64)))
        + chunk(b"IEND", b"")
    )


def icns_holding(embedded: bytes) -> bytes:
    """An Apple ICNS container whose only 256x256 entry (``ic08``) is ``embedded``: its own
    directory says 256x256 whatever the embedded image's header says."""
    entry = b"ic08" + struct.pack(">I", 8 + len(embedded)) + embedded
    return b"icns" + struct.pack(">I", 8 + len(entry)) + entry


def dds_unimplemented_pixel_format() -> bytes:
    """A DDS header (4x4, no FourCC, no RGB flags) whose pixel format Pillow does not implement."""
    header = bytearray(128)
    header[0:4] = b"DDS "
    struct.pack_into("<IIII", header, 4, 124, 0x1007, 4, 4)  # size, flags, height, width
    struct.pack_into("<II", header, 76, 32, 0)  # pixel format: size 32, flags 0 (nothing known)
    struct.pack_into("<I", header, 108, 0x1000)  # caps: texture
    return bytes(header) + bytes(16)


def png_with_bad_crc() -> bytes:
    """A valid 32x32 PNG whose IDAT chunk's CRC has one bit flipped."""
    buffer = io.BytesIO()
    Image.fromarray(gradient(32, 32).astype(np.uint8)).convert("RGB").save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[start : start + 4])[0]
    data[start + 8 + length + 3] ^= 0x01  # last byte of the CRC after the chunk's body
    return bytes(data)


def png_with_broken_header() -> bytes:
    """A PNG signature followed by an IHDR chunk of the wrong length: no plugin accepts it."""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", b"\x00\x00") + chunk(b"IEND", b"")


def jpeg_with_bad_exif(*, orientation: int = 6) -> bytes:
    """A valid 40x20 JPEG whose EXIF has an orientation and XResolution stored as text.

    Pillow's ``ImageOps.exif_transpose`` raises TypeError on it (it does arithmetic on the
    rational), which is what killed training on such files.
    """
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), (200, 40, 40)).save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    entries = [
        struct.pack("<HHI", 0x0112, 3, 1) + struct.pack("<HH", orientation, 0),  # SHORT
        struct.pack("<HHI", 0x011A, 2, 3) + b"72\x00\x00",  # XResolution as ASCII "72"
    ]
    ifd = struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0)
    tiff = b"II*\x00" + struct.pack("<I", 8) + ifd
    app1 = b"Exif\x00\x00" + tiff
    segment = b"\xff\xe1" + struct.pack(">H", 2 + len(app1)) + app1
    return jpeg[:2] + segment + jpeg[2:]


def gradient(width: int, height: int, *, peak: int = 255) -> np.ndarray:
    """A left-to-right gradient from 0 to ``peak`` as uint16 (height, width)."""
    row = np.linspace(0, peak, width).round().astype(np.uint16)
    return np.tile(row, (height, 1))


def sixteen_bit_gray(values: np.ndarray, format: str) -> bytes:
    """``values`` (uint16, 2-D) as a 16-bit grayscale PNG, TIFF or PGM."""
    if format == "PGM":  # written by hand: binary PGM with maxval 65535, big-endian samples
        height, width = values.shape
        return f"P5 {width} {height} 65535\n".encode() + values.astype(">u2").tobytes()
    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buffer, format=format)  # mode I;16
    return buffer.getvalue()


def sixteen_bit_rgb_png(values: np.ndarray) -> bytes:
    """``values`` (uint16, (H, W, 3)) as a 48-bit RGB PNG, written by hand (Pillow cannot)."""
    height, width, _ = values.shape
    big_endian = values.astype(">u2")
    rows = b"".join(b"\x00" + big_endian[y].tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def png_with_text(text_bytes: int) -> bytes:
    """A valid 16x16 PNG carrying one compressed text chunk of ``text_bytes`` bytes."""
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * text_bytes, zip=True)
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 120, 30)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def phone_photo(format: str) -> bytes:
    """A 64x48 photo-like image as HEIC or AVIF (``format``: "HEIF" or "AVIF")."""
    from pillow_heif import register_heif_opener  # the HEIF encoder; AVIF is Pillow's own

    register_heif_opener()
    pixels = np.dstack([gradient(64, 48), gradient(64, 48)[:, ::-1], np.full((48, 64), 90)])
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format=format)
    return buffer.getvalue()
