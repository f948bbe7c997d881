"""Verification: a full decode catches what header checks miss; every verdict has its reason."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.verify import FileRecord, verify_folder


def image_bytes(
    fmt: str, size: tuple[int, int] = (32, 24), seed: int = 0, mode: str = "RGB"
) -> bytes:
    channels = {"RGB": 3, "L": 1}[mode]
    shape = (size[1], size[0], channels) if channels > 1 else (size[1], size[0])
    pixels = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def put(root: Path, relative: str, data: bytes) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def verdicts(records: list[FileRecord]) -> dict[str, tuple[str, str]]:
    return {record.path: (record.verdict, record.reason) for record in records}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    jpeg = image_bytes("JPEG", size=(64, 48), seed=1)
    put(root, "cat/good.jpg", jpeg)
    put(root, "cat/rescan.jpg", jpeg)  # same content, same class: a duplicate
    put(root, "cat/truncated.jpg", jpeg[: len(jpeg) * 2 // 3])
    put(root, "cat/empty.jpg", b"")
    put(root, "cat/readme.jpg", b"this is not an image\n")
    put(root, "cat/tiny.png", image_bytes("PNG", size=(4, 4), seed=2))
    put(root, "cat/png-named.jpg", image_bytes("PNG", seed=3))  # valid, wrong extension
    put(root, "cat/gray.png", image_bytes("PNG", seed=4, mode="L"))
    put(root, "dog/good.png", image_bytes("PNG", seed=5))
    shared = image_bytes("PNG", seed=6)
    put(root, "dog/both.png", shared)
    put(root, "cat/both.png", shared)  # same content in two classes: a label conflict
    put(root, "cat/.DS_Store", b"\x00\x00")
    put(root, "dog/Thumbs.db", b"\x00")
    put(root, "stray.jpg", jpeg)  # not inside a class folder
    (root / "dog" / "gone.jpg").symlink_to(root / "dog" / "missing-target.jpg")
    return root


def test_every_file_gets_a_verdict_with_reason(folder: Path) -> None:
    report = verify_folder(folder, min_side=8, max_pixels=10_000)
    found = verdicts(report.records)
    assert found["cat/good.jpg"] == ("accepted", "")
    assert found["cat/png-named.jpg"] == ("accepted", "")
    assert found["cat/gray.png"] == ("accepted", "")
    assert found["dog/good.png"] == ("accepted", "")
    assert found["cat/rescan.jpg"] == ("duplicate", "same content as cat/good.jpg")
    assert found["cat/truncated.jpg"][0] == "corrupt"
    assert found["cat/empty.jpg"] == ("zero_byte", "file is empty")
    assert found["cat/readme.jpg"][0] == "not_image"
    assert found["cat/tiny.png"][0] == "too_small" and "min_side 8" in found["cat/tiny.png"][1]
    assert found["cat/both.png"][0] == "label_conflict"
    assert found["dog/both.png"][0] == "label_conflict"
    assert "'cat', 'dog'" in found["dog/both.png"][1]
    assert found["dog/gone.jpg"][0] == "unreadable"
    assert report.skipped == {"hidden or system file": 2, "file outside a class folder": 1}
    assert len(report.records) == 12


def test_truncated_jpeg_passes_header_check_but_fails_full_decode(folder: Path) -> None:
    # The reason this project decodes fully: Image.verify() accepts this file.
    with Image.open(folder / "cat" / "truncated.jpg") as image:
        image.verify()
    report = verify_folder(folder, min_side=8, max_pixels=10_000)
    assert verdicts(report.records)["cat/truncated.jpg"][0] == "corrupt"


def test_too_large_is_rejected_before_decoding(tmp_path: Path) -> None:
    root = tmp_path / "images"
    big = image_bytes("PNG", size=(200, 100))
    put(root, "a/big.png", big)
    record = verify_folder(root, min_side=8, max_pixels=19_999).records[0]
    assert record.verdict == "too_large"
    assert "20000 pixels > max_pixels 19999" in record.reason
    assert (record.width, record.height) == (200, 100)


def test_accepted_records_carry_what_the_manifest_needs(folder: Path) -> None:
    report = verify_folder(folder, min_side=8, max_pixels=10_000)
    good = next(r for r in report.records if r.path == "cat/good.jpg")
    data = (folder / "cat" / "good.jpg").read_bytes()
    assert (good.width, good.height, good.mode, good.format) == (64, 48, "RGB", "JPEG")
    assert good.bytes == len(data) and good.sha256 is not None and len(good.sha256) == 64


def test_source_folder_is_never_modified(folder: Path) -> None:
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}
    verify_folder(folder, min_side=8, max_pixels=10_000)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}
    assert before == after
