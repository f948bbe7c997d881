"""The ingested dataset is versioned by DVC: any past revision's exact images can be fetched."""

from __future__ import annotations

import shutil
from pathlib import Path

import dvc.api
import pandas as pd
import pytest
from helpers import run

pytestmark = pytest.mark.slow


def test_past_revision_images_come_back_from_the_remote(
    dvc_project: Path, sources: Path, tmp_path: Path
) -> None:
    repo = dvc_project
    run(["dvc", "remote", "add", "-d", "store", str(tmp_path / "remote")], repo)
    run(["dvc", "repro", "ingest"], repo)
    run(["dvc", "push"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "data v1"], repo)
    first = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()

    removed = sources / "target" / "9" / sorted(p.name for p in (sources / "target/9").iterdir())[0]
    removed_bytes = removed.read_bytes()
    removed.unlink()
    run(["dvc", "repro", "ingest"], repo)
    run(["dvc", "push"], repo)
    run(["git", "commit", "-q", "-am", "data v2"], repo)
    shutil.rmtree(repo / ".dvc" / "cache")  # only the remote holds the data now

    with dvc.api.open("data/ingested/manifest.csv", repo=str(repo), rev=first) as stream:
        old = pd.read_csv(stream, dtype=str)
    row = old[(old["role"] == "target") & (old["path"] == f"9/{removed.name}")].iloc[0]
    assert row["verdict"] == "accepted"
    current = pd.read_csv(repo / "data/ingested/manifest.csv", dtype=str)
    assert f"9/{removed.name}" not in set(current["path"])

    sha = row["sha256"]
    fetched = tmp_path / "fetched.png"
    run(["graft", "lineage", "image", sha, "--rev", first, "-o", str(fetched)], repo)
    assert fetched.read_bytes() == removed_bytes

    # A damaged copy is refused, never handed over: one byte of that image flipped in the
    # remote's copy of its shard (the local cache is gone, so the remote is what DVC reads).
    with dvc.api.open("data/ingested/index.csv", repo=str(repo), rev=first) as stream:
        index = pd.read_csv(stream, dtype={"offset": int, "size": int})
    at = index[index["sha256"] == sha].iloc[0]
    start, end = int(at["offset"]), int(at["offset"]) + int(at["size"])
    damaged = []
    for stored in sorted(p for p in (tmp_path / "remote").rglob("*") if p.is_file()):
        data = bytearray(stored.read_bytes())
        if data[:2] == b"PK" and data[start:end] == removed_bytes:
            data[start + len(removed_bytes) // 2] ^= 0xFF
            stored.chmod(0o644)
            stored.write_bytes(bytes(data))
            damaged.append(stored)
    assert len(damaged) == 1
    shutil.rmtree(repo / ".dvc" / "cache", ignore_errors=True)
    refused = tmp_path / "refused.png"
    fetch = ["graft", "lineage", "image", sha, "--rev", first, "-o", str(refused)]
    failed = run(fetch, repo, check=False)
    assert failed.returncode != 0 and "damaged" in failed.stderr, failed.stderr
    assert not refused.exists()
