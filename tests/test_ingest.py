"""The ingest stage: budget, reports, and a dataset that holds exactly the verified bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import tiny_params

from graft.config.params import parse_params
from graft.data.ingest import IngestError, ingest, render_summary
from graft.data.layout import image_path, read_manifest
from graft.hashing import file_sha256


def test_dataset_holds_each_accepted_image_once_by_content(sources: Path, tmp_path: Path) -> None:
    params = parse_params(tiny_params(sources))
    before = {p: file_sha256(p) for p in sources.rglob("*") if p.is_file()}
    manifest, reports = ingest(params.ingest, tmp_path / "ingested", tmp_path / "cache")
    assert {p: file_sha256(p) for p in sources.rglob("*") if p.is_file()} == before  # untouched

    accepted = manifest[manifest["verdict"] == "accepted"]
    assert len(accepted) == 60 + 60
    for role, path, sha256 in zip(
        accepted["role"], accepted["path"], accepted["sha256"], strict=True
    ):
        stored = image_path(tmp_path / "ingested", str(sha256))
        assert file_sha256(stored) == sha256
        assert stored.read_bytes() == (sources / str(role) / str(path)).read_bytes()
    stored_files = list((tmp_path / "ingested" / "images").rglob("*"))
    assert len([p for p in stored_files if p.is_file()]) == accepted["sha256"].nunique()
    assert read_manifest(tmp_path / "ingested").equals(manifest)  # schema-checked round trip

    summary = render_summary(manifest, reports)
    target = markdown_rows(summary.split("## target")[1])
    assert target[0] == ["class", "accepted", "zero_byte", "not_image", "corrupt"]
    assert target[1] == ["5", "12", "0", "0", "1"]  # the truncated PNG is in class 5
    assert [row[0] for row in target[1:]] == ["5", "6", "7", "8", "9"]
    assert markdown_rows(summary.split("## target")[0])[0][0] == "class"  # pretrain's table


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
    assert warm["target"].decoded == 0 < cold["target"].decoded
    assert warm_manifest.equals(cold_manifest)
    assert render_summary(warm_manifest, warm) == render_summary(cold_manifest, cold)

    def listing(folder: Path) -> list[Path]:
        return sorted(path.relative_to(folder) for path in folder.rglob("*"))

    assert listing(tmp_path / "cold") == listing(tmp_path / "warm")
