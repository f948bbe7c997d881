"""Pillow's decompression-bomb guard stays on; files it refuses get a verdict, not a crash."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from graft.data.decoding import PillowLimits, configure_pillow, pillow_refuses_above
from graft.data.image_check import check_image_bytes
from graft.data.verify import CHECKER_VERSION, CheckSettings

PILLOW_DEFAULT = 89_478_485  # Image.MAX_IMAGE_PIXELS as Pillow ships it


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` 8-bit gray pixels, with almost no data.

    Its pixel data is a few compressed zero bytes, far too few: decoding it fails, so a verdict
    other than ``corrupt`` shows that it was judged from the header alone.
    """
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(bytes(64)))
        + _chunk(b"IEND", b"")
    )


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width), 128, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def pillow_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's shipped limit for the test, whatever the process had; restored afterwards."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PILLOW_DEFAULT)


def test_importing_the_library_leaves_pillows_guard_alone() -> None:
    code = (
        "from PIL import Image; shipped = Image.MAX_IMAGE_PIXELS; "
        "import graft.data.decoding, graft.data.image_check, graft.data.verify, graft.data.ingest, "
        "graft.evaluation.misclassified; "
        "print(shipped, Image.MAX_IMAGE_PIXELS)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == [str(PILLOW_DEFAULT)] * 2


def test_the_crafted_header_is_what_pillow_reads_and_cannot_decode() -> None:
    # The premise of the tests below: the size is in the header, and the data would not decode.
    small = bomb_png(300, 200)
    with Image.open(io.BytesIO(small)) as image:
        assert image.size == (300, 200)
    check = check_image_bytes(small, min_side=8, max_pixels=10**9)
    assert check.verdict == "corrupt"
    assert len(bomb_png(20_000, 20_000)) < 200


@pytest.mark.usefixtures("pillow_default")
def test_a_file_pillow_refuses_is_too_large_naming_pillows_limit() -> None:
    filters = list(warnings.filters)
    # 400,000,000 pixels: within max_pixels, but over twice Pillow's limit (178,956,970).
    check = check_image_bytes(bomb_png(20_000, 20_000), min_side=8, max_pixels=500_000_000)
    assert check.verdict == "too_large"  # not corrupt: judged without decoding
    assert check.reason.startswith(
        "refused by Pillow's decompression-bomb limit of 178956970 pixels"
        " (2 x Image.MAX_IMAGE_PIXELS); max_pixels is 500000000: "
    )
    assert "400000000 pixels" in check.reason  # Pillow's own message gives the size
    assert warnings.filters == filters  # the check leaves the process's warning filters alone


@pytest.mark.usefixtures("pillow_default")
def test_configure_pillow_gives_verdicts_not_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PngImagePlugin, "MAX_TEXT_CHUNK", PngImagePlugin.MAX_TEXT_CHUNK)
    monkeypatch.setattr(PngImagePlugin, "MAX_TEXT_MEMORY", PngImagePlugin.MAX_TEXT_MEMORY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        configure_pillow(PillowLimits(1_000, png_max_text_chunk=500, png_max_text_memory=900))
        assert Image.MAX_IMAGE_PIXELS == 1_000 and pillow_refuses_above() == 2_000
        assert (PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY) == (500, 900)
        limits = {"min_side": 8, "max_pixels": 1_000}
        assert check_image_bytes(png(30, 30), **limits).verdict == "accepted"
        between = check_image_bytes(png(40, 40), **limits)  # Pillow would only warn
        beyond = check_image_bytes(bomb_png(100, 100), **limits)  # Pillow refuses to open
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert (between.verdict, between.reason) == (
        "too_large",
        "40x40 = 1600 pixels > max_pixels 1000",
    )
    assert beyond.verdict == "too_large"
    assert "Pillow's decompression-bomb limit of 2000 pixels" in beyond.reason
    with pytest.raises(ValueError, match="every Pillow limit must be >= 1"):
        configure_pillow(PillowLimits(0))


def test_cache_key_names_every_setting_behind_a_verdict_but_the_time_limit() -> None:
    base = CheckSettings(min_side=8, max_pixels=2_000)
    assert base.key() == (
        f"v{CHECKER_VERSION}:min_side=8:max_pixels=2000:png_max_text_chunk=1048576"
        ":png_max_text_memory=67108864:decode_memory_mb=2048"
    )
    changed = [
        CheckSettings(9, 2_000),
        CheckSettings(8, 2_001),
        CheckSettings(8, 2_000, decode_memory_mb=1024),
        CheckSettings(8, 2_000, png_max_text_chunk=1),
        CheckSettings(8, 2_000, png_max_text_memory=1),
    ]
    assert len({base.key(), *(settings.key() for settings in changed)}) == 1 + len(changed)
    # timeout verdicts depend on the machine's load: never cached, so not in the key
    assert CheckSettings(8, 2_000, decode_timeout_s=1).key() == base.key()
