"""DVC's files stay readable when a DVC command is killed while writing them (flows/dvc_files.py).

DVC rewrites dvc.lock in place: a `dvc repro` killed in that instant leaves it cut short and
every later DVC command refuses the project. The fault-injection suite hits it at random; here
each case is made on purpose, on a real git + DVC project, and checked with the real `dvc`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run, tool_env

from flows.dvc_files import (
    LOCKFILE,
    RWLOCK,
    WHOLE_COPY,
    keep_whole_copy,
    lockfile_is_whole,
    repair_dvc_files,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def locked(dvc_project: Path) -> Path:
    """The project with `ingest` run (after the scan it depends on), so that dvc.lock
    records those two stages."""
    run(["dvc", "repro", "ingest"], dvc_project)
    return dvc_project


def dvc_status(repo: Path) -> subprocess.CompletedProcess[str]:
    """`dvc status` of ingest alone: the scan it follows is "always changed" (dvc.yaml)."""
    return run(["dvc", "status", "ingest"], repo, check=False)


def test_a_cut_short_dvc_lock_is_put_back_from_its_last_whole_copy(locked: Path) -> None:
    lockfile = locked / LOCKFILE
    whole = lockfile.read_text()
    keep_whole_copy(locked)
    # Killed while DVC was writing it, at a line boundary: still YAML that DVC's schema takes,
    # but the entry it was writing has its path and nothing else.
    entry = whole.index("- path:", len(whole) // 2)
    lockfile.write_text(whole[: whole.index("\n", entry) + 1])
    assert not lockfile_is_whole(lockfile)
    assert "up to date" not in dvc_status(locked).stdout  # DVC misreads the project as it is
    (repair,) = repair_dvc_files(locked)
    assert "put back its last whole copy" in repair
    assert lockfile.read_text() == whole
    assert "up to date" in dvc_status(locked).stdout
    assert repair_dvc_files(locked) == []  # nothing more to do


def test_without_a_copy_a_broken_dvc_lock_is_removed_and_dvc_works_again(locked: Path) -> None:
    (locked / LOCKFILE).write_text("")  # truncated, nothing written yet
    assert not (locked / WHOLE_COPY).exists()
    (repair,) = repair_dvc_files(locked)
    assert "removed it" in repair and not (locked / LOCKFILE).exists()
    assert dvc_status(locked).returncode == 0  # the stage is simply stale again


def test_a_cut_short_rwlock_is_removed(locked: Path) -> None:
    (locked / RWLOCK).write_text('{"read": {"data/')
    (repair,) = repair_dvc_files(locked)
    assert "rwlock" in repair and not (locked / RWLOCK).exists()
    assert dvc_status(locked).returncode == 0


def test_nothing_is_touched_while_another_dvc_command_holds_the_lock(locked: Path) -> None:
    (locked / LOCKFILE).write_text("")  # as if that command were writing it right now
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_DVC_LOCK], cwd=locked, env=tool_env(),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert repair_dvc_files(locked) == []
        assert (locked / LOCKFILE).read_text() == ""
    finally:
        holder.kill()
        holder.wait()


def test_a_half_written_lockfile_is_never_kept_as_the_whole_copy(locked: Path) -> None:
    keep_whole_copy(locked)
    whole = (locked / WHOLE_COPY).read_text()
    (locked / LOCKFILE).write_text("schema: '2.0'\nstages:\n  ingest:\n    cmd: [")
    keep_whole_copy(locked)
    assert (locked / WHOLE_COPY).read_text() == whole


HOLD_DVC_LOCK = """
import sys, time
from dvc.repo import Repo
repo = Repo(".")
repo.lock.lock()
print("locked", flush=True)
time.sleep(60)
"""
