"""The committed demo is what graft.data.demo makes from scikit-learn's digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from helpers import DEMO
from PIL import Image

from graft.data.demo import write_demo
from graft.data.image_check import check_image_bytes

LIMITS = {"min_side": 8, "max_pixels": 1_000_000}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def test_committed_demo_matches_the_generator(tmp_path: Path) -> None:
    counts = write_demo(tmp_path)
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(DEMO) for p in DEMO.rglob("*") if p.is_file())
    assert made == committed
    assert counts == {"pretrain": 902, "target": 899}
    assert {p.parts[0] for p in made} == {"pretrain", "target"}
    assert {p.parts[1] for p in made if p.parts[0] == "target"} == {"5", "6", "7", "8", "9"}
    for relative in made:
        made_check = check_image_bytes((tmp_path / relative).read_bytes(), **LIMITS)
        committed_check = check_image_bytes((DEMO / relative).read_bytes(), **LIMITS)
        assert made_check.verdict == committed_check.verdict, relative
        if made_check.verdict == "accepted":
            # Compare decoded pixels: PNG bytes may differ between zlib builds.
            assert np.array_equal(pixels(tmp_path / relative), pixels(DEMO / relative)), relative
        else:
            assert relative.name in {"truncated.png", "empty.png", "notes.png"}
