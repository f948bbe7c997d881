"""Publish and lineage on a real git + DVC repository: two versions, different data and params.

One scenario, built once for the module: run the pipeline, publish v1.0.0; add two images,
remove one, change a param, run again and publish v1.0.1 to stage prod. The tests then read
both versions back through git, DVC and the lineage index, predict with each (graft predict)
and trace a prediction file back to its version.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import DEMO, copy_demo_subset, make_dvc_project, run

from graft.hashing import file_sha256
from graft.registry.publish import production_failures
from graft.registry.versions import Version, is_version, next_version

pytestmark = pytest.mark.slow
NAME = "digits-5-9"


def graft(repo: Path, *args: str, check: bool = True) -> Any:
    result = run(["python", "-m", "graft.cli.main", *args], repo, check=check)
    return result


def graft_json(repo: Path, *args: str) -> Any:
    return json.loads(graft(repo, *args, "--json").stdout)


@dataclass(frozen=True)
class Scenario:
    repo: Path
    sources: Path
    removed: Path  # in v1 only (its bytes are kept here)
    added: list[Path]  # in v2 only
    kept: Path  # in both
    v1: dict[str, Any]  # workspace facts at the time each version was published
    v2: dict[str, Any]


def _facts(repo: Path) -> dict[str, Any]:
    card = json.loads((repo / "models/package/model_card.json").read_text())
    return {
        "weights": file_sha256(repo / "models/package/model.pt"),
        "manifest": file_sha256(repo / "data/ingested/manifest.csv"),
        "splits_text": (repo / "data/splits.csv").read_text(),
        "card": card,
    }


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    base = tmp_path_factory.mktemp("lineage")
    sources = copy_demo_subset(base / "sources", per_class=10)
    repo = make_dvc_project(base / "repo", sources)  # the stages and the library they import
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pretrain"]["epochs"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "remote", "add", "-d", "store", str(base / "remote")], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "one pretrain epoch; a DVC remote"], repo)

    run(["dvc", "repro"], repo)
    graft(repo, "publish")
    v1 = _facts(repo)

    target = sources / "target"
    removed = sorted((target / "9").glob("digit-*.png"))[0]
    saved = base / removed.name
    shutil.move(removed, saved)
    added = []
    for label in ("5", "8"):
        extra = sorted((DEMO / "target" / label).glob("digit-*.png"))[10]
        added.append(Path(shutil.copy2(extra, target / label / extra.name)))
    params["finetune"]["head"]["lr"] = 0.004
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro"], repo)
    graft(repo, "publish", "--stage", "prod")
    v2 = _facts(repo)
    kept = sorted((target / "6").glob("digit-*.png"))[0]
    return Scenario(repo, sources, saved, added, kept, v1, v2)


def test_gto_lists_both_versions_and_the_stage(scenario: Scenario) -> None:
    shown = json.loads(run(["gto", "show", NAME, "--json"], scenario.repo).stdout)
    assert {v["version"] for v in shown} >= {"v1.0.0", "v1.0.1"}
    tags = run(["git", "tag", "-l"], scenario.repo).stdout.split()
    assert {f"{NAME}@v1.0.0", f"{NAME}@v1.0.1", f"{NAME}#prod#1"} <= set(tags)
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], scenario.repo).stdout == ""


def test_a_fresh_clone_reads_a_past_version_from_the_dvc_remote(
    scenario: Scenario, tmp_path: Path
) -> None:
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(scenario.repo), str(clone)], tmp_path)
    shown = graft_json(clone, "lineage", "show", f"{NAME}@v1.0.0")  # no DVC cache in a clone
    assert shown["model"]["sha256"] == scenario.v1["weights"]
    fetched = tmp_path / "model.pt"
    run(["dvc", "artifacts", "get", ".", NAME, "--rev", "v1.0.0", "-o", str(fetched)], clone)
    assert file_sha256(fetched) == scenario.v1["weights"]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_show_gives_each_versions_hashes_counts_and_params(
    scenario: Scenario, version: str
) -> None:
    facts = getattr(scenario, version)
    ref = {"v1": f"{NAME}@v1.0.0", "v2": f"{NAME}#prod"}[version]
    shown = graft_json(scenario.repo, "lineage", "show", ref)
    assert shown["tag"] == f"{NAME}@{'v1.0.0' if version == 'v1' else 'v1.0.1'}"
    assert shown["model"]["sha256"] == facts["weights"]
    assert shown["dataset"]["manifest_sha256"] == facts["manifest"]
    assert shown["split"]["counts"] == facts["card"]["data"]["splits"]
    targets = shown["dataset"]["accepted"]["target"]
    assert targets["total"] == (50 if version == "v1" else 50 - 1 + 2)
    assert shown["dataset"]["rejected"]["target"] == {"corrupt": 1, "zero_byte": 1, "not_image": 1}
    duplicates = shown["dataset"]["duplicates"]["target"]  # counted apart from rejections
    text = graft(scenario.repo, "lineage", "show", ref).stdout
    assert re.search(rf"target: .*; rejected [^;]+; duplicates {duplicates} \(kept once\)", text)
    lr = shown["finetune"]["params"]["finetune"]["head"]["lr"]
    assert lr == (0.003 if version == "v1" else 0.004)
    assert shown["pretrained"]["provenance"]["backbone"]["init"] == "scratch"
    assert [s["role"] for s in shown["sources"]] == ["pretrain", "target"]
    target = shown["sources"][1]  # the scan stage's fingerprint of the folder at that version
    assert len(target["sha256"]) == 64 and target["files"] == (53 if version == "v1" else 54)
    tagged = run(["git", "rev-parse", f"{shown['tag']}^{{commit}}"], scenario.repo).stdout.strip()
    assert shown["code"]["commit"] == tagged
    assert shown["code"]["dirty"] is False
    assert shown["environment"]["packages"]["torch"]
    assert shown["metrics"]["accuracy"] == facts["card"]["metrics"]["accuracy"]


def test_show_resolves_a_model_file_and_a_git_revision(scenario: Scenario, tmp_path: Path) -> None:
    model = scenario.repo / "models/package/model.pt"
    assert graft_json(scenario.repo, "lineage", "show", str(model))["tag"] == f"{NAME}@v1.0.1"
    first = graft_json(scenario.repo, "lineage", "show", "HEAD~1")  # the v1 commit
    assert first["model"]["sha256"] == scenario.v1["weights"]


def _predict(repo: Path, model: str, images: Path, out: Path) -> list[dict[str, str]]:
    graft(repo, "predict", model, str(images), "--out", str(out))
    with out.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_reads_each_version_at_its_commit_even_in_a_fresh_clone(
    scenario: Scenario, tmp_path: Path
) -> None:
    clone = tmp_path / "clone"  # no DVC cache: the weights come from the DVC remote
    run(["git", "clone", "-q", str(scenario.repo), str(clone)], tmp_path)
    images = scenario.sources / "target"
    tags = {"v1": f"{NAME}@v1.0.0", "v2": f"{NAME}@v1.0.1"}
    by_ref = {
        ref: _predict(clone, ref, images, tmp_path / f"{i}.csv")
        for i, ref in enumerate((f"{NAME}@v1.0.0", f"{NAME}@latest", f"{NAME}#prod"))
    }
    for ref, rows in by_ref.items():
        version = "v1" if ref.endswith("v1.0.0") else "v2"
        commit = run(["git", "rev-parse", f"{tags[version]}^{{commit}}"], clone).stdout.strip()
        assert {(r["model_version"], r["model_commit"], r["weights_sha256"]) for r in rows} == {
            (tags[version], commit, getattr(scenario, version)["weights"])
        }
        assert {r["verdict"] for r in rows} == {"accepted", "corrupt", "zero_byte", "not_image"}
    # The package file on disk is the v2 model: the same weights predict the same.
    on_disk = _predict(scenario.repo, "models/package", images, tmp_path / "disk.csv")
    assert {r["model_version"] for r in on_disk} == {tags["v2"]}
    latest = by_ref[f"{NAME}@latest"]
    assert [(r["class"], r["probability"]) for r in on_disk] == [
        (r["class"], r["probability"]) for r in latest
    ]
    # What the versions learnt differs, and their predictions on the test images say so.
    assert by_ref[f"{NAME}@v1.0.0"] != latest
    missing = graft(clone, "predict", f"{NAME}@v9.0.0", str(images), check=False)
    assert missing.returncode == 1
    assert f"error: model {NAME}@v9.0.0: no published version {NAME}@v9.0.0" in missing.stderr


def test_lineage_show_of_a_prediction_file_names_its_version(
    scenario: Scenario, tmp_path: Path
) -> None:
    images = scenario.sources / "target" / "6"
    predictions = tmp_path / "predictions.jsonl"
    graft(scenario.repo, "predict", f"{NAME}#prod", str(images), "--out", str(predictions))
    shown = graft_json(scenario.repo, "lineage", "show", str(predictions))
    assert shown["tag"] == f"{NAME}@v1.0.1"
    assert shown["predictions"]["rows"] == len([p for p in images.iterdir()])
    assert shown["predictions"]["weights_match"] is True
    text = graft(scenario.repo, "lineage", "show", str(predictions)).stdout
    assert text.startswith(f"{predictions}: ") and f"every row by {NAME}@v1.0.1" in text
    older = tmp_path / "older.jsonl"
    graft(scenario.repo, "predict", f"{NAME}@v1.0.0", str(images), "--out", str(older))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(predictions.read_text() + older.read_text())
    refused = graft(scenario.repo, "lineage", "show", str(mixed), check=False)
    assert refused.returncode == 1
    assert f"rows by {NAME}@v1.0.1" in refused.stderr and f"rows by {NAME}@v1.0.0" in refused.stderr


def test_which_models_finds_an_image_only_where_it_was_used(scenario: Scenario) -> None:
    def which(image: Path) -> dict[str, dict[str, Any]]:
        report = graft_json(scenario.repo, "lineage", "which-models", str(image))
        return {v["version"]: v for v in report["versions"]}

    removed = which(scenario.removed)
    assert removed["v1.0.0"]["status"] == "used"
    assert removed["v1.0.1"]["status"] == "absent"
    (entry,) = removed["v1.0.0"]["entries"]
    split_v1 = _split_of(scenario.v1["splits_text"], file_sha256(scenario.removed))
    assert (entry["role"], entry["label"], entry["split"]) == ("target", "9", split_v1)

    added = which(scenario.added[0])
    assert added["v1.0.0"]["status"] == "absent"
    assert added["v1.0.1"]["status"] == "used"
    kept = which(scenario.kept)
    assert {kept[v]["status"] for v in kept} == {"used"}


def test_which_models_reports_rejections_with_the_reason(scenario: Scenario) -> None:
    broken = scenario.sources / "target" / "5" / "truncated.png"
    report = graft_json(scenario.repo, "lineage", "which-models", str(broken))
    for version in report["versions"]:
        assert version["status"] == "rejected"
        assert [e["verdict"] for e in version["entries"]] == ["corrupt"]


def test_diff_lists_exactly_the_changed_images_and_param(scenario: Scenario) -> None:
    changes = graft_json(scenario.repo, "lineage", "diff", f"{NAME}@v1.0.0", f"{NAME}@v1.0.1")
    added = {row["sha256"] for g in changes["images"].values() for row in g["added"]}
    removed = {row["sha256"] for g in changes["images"].values() for row in g["removed"]}
    moved = added & removed  # a new image may move one existing image across a split cut
    assert added - moved == {file_sha256(p) for p in scenario.added}
    assert removed - moved == {file_sha256(scenario.removed)}
    assert changes["params"] == {"finetune.head.lr": {"a": 0.003, "b": 0.004}}
    assert len(changes["code"]["commits"]) == 1 and changes["code"]["files"] == []


def test_publishing_a_stale_pipeline_is_refused(scenario: Scenario) -> None:
    repo = scenario.repo
    params_file = repo / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["finetune"]["head"]["lr"] = 0.005
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        refused = graft(repo, "publish", check=False)
    finally:
        params_file.write_text(original)
    assert refused.returncode == 1
    assert "not up to date" in refused.stderr and "finetune" in refused.stderr
    again = graft(repo, "publish", check=False)  # up to date, but nothing new to publish
    assert again.returncode == 1 and "already published" in again.stderr


def test_production_margin_and_version_bumps() -> None:
    prod = {"tag": f"{NAME}@v1.0.0", "accuracy": 0.9}
    assert production_failures(0.89, prod, max_drop=0.02) == []
    assert production_failures(0.95, None, max_drop=0.0) == []
    (failure,) = production_failures(0.85, prod, max_drop=0.02)
    assert "register.max_drop_vs_prod 0.02" in failure and "v1.0.0" in failure
    existing = [Version(NAME, "v1.2.3", f"{NAME}@v1.2.3", "t", "c", 0)]
    assert next_version([], "patch") == "v1.0.0"
    assert is_version("v1.2.3") and is_version("v1.0.0-rc.1")
    assert not is_version("1.2.3") and not is_version("v1.2") and not is_version("latest")
    assert [next_version(existing, b) for b in ("patch", "minor", "major")] == [
        "v1.2.4",
        "v1.3.0",
        "v2.0.0",
    ]


def _split_of(splits_text: str, sha256: str) -> str:
    for line in splits_text.splitlines():
        fields = line.split(",")
        if fields[1] == sha256:
            return fields[3]
    raise AssertionError(f"{sha256} not in splits")
