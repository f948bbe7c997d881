"""params.yaml and dvc.lock are read as DVC reads them (YAML 1.2), so what trains is what DVC
and the lineage record: ``010`` is ten, not YAML 1.1's octal eight, and ``yes`` is a word."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from dvc.dependency.param import read_param_file
from dvc.fs import LocalFileSystem
from dvc.utils.serialize import YAMLFileCorruptedError
from dvc.utils.serialize import parse_yaml as dvc_parse_yaml
from helpers import ROOT, tool_env

from graft.config.params import ParamsError, load_params
from graft.config.yaml12 import YAMLSyntaxError, parse_yaml
from graft.registry.revisions import RevisionError, lock_at, params_at


def _edited_params(tmp_path: Path, *edits: tuple[str, str]) -> Path:
    """The project's params.yaml with each ``(line pattern, replacement)`` applied once (the
    first match), written to ``tmp_path``; returns its path."""
    text = (ROOT / "params.yaml").read_text(encoding="utf-8")
    for pattern, replacement in edits:
        text, count = re.subn(pattern, replacement, text, count=1, flags=re.MULTILINE)
        assert count == 1, f"{pattern!r} not in params.yaml"
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _as_dvc_reads(path: Path) -> dict[str, Any]:
    """``path`` read by DVC's own params reader, the one behind ``params:`` in dvc.yaml."""
    params: dict[str, Any] = read_param_file(LocalFileSystem(), str(path))
    return params


def test_leading_zero_integers_read_as_dvc_reads_them(tmp_path: Path) -> None:
    path = _edited_params(
        tmp_path, (r"^  seed: 42\b", "  seed: 010"), (r"^  image_size: 32\b", "  image_size: 024")
    )
    loaded = load_params(path)
    assert (loaded.common.seed, loaded.common.image_size) == (10, 24)  # YAML 1.1: 8 and 20
    dvc_common = _as_dvc_reads(path)["common"]
    assert (dvc_common["seed"], dvc_common["image_size"]) == (
        loaded.common.seed,
        loaded.common.image_size,
    )


def test_boolean_looking_words_read_as_dvc_reads_them(tmp_path: Path) -> None:
    path = _edited_params(
        tmp_path,
        (r"^  name: digits-5-9\b", "  name: yes"),  # text: YAML 1.1 would make it True
        (r"^  amp: true\b", "  amp: off"),  # a bool setting: the word means False
        (r"hflip: false\}", "hflip: on}"),
    )
    loaded = load_params(path)
    dvc_params = _as_dvc_reads(path)
    assert loaded.registry.name == dvc_params["register"]["name"] == "yes"
    assert dvc_params["common"]["amp"] == "off" and loaded.common.amp is False
    assert dvc_params["pretrain"]["augment"]["hflip"] == "on"
    assert loaded.pretrain.augment.hflip is True


def test_values_are_plain_python_types() -> None:
    # pydantic and the lineage's JSON need plain types, not ruamel's round-trip wrappers.
    parsed = parse_yaml("a: {b: [010, 2.5, on, ~, true]}\n")
    assert type(parsed) is dict and type(parsed["a"]) is dict
    values = parsed["a"]["b"]
    assert type(values) is list
    assert [type(value) for value in values] == [int, float, str, type(None), bool]
    assert values == [10, 2.5, "on", None, True]


def test_bad_key_is_named_after_the_yaml_12_reading(tmp_path: Path) -> None:
    # 02000 is 2000 to YAML 1.2 (over the 1024 limit); YAML 1.1 would have passed octal 1024.
    path = _edited_params(tmp_path, (r"^  image_size: 32\b", "  image_size: 02000"))
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    assert f"{path} has bad settings:" in str(caught.value)
    assert "common.image_size" in str(caught.value)


def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("common: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML") as caught:
        load_params(path)
    assert str(caught.value).startswith(f"{path} is not valid YAML")
    assert "line 2" in str(caught.value)  # ruamel's position of the problem


def test_duplicate_key_is_refused_as_dvc_refuses_it(tmp_path: Path) -> None:
    # PyYAML silently kept the last value; DVC refuses the file, so graft does too.
    path = _edited_params(tmp_path, (r"^  seed: 42\b", "  seed: 42\n  seed: 7"))
    with pytest.raises(ParamsError, match="not valid YAML") as caught:
        load_params(path)
    assert 'duplicate key "seed"' in str(caught.value)
    with pytest.raises(YAMLFileCorruptedError):
        _as_dvc_reads(path)


def test_empty_document_parses_to_none_and_is_refused(tmp_path: Path) -> None:
    assert parse_yaml("") is None
    path = tmp_path / "params.yaml"
    path.write_text("# nothing yet\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(path)


def test_parse_yaml_raises_its_own_error() -> None:
    with pytest.raises(YAMLSyntaxError, match="did not find expected"):
        parse_yaml("a: [1, 2\n")


def _git(repo: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", *args], cwd=repo, env=tool_env(), capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def _commit(repo: Path, files: dict[str, str]) -> str:
    """Commit ``files`` (name to text) in the git repository ``repo``; returns the commit."""
    for name, text in files.items():
        (repo / name).write_text(text, encoding="utf-8")
    _git(repo, "add", *files)
    _git(repo, "commit", "--quiet", "-m", "params")
    return _git(repo, "rev-parse", "HEAD")


LOCK = """schema: '2.0'
stages:
  pretrain:
    cmd: python -m tasks.pretrain
    params:
      params.yaml:
        common.seed: 010
        register.name: no
"""


def test_params_and_lock_at_a_revision_read_as_dvc_reads_them(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "--quiet")
    params_text = _edited_params(tmp_path, (r"^  seed: 42\b", "  seed: 010")).read_text()
    commit = _commit(repo, {"params.yaml": params_text, "dvc.lock": LOCK})
    assert params_at(repo, commit)["common"]["seed"] == 10
    lock_params = lock_at(repo, commit)["stages"]["pretrain"]["params"]["params.yaml"]
    assert lock_params == {"common.seed": 10, "register.name": "no"}
    dvc_lock = dvc_parse_yaml(LOCK, "dvc.lock")
    assert lock_params == dvc_lock["stages"]["pretrain"]["params"]["params.yaml"]


def test_malformed_yaml_at_a_revision_is_a_revision_error(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "--quiet")
    commit = _commit(repo, {"params.yaml": "common: [unclosed\n"})
    with pytest.raises(RevisionError, match=r"params\.yaml at \w+ is not valid UTF-8 YAML"):
        params_at(repo, commit)
