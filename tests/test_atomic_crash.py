"""A writer killed with SIGKILL inside ``atomic_path`` leaves its temporary; the next write of
the same destination removes it, and never a running writer's.

Each writer is a real child process (this environment's python importing graft) that stops
inside the write and is killed there for real: nothing is faked but the timing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, poll_until, tool_env

from graft.atomic import atomic_path, write_text

# Fills the temporary, prints its path and waits inside the write until it is killed. With
# "retire", it replaces an existing folder and waits after moving the old one aside, before
# removing it: the instant a kill leaves the `.old-` folder behind.
WRITER = """\
import sys, threading
from pathlib import Path
import graft.atomic
from graft.atomic import atomic_path

destination, how = Path(sys.argv[1]), sys.argv[2]
forever = threading.Event()
if how == "retire":
    def stuck_rmtree(path, ignore_errors=False):
        print(path, flush=True)
        forever.wait()
    graft.atomic.shutil.rmtree = stuck_rmtree
with atomic_path(destination, directory=how != "file") as temporary:
    if how == "file":
        temporary.write_text("half a file")
    else:
        (temporary / "part").write_text("half a folder")
    if how != "retire":
        print(temporary, flush=True)
        forever.wait()
"""


def stop_inside_write(
    children: list[subprocess.Popen[str]], destination: Path, how: str
) -> tuple[subprocess.Popen[str], Path]:
    """Start a writer of ``destination`` (``how``: file, folder or retire) and return it with
    the path it left its work in, once it is waiting inside the write."""
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(destination), how],
        cwd=ROOT,
        env=tool_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    children.append(process)
    assert process.stdout is not None
    line = process.stdout.readline().strip()  # blocks until the writer is inside
    assert line, f"the writer exited ({process.wait()}) before reaching the write"
    return process, Path(line)


def kill(process: subprocess.Popen[str]) -> None:
    """SIGKILL ``process`` and reap it, as its parent (DVC, a shell) would."""
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


@pytest.mark.parametrize("how", ["file", "folder"])
def test_a_killed_writers_temporary_is_removed_by_the_next_write(
    tmp_path: Path, children: list[subprocess.Popen[str]], how: str
) -> None:
    destination = tmp_path / ("metrics.json" if how == "file" else "package")
    process, temporary = stop_inside_write(children, destination, how)
    kill(process)
    assert temporary.name.startswith(f".{destination.name}.tmp-{process.pid}-")
    assert names(tmp_path) == [temporary.name]  # SIGKILL ran no clean-up: it stays

    with atomic_path(destination, directory=how == "folder") as fresh:
        if how == "file":
            fresh.write_text("whole")
        else:
            (fresh / "model.pt").write_text("whole")

    assert names(tmp_path) == [destination.name]
    written = destination if how == "file" else destination / "model.pt"
    assert written.read_text() == "whole"


def test_a_writer_killed_while_retiring_the_old_folder_leaves_nothing_after_the_next(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    destination = tmp_path / "package"
    with atomic_path(destination, directory=True) as first:
        (first / "model.pt").write_text("v1")
    process, retired = stop_inside_write(children, destination, "retire")
    kill(process)
    # Killed after the new folder took the destination's place, before the old was removed.
    assert retired.name.startswith(f".package.old-{process.pid}-")
    assert names(tmp_path) == sorted(["package", retired.name])
    assert names(retired / "package") == ["model.pt"]

    with atomic_path(destination, directory=True) as fresh:
        (fresh / "model.pt").write_text("v3")

    assert names(tmp_path) == ["package"]
    assert (destination / "model.pt").read_text() == "v3"


def test_a_running_writers_temporary_is_left_alone(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    destination = tmp_path / "metrics.json"
    running, theirs = stop_inside_write(children, destination, "file")

    write_text(destination, "ours")

    assert destination.read_text() == "ours"
    assert theirs.read_text() == "half a file"  # the other writer may still finish
    assert names(tmp_path) == sorted(["metrics.json", theirs.name])
    kill(running)
    write_text(destination, "ours again")
    assert names(tmp_path) == ["metrics.json"]


def test_only_the_destinations_own_dead_temporaries_are_removed(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    # A dead writer's temporary of another destination whose name begins the same, one of
    # another machine and one from before names carried a writer: none is ours to remove.
    process, theirs = stop_inside_write(children, tmp_path / "metrics.json.tmp-1", "file")
    kill(process)
    _, _, host, _ = theirs.name.rsplit("-", 3)
    other_machine = tmp_path / f".metrics.json.tmp-{process.pid}-{'0' * len(host)}-abc_1234"
    unnamed = tmp_path / ".metrics.json.tmp-k2j4h5l6"
    for leftover in (other_machine, unnamed):
        leftover.write_text("leftover")
    own_pid_mine = tmp_path / f".metrics.json.tmp-{os.getpid()}-{host}-abc_1234"
    own_pid_mine.write_text("another thread of this process")

    write_text(tmp_path / "metrics.json", "whole")

    assert names(tmp_path) == sorted(
        ["metrics.json", theirs.name, other_machine.name, unnamed.name, own_pid_mine.name]
    )


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="zombies are told by /proc")
def test_a_killed_writer_not_yet_reaped_counts_as_dead(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    destination = tmp_path / "metrics.json"
    process, temporary = stop_inside_write(children, destination, "file")
    process.send_signal(signal.SIGKILL)  # and not reaped: a zombie until the fixture waits
    poll_until(
        lambda: Path(f"/proc/{process.pid}/stat").read_text().rpartition(")")[2].split()[0],
        lambda state: state == "Z",
        "the killed writer to become a zombie",
        timeout_s=10,
        interval_s=0.05,
    )

    write_text(destination, "whole")

    assert names(tmp_path) == ["metrics.json"]
    assert not temporary.exists()
