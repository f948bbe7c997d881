"""The built-in demo: scikit-learn's handwritten digits as PNG files in ImageFolder layout.

1,797 real 8x8 scans of the digits 0-9. Digits 0-4 form the pretraining corpus, digits 5-9 the
target task. A few deliberately broken files show verification rejecting something. The files
are committed under ``data/demo``; this module is how they were made and can remake them.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

PRETRAIN_DIGITS = range(0, 5)
TARGET_DIGITS = range(5, 10)


def digit_png(pixels: np.ndarray) -> bytes:
    """One 8x8 scan (64 values, 0-16, any shape) as the bytes of an 8-bit grayscale PNG."""
    gray = np.round(pixels.reshape(8, 8) * (255 / 16)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def write_demo(root: Path) -> dict[str, int]:
    """Write the demo under ``root`` (``pretrain/`` and ``target/``); return files per role.

    Existing files of the same names are overwritten; others are left alone. Raises OSError
    when ``root`` is not writable.
    """
    digits = load_digits()
    counts = {"pretrain": 0, "target": 0}
    first_png: dict[str, bytes] = {}
    for index, (pixels, digit) in enumerate(zip(digits.data, digits.target, strict=True)):
        role = "pretrain" if digit in PRETRAIN_DIGITS else "target"
        folder = root / role / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        data = digit_png(pixels)
        (folder / f"digit-{index:04d}.png").write_bytes(data)
        first_png.setdefault(role, data)
        counts[role] += 1
    counts["target"] += _write_broken_files(root / "target", first_png["target"])
    # The same scan saved twice in one class: kept once, the copy reported as a duplicate.
    duplicate_of = sorted((root / "pretrain" / "3").iterdir())[0]
    (root / "pretrain" / "3" / "rescan.png").write_bytes(duplicate_of.read_bytes())
    counts["pretrain"] += 1
    return counts


def _write_broken_files(target: Path, valid_png: bytes) -> int:
    broken = {
        target / "5" / "truncated.png": _truncated_png(),
        target / "6" / "empty.png": b"",
        target / "7" / "notes.png": b"scanner log: page 12 skipped\n",
    }
    for path, data in broken.items():
        path.write_bytes(data)
    return len(broken)


def _truncated_png() -> bytes:
    # A larger noisy image so the cut falls inside the compressed pixel data, past the header:
    # Pillow opens it and reads its size, and only a full decode notices.
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise, mode="L").save(buffer, format="PNG")
    data = buffer.getvalue()
    return data[: len(data) // 2]
