"""The workspace lock: one pipeline run per workspace, named when refused, freed when it dies."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, tool_env

from flows.workspace import WorkspaceBusy, workspace_lock

HOLD = """
import sys, time
from pathlib import Path
from flows.workspace import workspace_lock
with workspace_lock(Path(sys.argv[1]), wait_s=0):
    print("held", flush=True)
    time.sleep(600)
"""


def _hold_briefly(root: Path, wait_s: float) -> None:
    with workspace_lock(root, wait_s):
        pass


def test_a_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    lock = re.escape(str(tmp_path / ".graft" / "run.lock"))
    busy = rf"another graft run holds {lock} \(pid {os.getpid()}\); waited 0\.2s"
    with workspace_lock(tmp_path, wait_s=0), pytest.raises(WorkspaceBusy, match=busy):
        _hold_briefly(tmp_path, wait_s=0.2)
    _hold_briefly(tmp_path, wait_s=0)  # released on exit
    assert not (tmp_path / ".graft" / "run.lock.holder").exists()  # no stale holder named


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)],
        cwd=ROOT,  # flows/ is imported from the project root
        env=tool_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(WorkspaceBusy, match=rf"\(pid {holder.pid}\)"):
            _hold_briefly(tmp_path, wait_s=0)
    finally:
        holder.kill()  # SIGKILL: no finally block of the holder runs
        holder.wait()
    _hold_briefly(tmp_path, wait_s=5)  # the OS released it with the process
