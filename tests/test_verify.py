"""Verification: a full decode catches what header checks miss; every verdict has its reason."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import run
from PIL import Image

from graft.data.decoding import load_rgb
from graft.data.verify import CHUNK, CheckSettings, FileRecord, verify_folder
from graft.data.verify_cache import VerifyCache

SETTINGS = CheckSettings(min_side=8, max_pixels=10_000)


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
    report = verify_folder(folder, SETTINGS)
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
    report = verify_folder(folder, SETTINGS)
    assert verdicts(report.records)["cat/truncated.jpg"][0] == "corrupt"


def test_too_large_is_rejected_before_decoding(tmp_path: Path) -> None:
    root = tmp_path / "images"
    big = image_bytes("PNG", size=(200, 100))
    # Cut inside the pixel data: a decode would call it corrupt, so too_large means no decode.
    put(root, "a/big.png", big[: len(big) // 2])
    record = verify_folder(root, CheckSettings(min_side=8, max_pixels=19_999)).records[0]
    assert record.verdict == "too_large"
    assert "20000 pixels > max_pixels 19999" in record.reason
    assert (record.width, record.height) == (200, 100)


def test_accepted_records_carry_what_the_manifest_needs(folder: Path) -> None:
    report = verify_folder(folder, SETTINGS)
    good = next(r for r in report.records if r.path == "cat/good.jpg")
    data = (folder / "cat" / "good.jpg").read_bytes()
    assert (good.width, good.height, good.mode, good.format) == (64, 48, "RGB", "JPEG")
    assert good.bytes == len(data) and good.sha256 is not None and len(good.sha256) == 64


def test_source_folder_is_never_modified(folder: Path) -> None:
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}
    verify_folder(folder, SETTINGS)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}
    assert before == after


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def odd_but_valid_images() -> dict[str, bytes]:
    """Valid images in unusual forms: each must be accepted and normalised, not rejected."""
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 128))
    palette = Image.new("P", (20, 10), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    sixteen_values = np.full((10, 20), 40000, dtype=np.uint16)
    sixteen_values[:, 10:] = 20000  # its own range, 20000 to 40000, is what becomes 0 to 255
    sixteen = Image.fromarray(sixteen_values)
    rotated = Image.new("RGB", (20, 10), (0, 0, 255))
    exif = rotated.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    frames = [Image.new("L", (20, 10), v) for v in (50, 200)]
    return {
        "rgba.png": _save(rgba, "PNG"),
        "palette-transparent.png": _save(palette, "PNG", transparency=0),
        "cmyk.jpg": _save(Image.new("CMYK", (20, 10), (0, 255, 255, 0)), "JPEG"),
        "sixteen-bit.png": _save(sixteen, "PNG"),
        "exif-rotated.jpg": _save(rotated, "JPEG", exif=exif),
        "animated.gif": _save(frames[0], "GIF", save_all=True, append_images=frames[1:]),
    }


def test_unusual_valid_forms_are_accepted_and_normalised(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for name, data in odd_but_valid_images().items():
        put(root, f"odd/{name}", data)
    found = verdicts(verify_folder(root, SETTINGS).records)
    assert {verdict for verdict, _ in found.values()} == {"accepted"}, found

    def decoded(name: str) -> np.ndarray:
        return load_rgb(root / "odd" / name, size=16)

    assert decoded("sixteen-bit.png")[0, 0].tolist() == [255, 255, 255]  # its maximum
    assert decoded("sixteen-bit.png")[0, -1].tolist() == [0, 0, 0]  # its minimum
    assert decoded("rgba.png")[0, 0].tolist() == [128, 0, 0]  # half-transparent red on black
    assert decoded("palette-transparent.png")[0, 0].tolist() == [200, 10, 10]
    assert decoded("animated.gif")[0, 0].tolist() == [50, 50, 50]  # first frame
    assert decoded("cmyk.jpg")[0, 0, 0] > 200  # cyan-free, magenta-free: red
    with Image.open(root / "odd" / "exif-rotated.jpg") as image:
        assert image.size == (20, 10)
    upright = load_rgb(root / "odd" / "exif-rotated.jpg", size=16)
    assert upright.shape == (16, 16, 3)


def test_exif_rotation_is_applied_when_decoding(tmp_path: Path) -> None:
    left_white = np.zeros((10, 20), dtype=np.uint8)
    left_white[:, :10] = 255
    image = Image.fromarray(left_white).convert("RGB")
    exif = image.getexif()
    exif[0x0112] = 6
    path = put(tmp_path, "a/x.png", _save(image, "PNG", exif=exif))
    pixels = load_rgb(path, size=20)
    # Rotated 90 degrees clockwise, the white left half becomes the top half.
    assert pixels[2, 10, 0] > 200 and pixels[17, 10, 0] < 50


def test_names_with_spaces_unicode_and_invalid_utf8(tmp_path: Path) -> None:
    root = tmp_path / "images"
    put(root, "snow leopard/ünïcødé 雪豹.png", image_bytes("PNG", seed=7))
    raw = os.path.join(os.fsencode(root), b"caf\xe9", b"latin-1 \xff.png")
    os.makedirs(os.path.dirname(raw))
    with open(raw, "wb") as stream:
        stream.write(image_bytes("PNG", seed=8))
    records = verify_folder(root, SETTINGS).records
    assert [(r.label, r.path, r.verdict) for r in records] == [
        ("caf\\xe9", "caf\\xe9/latin-1 \\xff.png", "accepted"),
        ("snow leopard", "snow leopard/ünïcødé 雪豹.png", "accepted"),
    ]
    assert all(r.path.encode("utf-8") for r in records)  # printable, writable to CSV/JSON


def test_parallel_and_sequential_agree(folder: Path) -> None:
    for i in range(3 * CHUNK):  # several chunks, so the worker pool really is used
        put(folder, f"bird/{i:03d}.png", image_bytes("PNG", size=(12, 12), seed=100 + i))
    one = verify_folder(folder, SETTINGS, workers=1).records
    many = verify_folder(folder, SETTINGS, workers=2).records
    assert len(one) == 12 + 3 * CHUNK and one == many


def test_cache_decodes_only_new_or_changed_files(folder: Path, tmp_path: Path) -> None:
    with VerifyCache(tmp_path / "cache") as cache:
        first = verify_folder(folder, SETTINGS, cache=cache)
        assert first.decoded == len(first.records)
        again = verify_folder(folder, SETTINGS, cache=cache)
        # Only the unreadable file (a broken symlink) is tried again: failures are not cached.
        assert again.decoded == 1 and again.records == first.records

        put(folder, "dog/new.png", image_bytes("PNG", seed=9))
        put(folder, "cat/good.jpg", image_bytes("JPEG", size=(64, 48), seed=10))  # edited
        later = verify_folder(folder, SETTINGS, cache=cache)
        assert later.decoded == 1 + 2
        # The old content of good.jpg now only lives in rescan.jpg, which is kept instead.
        assert verdicts(later.records)["cat/rescan.jpg"] == ("accepted", "")

        stricter = verify_folder(folder, CheckSettings(min_side=40, max_pixels=10_000), cache=cache)
        assert stricter.decoded == len(stricter.records)  # new settings: nothing reusable
        assert verdicts(stricter.records)["dog/good.png"][0] == "too_small"
        accepted = [r.sha256 for r in later.accepted()]
        assert all(cache.object_path(sha).read_bytes() for sha in accepted if sha)


def test_graft_verify_command(folder: Path) -> None:
    table = run(["graft", "verify", str(folder)], cwd=folder)
    lines = table.stdout.splitlines()
    assert lines[0] == "path\tlabel\tverdict\treason\tsha256"
    assert any(line.startswith("cat/truncated.jpg\tcat\tcorrupt\t") for line in lines)
    assert "12 files" in table.stderr and "corrupt 1" in table.stderr
    listed = json.loads(run(["graft", "verify", str(folder), "--json"], cwd=folder).stdout)
    assert {r["path"]: r["verdict"] for r in listed}["cat/empty.jpg"] == "zero_byte"
    assert set(listed[0]) >= {"path", "label", "verdict", "reason", "sha256"}
