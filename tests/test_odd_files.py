"""Every kind of odd file real folders hold gets a verdict, and an accepted file trains.

One test per kind of fault of ``../shared/fixtures/real-world/README.md``, each input rebuilt
by tests/odd_files.py; the last test runs the real fixtures too, where this machine has them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from odd_files import (
    dds_unimplemented_pixel_format,
    gradient,
    icns_holding,
    jpeg_with_bad_exif,
    phone_photo,
    png_claiming,
    png_with_bad_crc,
    png_with_broken_header,
    png_with_text,
    sixteen_bit_gray,
    sixteen_bit_rgb_png,
)

from graft.data.decoding import PillowLimits, configure_pillow, load_rgb
from graft.data.verify import CheckSettings, FileRecord, verify_folder

REAL_WORLD = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "real-world"
SETTINGS = CheckSettings(min_side=8, max_pixels=89_478_485, decode_memory_mb=256)


def verdicts(folder: Path, settings: CheckSettings = SETTINGS) -> dict[str, FileRecord]:
    """Every record of ``folder`` by its path relative to the folder."""
    return {record.path: record for record in verify_folder(folder, settings).records}


def write(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def test_a_decoder_that_raises_gives_a_verdict_and_the_folder_goes_on(tmp_path: Path) -> None:
    folder = write(
        tmp_path,
        {
            "a/texture.dds": dds_unimplemented_pixel_format(),
            "a/broken-header.png": png_with_broken_header(),
            "a/fine.png": sixteen_bit_gray(gradient(24, 24, peak=65535), "PNG"),
            "a/notes.txt": b"not an image at all",
        },
    )
    found = verdicts(folder)
    assert found["a/texture.dds"].verdict == "unsupported"
    assert found["a/texture.dds"].reason.startswith("DDS: ")
    assert found["a/texture.dds"].format == "DDS"
    # A known signature with a broken header is corrupt, not "not an image".
    assert found["a/broken-header.png"].verdict == "corrupt"
    assert found["a/broken-header.png"].format == "PNG"
    assert found["a/notes.txt"].verdict == "not_image"
    assert found["a/fine.png"].verdict == "accepted"


def test_a_frame_larger_than_its_container_says_is_stopped(tmp_path: Path) -> None:
    folder = write(
        tmp_path,
        {
            # Above Pillow's guard (2 x 89,478,485 pixels): refused while opening the frame.
            "a/guarded.icns": icns_holding(png_claiming(256, 1_000_000)),
            # Under the guard (76.8 M pixels) but 307 MB of RGBA: over the 256 MiB budget.
            "a/over-budget.icns": icns_holding(png_claiming(256, 300_000, color_type=6)),
        },
    )
    found = verdicts(folder)
    assert found["a/guarded.icns"].verdict == "too_large"
    assert "decompression-bomb limit" in found["a/guarded.icns"].reason
    assert (found["a/guarded.icns"].width, found["a/guarded.icns"].height) == (256, 256)
    assert found["a/over-budget.icns"].verdict == "too_large"
    assert "ingest.decode_memory_mb = 256 MiB" in found["a/over-budget.icns"].reason


def test_a_file_larger_than_the_memory_budget_is_never_read_into_memory(tmp_path: Path) -> None:
    video = write(tmp_path, {"a/video.jpg": b"\xff\xd8\xff"}) / "a/video.jpg"
    size = 300 * 1024 * 1024
    os.truncate(video, size)  # sparse: 300 MiB on paper, nothing on disk
    record = verdicts(tmp_path)["a/video.jpg"]  # a budget of 256 MiB
    assert record.verdict == "too_large"
    assert record.reason == (
        f"the file ({size} bytes) is larger than ingest.decode_memory_mb = 256 MiB"
    )
    assert record.sha256 is not None and record.bytes == size


def test_a_decode_slower_than_the_limit_is_a_timeout(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("L", (9000, 9000)).save(tmp_path / "slow.png")  # 81 M pixels: seconds of work
    folder = write(tmp_path / "source", {"a/slow.png": (tmp_path / "slow.png").read_bytes()})
    settings = CheckSettings(min_side=8, max_pixels=89_478_485, decode_timeout_s=0.2)
    record = verdicts(folder, settings)["a/slow.png"]
    assert record.verdict == "timeout"
    assert record.reason == "decoding took longer than ingest.decode_timeout_s = 0.2 s"
    assert record.sha256 is not None  # the content is still named in the report


def test_checksums_are_checked(tmp_path: Path) -> None:
    found = verdicts(write(tmp_path, {"a/bad-crc.png": png_with_bad_crc()}))
    assert found["a/bad-crc.png"].verdict == "corrupt"
    assert "checksum" in found["a/bad-crc.png"].reason


def test_an_accepted_file_decodes_as_training_decodes_it(tmp_path: Path) -> None:
    folder = write(tmp_path, {"a/bad-exif.jpg": jpeg_with_bad_exif()})
    record = verdicts(folder)["a/bad-exif.jpg"]
    assert record.verdict == "accepted"
    assert record.reason.startswith("EXIF orientation not applied, pixels kept as stored")
    assert record.phash is not None and len(record.phash) == 16
    pixels = load_rgb(folder / "a/bad-exif.jpg", 16)  # what every training stage calls
    assert pixels.shape == (16, 16, 3)
    assert abs(int(pixels[..., 0].mean()) - 200) < 10  # the stored pixels, not a crash


def test_every_high_bit_depth_format_follows_one_rule(tmp_path: Path) -> None:
    twelve_bit = gradient(24, 24, peak=4095)  # a 12-bit scan stored in 16 bits
    folder = write(
        tmp_path,
        {
            "a/g16.png": sixteen_bit_gray(twelve_bit, "PNG"),
            "a/g16.tif": sixteen_bit_gray(twelve_bit, "TIFF"),
            "a/g16.pgm": sixteen_bit_gray(twelve_bit, "PGM"),
            "a/rgb48.png": sixteen_bit_rgb_png(np.dstack([gradient(64, 24, peak=65535)] * 3)),
        },
    )
    found = verdicts(folder)
    assert {record.verdict for record in found.values()} == {"accepted"}
    assert not any(record.reason for record in found.values())  # nothing collapsed
    decoded = [load_rgb(folder / "a" / name, 24) for name in ("g16.png", "g16.tif", "g16.pgm")]
    assert decoded[0].min() == 0 and decoded[0].max() == 255  # full contrast, not near black
    assert all(np.array_equal(decoded[0], other) for other in decoded[1:])
    rgb = load_rgb(folder / "a/rgb48.png", 64)  # its own width: no averaging across columns
    assert rgb.min() == 0 and rgb.max() == 255


def test_a_high_bit_depth_image_whose_range_collapses_is_warned(tmp_path: Path) -> None:
    values = gradient(24, 24, peak=200)
    values[0, 0] = 65535  # one hot pixel: the stretch leaves the rest near black
    record = verdicts(write(tmp_path, {"a/hot.png": sixteen_bit_gray(values, "PNG")}))["a/hot.png"]
    assert record.verdict == "accepted"
    assert "high-bit-depth image keeps only" in record.reason
    assert "levels in 8 bits" in record.reason


def test_phone_formats_decode(tmp_path: Path) -> None:
    files = {"a/IMG_0001.HEIC": phone_photo("HEIF"), "a/IMG_0002.avif": phone_photo("AVIF")}
    folder = write(tmp_path, files)
    found = verdicts(folder)
    assert found["a/IMG_0001.HEIC"].verdict == "accepted"
    assert found["a/IMG_0001.HEIC"].format == "HEIF"
    assert found["a/IMG_0002.avif"].verdict == "accepted"
    configure_pillow(
        PillowLimits(89_478_485)
    )  # as every training stage starts (Pillow's own limit)
    assert load_rgb(folder / "a/IMG_0001.HEIC", 16).shape == (16, 16, 3)


def test_a_phone_photo_without_its_decoder_is_unsupported_naming_it(tmp_path: Path) -> None:
    heic = tmp_path / "photo.heic"
    heic.write_bytes(phone_photo("HEIF"))
    code = (  # a fresh process: no HEIF opener registered, as when the plugin is missing
        "import sys; from graft.data.image_check import check_image_bytes; "
        "c = check_image_bytes(open(sys.argv[1], 'rb').read(), min_side=8, max_pixels=10**8); "
        "print(c.verdict); print(c.reason)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(heic)], capture_output=True, text=True, check=True
    )
    verdict, reason = result.stdout.splitlines()
    assert verdict == "unsupported"
    assert reason == "HEIF: no decoder for it here (the pillow-heif plugin)"


def test_pillows_metadata_limits_are_verdicts_and_settings(tmp_path: Path) -> None:
    folder = write(tmp_path, {"a/big-comment.png": png_with_text(2 * 1024 * 1024)})
    record = verdicts(folder)["a/big-comment.png"]
    assert record.verdict == "too_large"
    assert "ingest.png_max_text_chunk" in record.reason
    roomy = CheckSettings(8, 89_478_485, png_max_text_chunk=4 * 1024 * 1024)
    assert verdicts(folder, roomy)["a/big-comment.png"].verdict == "accepted"
    assert roomy.key() != SETTINGS.key()  # the cache tells the two apart


@pytest.mark.skipif(not REAL_WORLD.is_dir(), reason="the shared real-world fixtures are absent")
def test_the_real_world_fixtures() -> None:
    found = verdicts(REAL_WORLD)
    expected = {
        "bad-exif/photo_badexif.jpg": "accepted",
        "decoder-raises/unimplemented_pixel_format.dds": "unsupported",
        "heic/IMG_0001.HEIC": "accepted",
        "hidden-bomb/container-says-256x256.icns": "too_large",
        "png-bad-crc/idat-crc-flipped.png": "corrupt",
        "sixteen-bit/g16.pgm": "accepted",
        "sixteen-bit/g16.png": "accepted",
        "sixteen-bit/g16.tif": "accepted",
    }
    assert {path: record.verdict for path, record in found.items()} == expected
    sixteen = [
        load_rgb(REAL_WORLD / "sixteen-bit" / f"g16.{ext}", 24) for ext in ("pgm", "png", "tif")
    ]
    assert all(np.array_equal(sixteen[0], other) for other in sixteen[1:])
