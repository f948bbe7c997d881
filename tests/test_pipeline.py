"""The whole pipeline through the real `dvc` command in a real git + DVC repository.

Proves the caching contract: only the scan of the source folders (dvc.yaml's one
``always_changed`` stage) re-runs when nothing changed, a finetune parameter re-runs exactly
finetune and baseline -> evaluate -> figures -> register, and a new image re-runs everything
from ingest.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import SCAN_STAGE, pipeline_is_current, run

pytestmark = pytest.mark.slow

ALL_STAGES = [
    SCAN_STAGE, "ingest", "split", "pretrain", "finetune", "baseline", "evaluate", "figures",
    "register",
]  # fmt: skip


def repro(repo: Path) -> list[str]:
    """Run `dvc repro` and return the stages it actually ran, in order."""
    result = run(["dvc", "repro"], repo)
    return re.findall(r"Running stage '([\w-]+)'", result.stdout)


def test_repro_runs_every_stage_then_only_what_changed(dvc_project: Path, sources: Path) -> None:
    repo = dvc_project
    assert repro(repo) == ALL_STAGES

    # Real outputs, in the places params.yaml names.
    manifest = (repo / "data/ingested/manifest.csv").read_text()
    assert "truncated.png" in manifest and "corrupt" in manifest
    ingest_counts = json.loads((repo / "reports/ingest/metrics.json").read_text())
    assert ingest_counts["target"]["verdicts"] == {
        "accepted": 60,
        "zero_byte": 1,
        "not_image": 1,
        "corrupt": 1,
        "unsupported": 0,
        "too_small": 0,
        "too_large": 0,
        "timeout": 0,
        "unreadable": 0,
        "duplicate": 0,
        "label_conflict": 0,
    }
    evaluation = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    assert evaluation["test_images"] == 15 and 0.0 <= evaluation["accuracy"] <= 1.0
    card = json.loads((repo / "models/package/model_card.json").read_text())
    assert card["classes"] == ["5", "6", "7", "8", "9"]
    assert card["metrics"]["accuracy"] == evaluation["accuracy"]
    weights = torch.load(repo / "models/package/model.pt", weights_only=True)
    assert weights["meta"]["arch"] == "resnet18"
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "first run"], repo)
    assert run(["git", "status", "--porcelain"], repo).stdout == ""  # outputs not in git

    # Nothing changed: only the scan runs (always), and DVC agrees everything else is current.
    assert repro(repo) == [SCAN_STAGE]
    assert pipeline_is_current(repo)
    assert run(["git", "status", "--porcelain"], repo).stdout == ""  # the same fingerprints

    # A finetune parameter: exactly finetune and what depends on it.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["finetune"]["head"]["lr"] = params["finetune"]["head"]["lr"] / 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # (baseline runs the same finetune recipe from random weights, so it reads them too.)
    ran = repro(repo)
    assert ran[0] == SCAN_STAGE
    assert sorted(ran[1:3]) == ["baseline", "finetune"]
    assert ran[3:] == ["evaluate", "figures", "register"]

    # A new image in a source folder outside the repository: re-run from ingest.
    new_image = sources / "target" / "8" / "new-scan.png"
    shutil.copy2(next(iter(sorted((repo.parent / "sources/pretrain/0").glob("*.png")))), new_image)
    # (Every stage reads the dataset, directly or through one that does: all of them re-run.)
    assert repro(repo) == ALL_STAGES
    assert "new-scan.png" in (repo / "data/ingested/manifest.csv").read_text()
    assert repro(repo) == [SCAN_STAGE]
    assert pipeline_is_current(repo)


def test_bad_params_stop_the_first_stage_before_any_work(dvc_project: Path) -> None:
    repo = dvc_project
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["register"]["min_accuracy"] = 1.5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    failed = run(["dvc", "repro"], repo, check=False)
    assert failed.returncode != 0
    assert "register.min_accuracy" in failed.stderr
    # The first stage is the scan: it reads (and checks) params.yaml before any work too.
    assert re.findall(r"Running stage '([\w-]+)'", failed.stdout) == [SCAN_STAGE]
    assert not (repo / "data").exists() and not (repo / "reports").exists()
