"""params.yaml validation: every mistake is caught before any work and names its key."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, run, tiny_params

from graft.config.checks import check_arch, check_machine, check_sources
from graft.config.params import ParamsError, load_params, parse_params


@pytest.fixture
def params(sources: Path) -> dict[str, Any]:
    return tiny_params(sources)


def test_project_params_are_valid() -> None:
    loaded = load_params(ROOT / "params.yaml")
    assert loaded.pretrain.arch == "resnet18"
    assert loaded.paths.registry.package == Path("models/package")


def _error_for(params: dict[str, Any]) -> str:
    with pytest.raises(ParamsError) as caught:
        parse_params(params)
    return str(caught.value)


def test_unknown_key_is_named(params: dict[str, Any]) -> None:
    params["finetune"]["head"]["learning_rate"] = 0.1
    assert "finetune.head.learning_rate: unknown key" in _error_for(params)


def test_missing_key_is_named(params: dict[str, Any]) -> None:
    del params["pretrain"]["epochs"]
    assert "pretrain.epochs: missing key" in _error_for(params)


def test_wrong_type_is_named(params: dict[str, Any]) -> None:
    params["pretrain"]["batch_size"] = "sixty-four"
    assert "pretrain.batch_size" in _error_for(params)


def test_fractions_must_sum_to_one(params: dict[str, Any]) -> None:
    params["split"]["target"] = {"train": 0.5, "val": 0.3, "test": 0.3}
    message = _error_for(params)
    assert "split.target" in message and "sum to 1" in message


def _machine_error(check: Callable[[], None]) -> str:
    with pytest.raises(ParamsError) as caught:
        check()
    return str(caught.value)


def test_validation_is_pure(params: dict[str, Any], tmp_path: Path) -> None:
    # Neither the file system nor torchvision is consulted: params validate anywhere.
    params["ingest"]["sources"]["target"]["uri"] = str(tmp_path / "nowhere")
    params["pretrain"]["arch"] = "vgg17"
    parsed = parse_params(params)
    assert parsed.ingest.sources.target.uri == tmp_path / "nowhere"
    assert parsed.pretrain.arch == "vgg17"


def test_missing_source_folder_is_named(params: dict[str, Any], tmp_path: Path) -> None:
    check_sources(parse_params(params))  # both folders exist
    params["ingest"]["sources"]["target"]["uri"] = str(tmp_path / "nowhere")
    parsed = parse_params(params)
    message = _machine_error(lambda: check_sources(parsed, origin="my.yaml"))
    assert message.startswith("my.yaml has bad settings:\n")
    assert (
        f"  ingest.sources.target.uri: source folder '{tmp_path / 'nowhere'}' does not exist "
        "or is not a folder"
    ) in message
    assert "ingest.sources.pretrain.uri" not in message


def test_relative_source_folders_are_under_root(params: dict[str, Any], sources: Path) -> None:
    params["ingest"]["sources"]["pretrain"]["uri"] = "pretrain"
    params["ingest"]["sources"]["target"]["uri"] = "elsewhere"
    parsed = parse_params(params)
    message = _machine_error(lambda: check_sources(parsed, sources))
    assert "ingest.sources.target.uri: source folder 'elsewhere'" in message
    assert "ingest.sources.pretrain.uri" not in message  # sources/pretrain exists


def test_unknown_architecture_is_named(params: dict[str, Any]) -> None:
    params["pretrain"]["arch"] = "vgg17"
    parsed = parse_params(params)
    message = _machine_error(lambda: check_arch(parsed))
    assert "  pretrain.arch: unknown architecture 'vgg17'" in message and "vgg16" in message
    check_arch(parse_params({**params, "pretrain": {**params["pretrain"], "arch": "vgg16"}}))


def test_machine_check_names_every_bad_key_at_once(params: dict[str, Any], tmp_path: Path) -> None:
    params["ingest"]["sources"]["pretrain"]["uri"] = str(tmp_path / "gone")
    params["ingest"]["sources"]["target"]["uri"] = str(tmp_path / "nowhere")
    params["pretrain"]["arch"] = "resnet19"
    message = _machine_error(lambda: check_machine(parse_params(params)))
    keys = ["ingest.sources.pretrain.uri", "ingest.sources.target.uri", "pretrain.arch"]
    assert [line.split(":")[0].strip() for line in message.splitlines()[1:]] == keys


def test_every_problem_reported_at_once(params: dict[str, Any]) -> None:
    broken = copy.deepcopy(params)
    broken["common"]["seed"] = -1
    broken["evaluate"]["batch_size"] = 0
    message = _error_for(broken)
    assert "common.seed" in message and "evaluate.batch_size" in message


def test_stage_with_bad_params_fails_before_any_work(
    params: dict[str, Any], write_params: Callable[[dict[str, Any]], Path], tmp_path: Path
) -> None:
    params["ingest"]["min_sides"] = 4  # a typo for min_side
    write_params(params)
    shutil.copytree(ROOT / "tasks", tmp_path / "tasks")  # stages run from the project root
    result = run(["python", "-m", "tasks.ingest"], cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert "ingest.min_sides: unknown key" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "reports").exists()


def test_ingest_stage_with_a_missing_source_fails_before_any_work(
    params: dict[str, Any], write_params: Callable[[dict[str, Any]], Path], tmp_path: Path
) -> None:
    params["ingest"]["sources"]["target"]["uri"] = str(tmp_path / "nowhere")
    write_params(params)
    shutil.copytree(ROOT / "tasks", tmp_path / "tasks")  # stages run from the project root
    result = run(["python", "-m", "tasks.ingest"], cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert "params.yaml has bad settings:" in result.stderr
    assert "ingest.sources.target.uri: source folder" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / ".graft").exists()


def test_graft_check_command(params: dict[str, Any], write_params: Callable[..., Path]) -> None:
    path = write_params(params)
    ok = run(["graft", "check", "--params", str(path)], cwd=path.parent)
    assert "all settings valid" in ok.stdout
    params["register"]["min_accuracy"] = 2
    write_params(params)
    bad = run(["graft", "check", "--params", str(path)], cwd=path.parent, check=False)
    assert bad.returncode == 1 and "register.min_accuracy" in bad.stderr


def test_yaml_syntax_error_is_clear(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("common: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(path)
