"""The ingest stage: budget, reports, and a dataset that holds exactly the verified bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, run, tiny_params

from graft.config.params import ROLES, parse_params
from graft.data.ingest import IngestError, ingest, render_summary, summarise
from graft.data.layout import manifest_path, read_manifest
from graft.data.store import ImageStore, read_index
from graft.hashing import file_sha256


def test_dataset_holds_each_accepted_image_once_by_content(sources: Path, tmp_path: Path) -> None:
    params = parse_params(tiny_params(sources))
    before = {p: file_sha256(p) for p in sources.rglob("*") if p.is_file()}
    manifest, reports = ingest(params.ingest, tmp_path / "ingested", tmp_path / "cache")
    assert {p: file_sha256(p) for p in sources.rglob("*") if p.is_file()} == before  # untouched

    accepted = manifest[manifest["verdict"] == "accepted"]
    assert len(accepted) == 60 + 60
    with ImageStore(tmp_path / "ingested") as store:
        for role, path, sha256 in zip(
            accepted["role"], accepted["path"], accepted["sha256"], strict=True
        ):
            assert store.read(str(sha256)) == (sources / str(role) / str(path)).read_bytes()
    assert sorted(read_index(tmp_path / "ingested")["sha256"]) == sorted(set(accepted["sha256"]))
    assert read_manifest(tmp_path / "ingested").equals(manifest)  # schema-checked round trip

    summary = render_summary(manifest, reports, params.ingest, REJECTED)
    target = markdown_rows(summary.split("## target")[1])
    assert target[0] == ["class", "accepted", "zero_byte", "not_image", "corrupt"]
    assert target[1] == ["5", "12", "0", "0", "1"]  # the truncated PNG is in class 5
    assert [row[0] for row in target[1:]] == ["5", "6", "7", "8", "9"]
    assert markdown_rows(summary.split("## pretrain")[1])[0][0] == "class"  # pretrain's table


REJECTED = Path("reports/ingest/rejected.csv")


def test_summary_states_totals_budget_skipped_files_and_where_the_rejected_list_is(
    sources: Path, tmp_path: Path
) -> None:
    for name in (".DS_Store", "Thumbs.db"):  # hidden and system files are skipped, not read
        (sources / "target" / "5" / name).write_bytes(b"\0")
    params = parse_params(tiny_params(sources))
    manifest, reports = ingest(params.ingest, tmp_path / "ingested", tmp_path / "cache")
    summary = render_summary(manifest, reports, params.ingest, REJECTED)
    head = summary.split("## pretrain")[0]

    totals = markdown_rows(head)
    assert totals[0] == ["role", "files seen", "accepted", "rejected", "duplicates", "skipped"]
    expected: dict[str, tuple[int, int, int, int]] = {}
    for role, report in reports.items():
        verdicts = manifest.loc[manifest["role"] == role, "verdict"]
        files, accepted = len(verdicts), int((verdicts == "accepted").sum())
        duplicates = int((verdicts == "duplicate").sum())
        expected[role] = (files, accepted, files - accepted - duplicates, duplicates)
        skipped = sum(report.folder.skipped.values())
        assert [role, *map(str, expected[role]), str(skipped)] in totals
    assert expected["pretrain"][3] > 0  # the demo's rescanned digit: a duplicate, not an error
    files_target, _, rejected_target, duplicates_target = expected["target"]
    assert rejected_target > 0 and duplicates_target == 0

    for role in ROLES:
        files, _, rejected, _ = expected[role]
        budget = params.ingest.sources.for_role(role).max_reject_fraction
        assert rejected / files <= budget
        assert (
            f"- {role}: rejected {rejected} of {files} files ({rejected / files:.1%}); budget "
            f"{budget:.1%} (`ingest.sources.{role}.max_reject_fraction`): within"
        ) in head
    assert f"with its verdict and reason: `{REJECTED}`." in head

    pretrain = summary.split("## pretrain")[1].split("## target")[0]
    files, accepted, rejected, duplicates = expected["pretrain"]
    assert (
        f"{files} files seen: {accepted} accepted, {rejected} rejected, {duplicates} duplicate"
    ) in pretrain
    assert "Skipped: none." in pretrain
    assert reports["target"].folder.skipped == {"hidden or system file": 2}
    assert "Skipped: hidden or system file: 2." in summary.split("## target")[1]

    counts = summarise(reports)
    for role, (files, _, rejected, duplicates) in expected.items():
        assert (counts[role]["rejected"], counts[role]["duplicates"]) == (rejected, duplicates)
        assert counts[role]["rejected_fraction"] == rejected / files

    # The line says so when a source is over its budget (the stage then fails, but the words
    # must not depend on that).
    raw = tiny_params(sources)
    raw["ingest"]["sources"]["target"]["max_reject_fraction"] = rejected_target / files_target / 2
    over = render_summary(manifest, reports, parse_params(raw).ingest, REJECTED)
    assert "(`ingest.sources.target.max_reject_fraction`): over" in over
    assert "(`ingest.sources.pretrain.max_reject_fraction`): within" in over


def markdown_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row in ``text``, headers included, rule lines not."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    return [row for row in cells if not all(set(cell) <= set(":-") for cell in row)]


def test_rejection_budget_fails_with_fraction_budget_and_reasons(
    sources: Path, tmp_path: Path
) -> None:
    raw = tiny_params(sources)
    raw["ingest"]["sources"]["target"]["max_reject_fraction"] = 0.01
    params = parse_params(raw)
    with pytest.raises(IngestError) as caught:
        ingest(params.ingest, tmp_path / "ingested", tmp_path / "cache")
    message = str(caught.value)
    assert "source 'target': 4.8% of 63 files rejected" in message
    assert "ingest.sources.target.max_reject_fraction = 1.0%" in message
    assert "zero_byte: 1" in message and "corrupt: 1" in message and "not_image: 1" in message
    assert not (tmp_path / "ingested").exists()


def test_a_warm_cache_changes_nothing_but_speed(sources: Path, tmp_path: Path) -> None:
    params = parse_params(tiny_params(sources))
    cold_manifest, cold = ingest(params.ingest, tmp_path / "cold", tmp_path / "cache")
    warm_manifest, warm = ingest(params.ingest, tmp_path / "warm", tmp_path / "cache")
    assert warm["target"].folder.decoded == 0 < cold["target"].folder.decoded
    assert warm_manifest.equals(cold_manifest)
    assert render_summary(warm_manifest, warm, params.ingest, REJECTED) == render_summary(
        cold_manifest, cold, params.ingest, REJECTED
    )

    def listing(folder: Path) -> list[Path]:
        return sorted(path.relative_to(folder) for path in folder.rglob("*"))

    assert listing(tmp_path / "cold") == listing(tmp_path / "warm")


def lose_two_classes(target: Path) -> None:
    """An empty class folder and one whose files are all rejected, in ``target``."""
    (target / "empty class").mkdir()
    (target / "ghost").mkdir()
    (target / "ghost" / "readme.jpg").write_text("not an image\n")
    (target / "ghost" / "note.png").write_text("not one either\n")
    (target / "ghost" / "blank.png").write_bytes(b"")


def test_a_class_that_keeps_no_image_fails_ingest_naming_it(sources: Path, tmp_path: Path) -> None:
    lose_two_classes(sources / "target")
    params = parse_params(tiny_params(sources))
    with pytest.raises(IngestError) as caught:
        ingest(params.ingest, tmp_path / "ingested", tmp_path / "cache")
    message = str(caught.value)
    assert message.startswith("source 'target': 2 class folder(s) with no accepted image")
    assert "'empty class': no files to verify" in message
    assert "'ghost': all 3 files rejected (not_image: 2, zero_byte: 1)" in message
    assert "set ingest.lost_class: warn to go on without them" in message
    assert not (tmp_path / "ingested").exists()


def test_with_lost_class_warn_ingest_goes_on_and_reports_them(
    sources: Path, tmp_path: Path
) -> None:
    lose_two_classes(sources / "target")
    raw = tiny_params(sources)
    raw["ingest"]["lost_class"] = "warn"
    manifest, reports = ingest(parse_params(raw).ingest, tmp_path / "ingested", tmp_path / "cache")
    assert manifest_path(tmp_path / "ingested").is_file()  # written: the run went on
    assert list(reports["target"].lost) == ["empty class", "ghost"]
    assert reports["pretrain"].lost == {}
    counts = summarise(reports)
    assert counts["target"]["lost_classes"] == 2 and counts["pretrain"]["lost_classes"] == 0
    assert counts["target"]["classes"] == 5  # the classes that kept images
    summary = render_summary(manifest, reports, parse_params(raw).ingest, REJECTED)
    summary = summary.split("## target")[1]
    assert "- Warning: class 'empty class' has no accepted image and is left out" in summary
    assert "- Warning: class 'ghost' has no accepted image and is left out: all 3" in summary


def test_ingest_stage_prints_and_records_warnings(sources: Path, tmp_path: Path) -> None:
    lose_two_classes(sources / "target")
    look_alike = sources / "target" / "5\u200b"  # a zero-width space: looks like class 5
    look_alike.mkdir()
    shutil.copy2(ROOT / "data" / "demo" / "pretrain" / "0" / "digit-0000.png", look_alike)
    raw = tiny_params(sources)
    raw["ingest"]["lost_class"] = "warn"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copytree(ROOT / "tasks", tmp_path / "tasks")  # stages run from the project root
    result = run(["python", "-m", "tasks.ingest"], cwd=tmp_path)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: ingest target: class 'empty class' has no accepted image and is left out: "
        "no files to verify (empty, or only hidden files and linked folders)",
        "warning: ingest target: class 'ghost' has no accepted image and is left out: all 3 "
        "files rejected (not_image: 2, zero_byte: 1)",
        "warning: ingest target: class folders '5', '5\\u200b' look the same to a person but "
        "are 2 different classes to graft and DVC: rename or merge them unless that is meant",
    ]
    paths = parse_params(raw).paths.ingest
    metrics = json.loads((tmp_path / paths.metrics).read_text())
    assert metrics["target"]["lost_classes"] == 2
    assert "class folders '5', '5\\u200b' look the same" in (tmp_path / paths.summary).read_text()
