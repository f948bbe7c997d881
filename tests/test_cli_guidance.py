"""The `graft` command line guides a new user: its version, what it is and the usual workflow,
every option's default and meaning, verify's columns and exit status, run's stage names, the
forms a lineage reference takes, and where to look after a run. Errors are one line."""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import UUID

import httpx
import numpy as np
import pytest
import yaml
from helpers import make_dvc_project, run
from odd_files import png_with_bad_crc
from PIL import Image

from graft.cli.help_format import HelpFormatter
from graft.cli.main import REJECTED_EXIT, build_parser
from graft.data.schemas import VERDICTS
from graft.data.verify import FileRecord
from graft.registry.versions import STAGE_REF, VERSION_REF

if TYPE_CHECKING:
    from deployed import Server


def parsers(
    parser: argparse.ArgumentParser, name: str = "graft"
) -> dict[str, argparse.ArgumentParser]:
    """``parser`` and every subcommand's parser under it, by the command line that reaches it."""
    found: dict[str, argparse.ArgumentParser] = {name: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                found.update(parsers(sub, f"{name} {command}"))
    return found


def undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """Every argument of ``parser`` and its subcommands (but -h) whose --help line lacks a
    meaning, or, when it has a default, the default: as 'graft verify --min-side: why'."""
    problems = []
    for command, sub in parsers(parser).items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            name = f"{command} {'/'.join(action.option_strings) or action.dest}"
            if not action.help or not action.help.strip() or action.help == argparse.SUPPRESS:
                problems.append(f"{name}: no help")
                continue
            shown = formatter._expand_help(action)  # the help line as --help prints it
            has_default = action.default not in (None, False, argparse.SUPPRESS)
            if has_default and f"default: {action.default}" not in shown:
                problems.append(f"{name}: default {action.default!r} not shown in {shown!r}")
    return problems


def test_version_prints_the_installed_version_only(tmp_path: Path) -> None:
    result = run(["graft", "--version"], tmp_path)
    assert result.stdout == f"graft {version('graft')}\n" and result.stderr == ""


def test_help_says_what_graft_is_and_the_usual_workflow(tmp_path: Path) -> None:
    shown = run(["graft", "--help"], tmp_path).stdout
    assert "image transfer-learning pipeline" in shown
    workflow = ["graft demo", "dvc repro", "graft run", "graft publish", "graft lineage show"]
    where = [shown.find(step) for step in workflow]
    assert -1 not in where and where == sorted(where), where  # all there, in that order


def test_every_option_of_every_command_says_what_it_means_and_its_default() -> None:
    parser = build_parser()
    assert undocumented(parser) == []
    commands = parsers(parser)
    assert {"graft verify", "graft run", "graft lineage show", "graft lineage image"} <= set(
        commands
    )
    assert all(sub.formatter_class is HelpFormatter for sub in commands.values())
    # The check finds an option added without help, and a command whose defaults are hidden.
    commands["graft verify"].add_argument("--quietly-added", type=int, default=7)
    (subcommands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    extra = subcommands.add_parser("extra", help="a command added without graft's formatter")
    extra.add_argument("--level", type=int, default=3, help="how much")
    assert undocumented(parser) == [
        "graft verify --quietly-added: no help",
        "graft extra --level: default 3 not shown in 'how much'",
    ]


@pytest.mark.parametrize(
    ("command", "option", "unit"),
    [
        ("verify", "--min-side", "pixels"),
        ("verify", "--max-pixels", "pixels"),
        ("verify", "--decode-memory-mb", "MiB"),
        ("verify", "--decode-timeout-s", "seconds"),
        ("verify", "--workers", "processes"),
        ("run", "--bump", "vX.Y.Z"),
        ("run", "--root", "default: ."),
        ("publish", "--root", "default: ."),
        ("lineage show", "--root", "default: ."),
    ],
)
def test_options_give_their_units(command: str, option: str, unit: str) -> None:
    sub = parsers(build_parser())[f"graft {command}"]
    (action,) = (a for a in sub._actions if option in a.option_strings)
    assert unit in sub._get_formatter()._expand_help(action)


def test_verify_help_names_its_columns_verdicts_and_exit_status(tmp_path: Path) -> None:
    shown = " ".join(run(["graft", "verify", "--help"], tmp_path).stdout.split())
    for name in (*FileRecord._fields, *VERDICTS):  # every --json key and every verdict
        assert re.search(rf"\b{name}\b", shown), name
    assert f"{REJECTED_EXIT} when any file is rejected" in shown


def png(size: tuple[int, int], seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def graft(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run(["graft", *arguments], cwd, check=False)


def test_verify_fail_on_rejected_exit_status(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    (folder / "cat").mkdir(parents=True)
    (folder / "cat" / "good.png").write_bytes(png((32, 24), seed=1))
    (folder / "cat" / "copy.png").write_bytes(png((32, 24), seed=1))  # a duplicate: not rejected
    clean = graft("verify", str(folder), "--fail-on-rejected", "--workers", "1", cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr

    (folder / "cat" / "broken.png").write_bytes(png_with_bad_crc())
    table = graft("verify", str(folder), "--workers", "1", cwd=tmp_path)
    assert table.returncode == 0  # without the option, as before
    assert "cat/broken.png\tcat\tcorrupt\t" in table.stdout
    failed = graft("verify", str(folder), "--fail-on-rejected", "--workers", "1", cwd=tmp_path)
    assert failed.returncode == REJECTED_EXIT == 3
    assert failed.stdout == table.stdout  # the table is still printed in full
    assert failed.stderr.splitlines()[-1] == "1 files rejected: exit status 3 (--fail-on-rejected)"
    listed = graft("verify", str(folder), "--json", "--fail-on-rejected", cwd=tmp_path)
    assert listed.returncode == 3
    verdicts = {r["path"]: r["verdict"] for r in json.loads(listed.stdout)}
    assert verdicts == {
        "cat/broken.png": "corrupt",
        "cat/copy.png": "accepted",  # the first by path is kept
        "cat/good.png": "duplicate",
    }


@pytest.fixture
def project(tmp_path: Path, sources: Path) -> Path:
    """A real git + DVC project with the Prefect flow, as `graft run` needs it."""
    return make_dvc_project(tmp_path / "repo", sources, with_flows=True)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The only line ``result`` printed on stderr, an error: no traceback, exit status 1."""
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ")
    return line


def test_run_refuses_an_unknown_stage_in_one_line_before_any_work(project: Path) -> None:
    stages = list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    line = one_line_error(graft("run", "split", "pretrian", "--root", str(project), cwd=project))
    assert "has no stage 'pretrian' (did you mean pretrain?)" in line
    assert line.endswith(f"its stages: {', '.join(stages)}")  # every one, in DVC's order
    assert not (project / ".graft").exists()  # no server started, no stage run


def test_run_stage_option_is_not_a_dvc_stage(project: Path) -> None:
    mistaken = graft("run", "--stage", "pretrain", "--publish", "--root", str(project), cwd=project)
    line = one_line_error(mistaken)
    assert "--stage pretrain names a DVC stage" in line and "(graft run pretrain)" in line
    assert "--publish-stage" in line
    # The registry stage needs --publish, whichever name it is given under.
    alone = one_line_error(graft("run", "--publish-stage", "dev", cwd=project))
    assert "add --publish" in alone
    old_name = graft("run", "--stage", "dev", cwd=project)
    warning, error = old_name.stderr.splitlines()
    assert warning.startswith("warning: --stage is deprecated: use --publish-stage")
    assert error.startswith("error: --publish-stage dev") and old_name.returncode == 1
    assert not (project / ".graft").exists()


def test_lineage_help_shows_every_reference_form(tmp_path: Path) -> None:
    for command in (["lineage"], ["lineage", "show"], ["lineage", "diff"]):
        shown = run(["graft", *command, "--help"], tmp_path).stdout
        examples = re.findall(r"^  (\S+) +(.+)$", shown, flags=re.MULTILINE)
        forms = dict(examples)
        assert set(forms) >= {
            "digits-5-9@v1.2.0", "digits-5-9@latest", "digits-5-9#prod", "HEAD~3",
            "models/package/model.pt",
        }, shown  # fmt: skip
    # Each example is a form lineage's resolver reads as what the help says it is.
    assert VERSION_REF.match("digits-5-9@v1.2.0") and VERSION_REF.match("digits-5-9@latest")
    assert STAGE_REF.match("digits-5-9#prod")
    assert not any(ref.match("HEAD~3") for ref in (VERSION_REF, STAGE_REF))  # a git revision


@pytest.mark.slow
def test_after_a_run_it_says_where_to_look(project: Path, server: Server) -> None:
    run(["dvc", "repro"], project)  # the whole pipeline by hand: graft run finds it cached
    finished = subprocess.run(
        ["graft", "run"], cwd=project, env=server.env, capture_output=True, text=True
    )
    assert finished.returncode == 0, finished.stderr
    lines = finished.stdout.splitlines()
    url = re.fullmatch(r"the run in the Prefect UI: (\S+)/runs/flow-run/([0-9a-f-]{36})", lines[-3])
    assert url and url[1] == server.url.removesuffix("/api"), lines
    assert f"View at {url[0].split(': ')[1]}" in finished.stderr  # Prefect's own link to it
    with server.client() as client:  # the very run that just finished
        flow_run = client.read_flow_run(UUID(url[2]))
        assert flow_run.state is not None and flow_run.state.is_completed()
    ui = httpx.get(f"{url[1]}/ui-settings", timeout=10).json()  # that page finds its API
    assert ui["api_url"] == server.url
    card = Path("models", "package", "model_card.md")
    assert lines[-2:] == [f"the model card: {card}", "publish it as a version: graft publish"]
    assert (project / card).is_file()

    # A run that does not reach the package says nothing of a card it did not make.
    upstream = subprocess.run(
        ["graft", "run", "split"], cwd=project, env=server.env, capture_output=True, text=True
    )
    assert upstream.returncode == 0, upstream.stderr
    assert upstream.stdout.splitlines()[-1].startswith("the run in the Prefect UI: ")
    assert "model card" not in upstream.stdout
