"""An S3 DVC remote on a real S3-compatible server (SeaweedFS on 127.0.0.1), end to end.

One project for the module: the tiny pipeline run with `dvc repro`, then `graft publish`,
which pushes to the S3 remote. Fresh clones with empty DVC caches then get everything back
from the object store alone.
"""

from __future__ import annotations

import csv
import hashlib
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import copy_demo_subset, make_dvc_project, pipeline_is_current, run, tool_env
from object_store import ACCESS_KEY, SECRET_KEY, ObjectStore, seaweedfs

pytestmark = pytest.mark.slow
NAME = "digits-5-9"


@dataclass(frozen=True)
class Published:
    repo: Path
    store: ObjectStore
    tag: str


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Published]:
    base = tmp_path_factory.mktemp("s3")
    with seaweedfs(base / "seaweedfs") as store:
        sources = copy_demo_subset(base / "sources", per_class=8)
        repo = make_dvc_project(base / "repo", sources)
        store.add_dvc_remote(repo, prefix="dvc")
        run(["git", "add", "-A"], repo)
        run(["git", "commit", "-q", "-m", "an S3 DVC remote"], repo)
        run(["dvc", "repro"], repo)
        run(["python", "-m", "graft.cli.main", "publish"], repo)
        tag = run(["git", "describe", "--tags", "--exact-match", "HEAD"], repo).stdout.strip()
        yield Published(repo, store, tag)


def clone_of(published: Published, destination: Path, credentials: bool = True) -> Path:
    run(["git", "clone", "-q", str(published.repo), str(destination)], destination.parent)
    if credentials:
        published.store.add_credentials(destination)
    assert not (destination / ".dvc" / "cache").exists()  # nothing but what git carries
    return destination


def test_publish_pushed_everything_and_a_fresh_clone_pulls_it(
    published: Published, tmp_path: Path
) -> None:
    assert published.tag.startswith(f"{NAME}@v")
    assert "in sync" in run(["dvc", "status", "--cloud"], published.repo).stdout
    clone = clone_of(published, tmp_path / "clone")
    run(["dvc", "pull"], clone)
    assert pipeline_is_current(clone)
    for out in ("models/package/model.pt", "data/ingested/manifest.csv"):
        assert (clone / out).read_bytes() == (published.repo / out).read_bytes()


def test_one_image_of_a_version_comes_back_with_dvc_get(
    published: Published, tmp_path: Path
) -> None:
    clone = clone_of(published, tmp_path / "clone", credentials=False)
    env = {**tool_env(), "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}

    def get(path: str, out: Path) -> Path:
        import subprocess

        command = ["dvc", "get", ".", path, "--rev", published.tag, "-o", str(out)]
        done = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return out

    index = get("data/ingested/index.csv", tmp_path / "index.csv")
    with index.open(newline="") as handle:
        row = next(csv.DictReader(handle))
    shard = get(f"data/ingested/shards/{row['shard']}", tmp_path / "shard.zip")
    with zipfile.ZipFile(shard) as archive:
        member = next(name for name in archive.namelist() if name.startswith(row["sha256"]))
        image = archive.read(member)
    assert hashlib.sha256(image).hexdigest() == row["sha256"]
    assert not (clone / ".dvc" / "cache" / "files").exists()  # from the object store alone


def test_lineage_show_reads_a_version_from_the_object_store(
    published: Published, tmp_path: Path
) -> None:
    clone = clone_of(published, tmp_path / "clone")
    shown = json.loads(
        run(
            ["python", "-m", "graft.cli.main", "lineage", "show", published.tag, "--json"], clone
        ).stdout
    )
    package = published.repo / "models" / "package" / "model.pt"
    assert shown["model"]["sha256"] == hashlib.sha256(package.read_bytes()).hexdigest()
    assert shown["tag"] == published.tag
