"""What a source holds: graft and DVC agree on it, and what DVC cannot track is refused first."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import run, tiny_params

from graft.config.checks import check_sources, source_warnings
from graft.config.params import Params, ParamsError, parse_params
from graft.data.sources import (
    class_folders,
    invisible_collisions,
    scan_folder,
    untrackable,
    visible_form,
)
from graft.data.verify import CheckSettings, verify_folder


def put(path: Path | bytes, data: bytes = b"x") -> None:
    """A file at ``path`` (bytes for names that are not UTF-8), its folders made."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as stream:
        stream.write(data)


def raw_params(target: Path, pretrain: Path) -> dict[str, Any]:
    """Tiny params reading ``target`` and ``pretrain``, as a params.yaml would hold them."""
    raw = tiny_params(target.parent)
    raw["ingest"]["sources"]["target"]["uri"] = str(target)
    raw["ingest"]["sources"]["pretrain"]["uri"] = str(pretrain)
    return raw


def params_for(target: Path, pretrain: Path) -> Params:
    return parse_params(raw_params(target, pretrain))


def write_params(folder: Path, target: Path, pretrain: Path) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw_params(target, pretrain), sort_keys=False))
    return path


@pytest.fixture
def clean(tmp_path: Path) -> Path:
    """A pretraining source DVC can track, for the checks that need two."""
    put(tmp_path / "clean" / "a" / "1.png")
    return tmp_path / "clean"


def test_names_that_are_not_utf8_are_named_anywhere(tmp_path: Path) -> None:
    root = tmp_path / "src"
    base = os.fsencode(root)
    put(os.path.join(base, b"caf\xe9", b"1.png"))  # a class folder: reported once, not per file
    put(os.path.join(base, b"caf\xe9", b"2.png"))
    put(os.path.join(base, b"dog", b"sub", b"latin-1 \xff.png"))
    put(os.path.join(base, b"dog", b".\xfehidden"))  # hidden, but DVC reads it
    put(root / "dog" / "ünïcødé 雪豹.png")  # valid UTF-8: fine
    problems = untrackable(root)
    assert [problem.split(": ")[0] for problem in problems] == [
        f"{root}/caf\\xe9",
        f"{root}/dog/.\\xfehidden",
        f"{root}/dog/sub/latin-1 \\xff.png",
    ]
    assert all("not valid UTF-8, which DVC cannot track: rename it" in p for p in problems)


def test_check_and_graft_check_refuse_untrackable_names(tmp_path: Path, clean: Path) -> None:
    target = tmp_path / "target"
    put(os.path.join(os.fsencode(target), b"caf\xe9", b"1.png"))
    with pytest.raises(ParamsError) as caught:
        check_sources(params_for(target, clean), origin="params.yaml")
    message = str(caught.value)
    assert f"  ingest.sources.target.uri: {target}/caf\\xe9: name is not valid UTF-8" in message
    assert "ingest.sources.pretrain.uri" not in message

    path = write_params(tmp_path, target, clean)
    result = run(["graft", "check", "--params", str(path)], cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{target}/caf\\xe9: name is not valid UTF-8" in result.stderr


def test_many_problems_are_listed_then_counted(tmp_path: Path, clean: Path) -> None:
    target = tmp_path / "target"
    for n in range(13):
        put(os.path.join(os.fsencode(target), b"cat", b"%02d \xff.png" % n))
    with pytest.raises(ParamsError) as caught:
        check_sources(params_for(target, clean))
    lines = str(caught.value).splitlines()[1:]
    assert len(lines) == 11 and lines[-1].endswith(": and 3 more paths like these")


def test_a_linked_class_folder_is_refused_and_not_read(tmp_path: Path, clean: Path) -> None:
    root = tmp_path / "src"
    put(root / "cat" / "1.png")
    put(tmp_path / "elsewhere" / "birds" / "2.png")
    (root / "bird").symlink_to(tmp_path / "elsewhere" / "birds", target_is_directory=True)
    (root / ".cache").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # hidden

    [problem] = untrackable(root)
    assert problem.startswith(f"{root}/bird: class folder is a symbolic link (to ")
    assert "DVC does not hash a linked folder's files" in problem
    assert "move or copy the folder into the source" in problem
    with pytest.raises(
        ParamsError, match=r"ingest\.sources\.target\.uri: .*/src/bird: class folder"
    ):
        check_sources(params_for(root, clean))

    files, skipped = scan_folder(root)  # as DVC: the linked folder's files are not there
    assert [file.relative for file in files] == ["cat/1.png"]
    assert skipped["linked folder, not followed"] == 1
    assert class_folders(root) == ["cat"]


def test_broken_links_are_refused_and_get_the_verdict_unreadable(
    tmp_path: Path, clean: Path
) -> None:
    root = tmp_path / "src"
    put(root / "cat" / "1.png")
    (root / "cat" / "gone.png").symlink_to(root / "cat" / "missing.png")
    (root / "cat" / ".#1.png").symlink_to("user@host.1234")  # an editor's lock file
    (root / "cat" / "loop.png").symlink_to(root / "cat" / "loop.png")
    problems = untrackable(root)
    assert [problem.split(": ")[0] for problem in problems] == [
        f"{root}/cat/.#1.png",
        f"{root}/cat/gone.png",
        f"{root}/cat/loop.png",
    ]
    assert "symbolic link to 'user@host.1234' that cannot be followed" in problems[0]
    assert "(No such file or directory), on which DVC stops" in problems[1]
    assert "(Too many levels of symbolic links)" in problems[2]
    with pytest.raises(ParamsError, match=r"src/cat/gone\.png: symbolic link"):
        check_sources(params_for(root, clean))

    # Without the check (graft verify), a broken link is a file that cannot be read.
    records = verify_folder(root, CheckSettings(min_side=1, max_pixels=100)).records
    verdicts = {record.path: record.verdict for record in records}
    assert verdicts["cat/gone.png"] == verdicts["cat/loop.png"] == "unreadable"


def test_what_graft_and_dvc_both_follow_is_accepted(tmp_path: Path) -> None:
    root = tmp_path / "src"
    put(root / "cat" / "1.png")
    put(tmp_path / "elsewhere" / "2.png")
    put(tmp_path / "elsewhere" / "more" / "3.png")
    (root / "cat" / "linked.png").symlink_to(tmp_path / "elsewhere" / "2.png")
    (root / "cat" / "nested").symlink_to(tmp_path / "elsewhere" / "more")
    (root / "link-beside.png").symlink_to(tmp_path / "elsewhere" / "2.png")
    assert untrackable(root) == []


@pytest.fixture
def unlistable(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Folders named ``locked`` cannot be listed (chmod cannot show it: tests may run as root)."""
    real = os.scandir

    def scandir(path: Any) -> Any:
        if os.path.basename(path) == "locked":
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    yield "locked"


def test_a_folder_that_cannot_be_listed_is_named(
    tmp_path: Path, clean: Path, unlistable: str
) -> None:
    root = tmp_path / "src"
    put(root / "cat" / unlistable / "1.png")
    put(root / "cat" / "2.png")
    assert untrackable(root) == [f"{root}/cat/locked: cannot be listed (Permission denied)"]
    (tmp_path / unlistable).mkdir()
    with pytest.raises(ParamsError) as caught:
        check_sources(params_for(tmp_path / unlistable, clean))
    message = f"source folder '{tmp_path / unlistable}' cannot be listed (Permission denied)"
    assert message in str(caught.value)


def test_class_folders_lists_empty_ones_in_scan_order(tmp_path: Path) -> None:
    root = tmp_path / "src"
    put(root / "b" / "1.png")
    put(root / "a" / "sub" / "2.png")
    (root / "empty").mkdir()
    (root / ".hidden").mkdir()
    put(root / "stray.png")
    assert class_folders(root) == ["a", "b", "empty"]
    files, _ = scan_folder(root)
    assert [file.label for file in files] == ["a", "b"]


def test_class_names_a_person_cannot_tell_apart() -> None:
    labels = [
        "cat", "cat\u200b", "\uff43\uff41\uff54",  # zero-width space; full-width letters
        "Cat",  # case shows: a different class, as meant
        "dog", " dog ", "dog\ufe0f",  # spaces at the ends; a variation selector
        "caf\u00e9", "cafe\u0301",  # composed and decomposed accent
        "snow leopard", "snow\u00a0 leopard",  # a no-break space, two spaces
        "bird", "b\u0456rd",  # a Cyrillic i looks the same, but is not detected (documented)
    ]  # fmt: skip
    assert invisible_collisions(labels) == [
        (" dog ", "dog", "dog\ufe0f"),
        ("cafe\u0301", "caf\u00e9"),
        ("cat", "cat\u200b", "\uff43\uff41\uff54"),
        ("snow leopard", "snow\u00a0 leopard"),
    ]
    assert invisible_collisions(["cat", "Cat", "dog"]) == []
    assert visible_form("a\tb\x07") == "a b"


def test_graft_check_warns_about_look_alike_class_names(tmp_path: Path, clean: Path) -> None:
    target = tmp_path / "target"
    put(target / "cat" / "1.png")
    put(target / "cat\u200b" / "2.png")
    put(target / "dog" / "3.png")
    params = params_for(target, clean)
    check_sources(params)  # a warning, not a refusal
    [(key, message)] = source_warnings(params)
    assert key == "ingest.sources.target.uri"
    assert message.startswith("class folders 'cat', 'cat\\u200b' look the same to a person")

    path = write_params(tmp_path, target, clean)
    result = run(["graft", "check", "--params", str(path)], cwd=tmp_path)
    assert "all settings valid" in result.stdout
    assert f"warning: ingest.sources.target.uri: {message}" in result.stderr


def dvc_file_count(repo: Path, source: Path) -> int:
    """How many files DVC hashes in ``source``, as a dependency of a stage in ``repo``."""
    run(["dvc", "repro", "-q"], repo)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    [dep] = [dep for dep in lock["stages"]["look"]["deps"] if dep["path"] == str(source)]
    return int(dep["nfiles"])


def test_dvc_hashes_exactly_the_files_graft_reads(tmp_path: Path, clean: Path) -> None:
    root = tmp_path / "src"
    elsewhere = tmp_path / "elsewhere"
    put(root / "cat" / "1.png")
    put(root / "cat" / "sub" / "2.png")
    put(root / "dog" / "3.png")
    put(elsewhere / "linked.png")
    put(elsewhere / "more" / "4.png")
    put(elsewhere / "birds" / "5.png")
    (root / "dog" / "linked.png").symlink_to(elsewhere / "linked.png")  # both follow it
    (root / "dog" / "nested").symlink_to(elsewhere / "more")  # neither follows it
    check_sources(params_for(root, clean))  # accepted
    files, _ = scan_folder(root)
    assert len(files) == 4

    repo = tmp_path / "repo"
    repo.mkdir()
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["dvc", "stage", "add", "-q", "-n", "look", "-d", str(root), "true"], repo)
    assert dvc_file_count(repo, root) == len(files)

    # A linked class folder: DVC does not hash it, so graft must not read it, and refuses it.
    (root / "bird").symlink_to(elsewhere / "birds", target_is_directory=True)
    with pytest.raises(ParamsError, match="src/bird: class folder is a symbolic link"):
        check_sources(params_for(root, clean))
    assert len(scan_folder(root)[0]) == dvc_file_count(repo, root) == 4
