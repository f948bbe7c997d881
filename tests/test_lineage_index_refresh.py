"""The lineage index: unreadable versions are read again later, and refreshes may run at once.

Each test builds a tiny real git + DVC project whose one stage writes what the index reads (a
manifest, a splits table and a model card, at the paths params.yaml names) and tags versions
in GTO's format; no pipeline run is needed for what the index does with them.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import pytest
import yaml
from helpers import run

from graft.registry import lineage_index
from graft.registry.lineage_index import open_index, refresh
from graft.registry.lineage_queries import which_models

PIPELINE = """\
stages:
  make:
    cmd: python make_tables.py
    deps: [make_tables.py, images.txt]
    outs: [data/ingested, data/splits.csv, models/package]
"""
# One accepted target image per line of images.txt (its sha256), all in the train split.
MAKE_TABLES = """\
import json, pathlib
shas = pathlib.Path("images.txt").read_text().split()
dataset, package = pathlib.Path("data/ingested"), pathlib.Path("models/package")
dataset.mkdir(parents=True, exist_ok=True)
package.mkdir(parents=True, exist_ok=True)
(dataset / "manifest.csv").write_text("role,label,path,sha256,verdict,reason\\n" + "".join(
    f"target,5,5/{sha}.png,{sha},accepted,\\n" for sha in shas))
pathlib.Path("data/splits.csv").write_text("role,sha256,label,split,path\\n" + "".join(
    f"target,{sha},5,train,5/{sha}.png\\n" for sha in shas))
(package / "model_card.json").write_text(json.dumps({"inputs_sha256": {"weights": shas[0]}}))
"""
PATHS = {
    "ingest": {"dataset": "data/ingested"},
    "split": {"splits": "data/splits.csv"},
    "register": {"package": "models/package"},
}


def sha(n: int) -> str:
    return f"{n:064x}"


def tiny_project(repo: Path, versions: int) -> Path:
    """A git + DVC project at ``repo`` with ``versions`` versions tagged ``m@v1.0.<i>``, the
    i-th holding images sha(0) to sha(i); no DVC remote."""
    repo.mkdir()
    (repo / "params.yaml").write_text(yaml.safe_dump({"paths": PATHS}))
    (repo / "dvc.yaml").write_text(PIPELINE)
    (repo / "make_tables.py").write_text(MAKE_TABLES)
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["dvc", "init", "-q"], repo)
    for i in range(versions):
        (repo / "images.txt").write_text("\n".join(sha(n) for n in range(i + 1)))
        run(["dvc", "repro", "-q"], repo)
        run(["git", "add", "-A"], repo)
        run(["git", "commit", "-q", "-m", f"version {i}"], repo)
        run(["git", "tag", "-a", f"m@v1.0.{i}", "-m", f"Registering artifact m version {i}"], repo)
    return repo


def statuses(index: Path, repo: Path, image: str) -> dict[str, str]:
    with open_index(index) as connection:
        return {v["version"]: v["status"] for v in which_models(connection, repo, image)}


def test_an_unreadable_version_is_read_once_its_data_is_there(tmp_path: Path) -> None:
    repo = tiny_project(tmp_path / "repo", versions=1)
    index = tmp_path / "index.sqlite"
    cache, aside = repo / ".dvc" / "cache", tmp_path / "cache"
    shutil.move(cache, aside)  # neither the cache nor a remote has the tables now
    with open_index(index) as connection:
        (report,) = which_models(connection, repo, sha(0))
    assert report["status"] == "unreadable"
    assert report["error"].startswith("RevisionError:") and "DVC cache" in report["error"]
    shutil.move(aside, cache)
    assert statuses(index, repo, sha(0)) == {"v1.0.0": "used"}


def test_a_version_whose_params_lack_a_path_is_unreadable(tmp_path: Path) -> None:
    repo = tiny_project(tmp_path / "repo", versions=1)
    (repo / "params.yaml").write_text(yaml.safe_dump({"paths": {"ingest": {}}}))
    run(["git", "commit", "-q", "-am", "not a graft layout"], repo)
    run(["git", "tag", "-a", "m@v1.0.1", "-m", "Registering artifact m version v1.0.1"], repo)
    with open_index(tmp_path / "index.sqlite") as connection:
        reports = {r["version"]: r for r in which_models(connection, repo, sha(0))}
    assert reports["v1.0.0"]["status"] == "used"
    assert reports["v1.0.1"]["status"] == "unreadable"
    assert "has no path paths.ingest.dataset" in reports["v1.0.1"]["error"]


def test_a_bug_while_reading_a_version_is_raised_not_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tiny_project(tmp_path / "repo", versions=1)

    def buggy(root: Path, commit: str) -> str:
        card: dict[str, str] = {}
        return card["weights"]  # a KeyError from a bug, not an unreadable version

    monkeypatch.setattr(lineage_index, "_weights_sha256", buggy)
    with open_index(tmp_path / "index.sqlite") as connection, pytest.raises(KeyError):
        refresh(connection, repo)


def test_concurrent_refreshes_all_succeed_and_store_each_table_once(tmp_path: Path) -> None:
    repo = tiny_project(tmp_path / "repo", versions=3)
    index = tmp_path / "index.sqlite"
    workers = 4
    start = threading.Barrier(workers)

    def build() -> list[str]:
        start.wait()  # all open the new file, create the schema and add tables at once
        with open_index(index) as connection:
            return [v.tag for v in refresh(connection, repo)]

    for _ in range(2):  # a second round races on a file that exists, with nothing to add
        with ThreadPoolExecutor(workers) as pool:
            results = [pool.submit(build) for _ in range(workers)]
            tags = [future.result() for future in results]
        assert tags == [["m@v1.0.0", "m@v1.0.1", "m@v1.0.2"]] * workers
    assert_built_once(index, repo)


def test_concurrent_refreshes_in_processes_all_succeed(tmp_path: Path) -> None:
    repo = tiny_project(tmp_path / "repo", versions=3)
    index = tmp_path / "index.sqlite"
    # Each process imports first, then waits for a common start time, so that they all open
    # the new file, create the schema and add tables at once.
    script = (
        "import sys, time; from pathlib import Path; "
        "from graft.registry.lineage_index import open_index, refresh\n"
        "time.sleep(max(0.0, float(sys.argv[3]) - time.time()))\n"
        "with open_index(Path(sys.argv[1])) as c: print(len(refresh(c, Path(sys.argv[2]))))"
    )
    start = time.time() + 3  # imports take about a second on a loaded machine
    command = [sys.executable, "-c", script, str(index), str(repo), str(start)]
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    assert [worker.communicate(timeout=120)[0] for worker in workers] == ["3\n"] * 3
    assert [worker.returncode for worker in workers] == [0] * 3
    assert_built_once(index, repo)


def assert_built_once(index: Path, repo: Path) -> None:
    """The index of tiny_project's three versions holds each table and row once, no errors."""
    with closing(sqlite3.connect(index)) as connection:
        keys = [key for (key,) in connection.execute("SELECT key FROM tables")]
        errors = connection.execute("SELECT error FROM versions").fetchall()
        members = connection.execute("SELECT COUNT(*) FROM split_members").fetchone()[0]
        rows = connection.execute("SELECT COUNT(*) FROM split_rows").fetchone()[0]
    assert len(keys) == len(set(keys)) == 6  # a manifest and a splits table per version
    assert errors == [(None,)] * 3
    assert (rows, members) == (3, 1 + 2 + 3)
    assert statuses(index, repo, sha(2)) == {
        "v1.0.0": "absent",
        "v1.0.1": "absent",
        "v1.0.2": "used",
    }
