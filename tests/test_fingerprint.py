"""The scan stage's source fingerprints: exact by content, not fooled by timestamps, and an
unchanged folder is only listed, not read."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

import graft.data.fingerprint as fingerprint_module
from graft.data.fingerprint import fingerprint
from graft.data.verify_cache import VerifyCache


def folder_of_images(root: Path) -> Path:
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (9, 9), (i * 40, 0, 0)).save(root / label / f"{i}.png")
    return root


def test_the_same_content_gives_the_same_fingerprint_anywhere(tmp_path: Path) -> None:
    source = folder_of_images(tmp_path / "a")
    with VerifyCache(tmp_path / "cache") as cache:
        first = fingerprint(source, cache)
    assert first["files"] == 6 and first["classes"] == ["cat", "dog"]
    os.utime(source / "cat" / "0.png", (1, 1))  # touched, same bytes
    with VerifyCache(tmp_path / "cache") as cache:
        assert fingerprint(source, cache) == first
    copy = folder_of_images(tmp_path / "b")  # another folder, another cache: same content
    with VerifyCache(tmp_path / "other-cache") as cache:
        assert fingerprint(copy, cache) == first


def test_every_change_ingest_would_see_changes_it(tmp_path: Path) -> None:
    source = folder_of_images(tmp_path / "a")

    def now() -> dict[str, object]:
        with VerifyCache(tmp_path / "cache") as cache:
            return fingerprint(source, cache)

    seen = [now()]
    (source / "cat" / "0.png").write_bytes((source / "dog" / "1.png").read_bytes())  # content
    seen.append(now())
    (source / "dog" / "1.png").rename(source / "dog" / "9.png")  # a name
    seen.append(now())
    (source / "cat" / ".DS_Store").write_bytes(b"x")  # something skipped
    seen.append(now())
    (source / "bird").mkdir()  # an empty class folder
    seen.append(now())
    digests = [(s["sha256"], str(s["skipped"]), str(s["classes"])) for s in seen]
    assert len(set(digests)) == len(digests)


def test_an_unchanged_folder_is_listed_not_read(tmp_path: Path, monkeypatch) -> None:
    source = folder_of_images(tmp_path / "a")
    read: list[str] = []
    real = fingerprint_module.file_sha256

    def counting(path: Path) -> str:
        read.append(path.name)
        return real(path)

    monkeypatch.setattr(fingerprint_module, "file_sha256", counting)
    with VerifyCache(tmp_path / "cache") as cache:
        fingerprint(source, cache)
    assert len(read) == 6
    read.clear()
    (source / "dog" / "2.png").write_bytes(b"changed")
    with VerifyCache(tmp_path / "cache") as cache:
        fingerprint(source, cache)
    assert read == ["2.png"]


def test_a_named_pipe_is_not_opened(tmp_path: Path) -> None:
    source = folder_of_images(tmp_path / "a")
    os.mkfifo(source / "cat" / "pipe.png")  # opening it for reading would block forever
    with VerifyCache(tmp_path / "cache") as cache:
        found = fingerprint(source, cache)
    assert found["files"] == 7
