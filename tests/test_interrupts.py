"""Interrupts stop everything a run owns, and DVC's locks never stop the next run.

Real processes throughout: `graft run` on a temporary git + DVC copy of the project whose
pretrain would train for hours, interrupted a moment after its stage command starts, against a
real `prefect server start` (temporary PREFECT_HOME) that tells how the run ended. Ingest and
split run once for the module, so each `graft run pretrain` reaches its stage in seconds.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml
from helpers import (
    ROOT,
    SCAN_STAGE,
    copy_demo_subset,
    make_dvc_project,
    poll_until,
    run,
    tool_env,
)
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from prefect.client.schemas.objects import StateType

from flows.local_server import local_prefect_server
from flows.stages import is_up_to_date
from flows.workspace import STAGE_RECORD, workspace_lock
from graft.processes import dvc_command, start_in_own_session, stop_session

pytestmark = pytest.mark.slow

EXIT_WITHIN_S = 10  # the promise: an interrupted run has exited within this
START_WITHIN_S = 180  # graft run up to its stage command; a loaded CI machine can be slow


@dataclass(frozen=True)
class Server:
    url: str
    env: dict[str, str]  # for every process that talks to this server
    home: Path  # its PREFECT_HOME, holding its database


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("prefect-home")
    env = {**tool_env(), "PREFECT_SERVER_UI_ENABLED": "false"}
    with local_prefect_server(home, env) as (url, server_env):
        yield Server(url, server_env, home)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project with ingest and split done, and a pretrain and a baseline that would run
    for hours."""
    base = tmp_path_factory.mktemp("interrupts")
    repo = make_dvc_project(
        base / "repo", copy_demo_subset(base / "sources", per_class=12), with_flows=True
    )
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pretrain"].update(epochs=100_000, patience=100_000)
    params["finetune"]["head"]["epochs"] = 100_000  # baseline too, beside pretrain
    params["finetune"]["patience"] = 100_000
    params["run"]["max_parallel"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro", "split"], repo)
    return repo


# The flow in a process of its own, as a worker's or `graft serve`'s flow-run process runs it:
# Prefect's own signal handling, none of graft run's.
# SIGHUP as a worker leaves it for its flow-run processes, even when the tests run under
# `nohup` (which makes every child ignore it, and a hangup then rightly does nothing).
FLOW_PROCESS = (
    "import signal, sys; signal.signal(signal.SIGHUP, signal.SIG_DFL); "
    "from flows.pipeline import pipeline; pipeline(stages=sys.argv[1:])"
)


class GraftRun:
    """`graft run <stages>` (or, with ``flow_process``, the flow in a plain Python process) in
    a process group of its own, as a terminal starts a command; its output (stdout and
    stderr) collected line by line."""

    def __init__(
        self, repo: Path, env: dict[str, str], *stages: str, flow_process: bool = False
    ) -> None:
        command = [sys.executable, "-c", FLOW_PROCESS] if flow_process else ["graft", "run"]
        self.process = subprocess.Popen(
            [*command, *stages], cwd=repo, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def tree(self) -> list[psutil.Process]:
        """Every process `graft run` started, and what they started."""
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def wait_for_stage_command(self, stage: str) -> list[psutil.Process]:
        """Wait until ``stage``'s own command (``python -m tasks.<stage>``) runs; return the
        whole tree then, each process's command line in ``info["cmdline"]``."""

        def probe() -> list[psutil.Process]:
            assert self.process.poll() is None, f"graft run ended early:\n{self.output}"
            return self.tree()

        tree = poll_until(
            probe,
            lambda tree: any(f"tasks.{stage}" in " ".join(_cmdline(p)) for p in tree),
            f"`python -m tasks.{stage}` under graft run",
            START_WITHIN_S,
            interval_s=0.2,
            describe=lambda _: self.output,
        )
        for process in tree:  # what each was, for checks made once they are gone
            process.info = {"cmdline": _cmdline(process)}
        return tree

    def wait(self, timeout_s: float) -> float:
        """Wait for `graft run` to exit; return how many seconds that took."""
        started = time.monotonic()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(
                f"graft run still running after {timeout_s}s:\n{self.output}"
            ) from None
        self._reader.join(timeout=5)
        return time.monotonic() - started

    def flow_run_name(self) -> str:
        found = re.search(r"Beginning flow run '([^']+)'", self.output)
        assert found, self.output
        return found.group(1)


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:  # exited, or a zombie
        return []


def _running(processes: list[psutil.Process]) -> list[str]:
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{process.pid}: {' '.join(process.cmdline())}")
        except psutil.NoSuchProcess:
            continue
    return alive


def _state_of(server: Server, flow_run_name: str) -> StateType | None:
    with SyncPrefectClient(server.url) as client:
        (flow_run,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[flow_run_name]))
        )
    return flow_run.state.type if flow_run.state else None


def _interrupt(
    repo: Path, env: dict[str, str], signum: int, whole_group: bool
) -> tuple[GraftRun, list[psutil.Process], float]:
    """`graft run pretrain`, interrupted by ``signum`` once pretrain's command runs: sent to
    its process group (a terminal's Ctrl-C) or to its pid only (kill, a service manager).
    Returns the run, every process it had started, and the seconds it took to exit."""
    graft = GraftRun(repo, env, "pretrain")
    tree = graft.wait_for_stage_command("pretrain")
    if whole_group:
        os.killpg(graft.process.pid, signum)
    else:
        graft.process.send_signal(signum)
    seconds = graft.wait(timeout_s=60)  # the promise is checked below, with the output
    print(f"{signal.Signals(signum).name}: graft run exited after {seconds:.1f}s")
    return graft, tree, seconds


def _assert_stopped_cleanly(
    repo: Path, graft: GraftRun, tree: list[psutil.Process], seconds: float, signum: int
) -> None:
    assert seconds < EXIT_WITHIN_S, graft.output
    assert graft.process.returncode == 128 + signum, graft.output
    assert _running(tree) == []  # dvc repro, the stage command, a temporary server
    name = signal.Signals(signum).name
    stopped = f"interrupted by {name}: stage pretrain was stopped with its whole process tree"
    assert stopped in graft.output
    assert "Traceback" not in graft.output
    assert not (repo / ".graft" / STAGE_RECORD).exists()


def test_ctrl_c_stops_the_stage_tree_and_the_run_ends_crashed(repo: Path, server: Server) -> None:
    graft, tree, seconds = _interrupt(repo, server.env, signal.SIGINT, whole_group=True)
    _assert_stopped_cleanly(repo, graft, tree, seconds, signal.SIGINT)
    assert _state_of(server, graft.flow_run_name()) in {StateType.CRASHED, StateType.CANCELLED}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_to_graft_run_alone_do_the_same(
    repo: Path, server: Server, signum: int
) -> None:
    graft, tree, seconds = _interrupt(repo, server.env, signum, whole_group=False)
    _assert_stopped_cleanly(repo, graft, tree, seconds, signum)
    assert _state_of(server, graft.flow_run_name()) in {StateType.CRASHED, StateType.CANCELLED}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_flow_process_stops_its_stage_too(repo: Path, server: Server, signum: int) -> None:
    graft = GraftRun(repo, server.env, "pretrain", flow_process=True)
    tree = graft.wait_for_stage_command("pretrain")
    graft.process.send_signal(signum)
    seconds = graft.wait(timeout_s=60)
    print(f"{signal.Signals(signum).name}: the flow process exited after {seconds:.1f}s")
    assert seconds < EXIT_WITHIN_S, graft.output
    assert graft.process.returncode == -signum, graft.output  # Prefect re-raises the signal
    assert _running(tree) == []
    assert "pretrain: stopping `dvc repro` and its stage command" in graft.output
    assert not (repo / ".graft" / STAGE_RECORD).exists()
    assert _state_of(server, graft.flow_run_name()) in {StateType.CRASHED, StateType.CANCELLED}


def test_ctrl_c_stops_every_stage_running_side_by_side(repo: Path, server: Server) -> None:
    graft = GraftRun(repo, server.env, "pretrain", "baseline")  # both wait for split only
    graft.wait_for_stage_command("pretrain")
    graft.wait_for_stage_command("baseline")
    poll_until(  # both past their imports (a Ctrl-C then is a traceback, as by hand)
        lambda: graft.output,
        lambda out: "pretrain | pretrain resnet18" in out and "baseline | finetune resnet18" in out,
        "both stages to start training",
        START_WITHIN_S,
        interval_s=0.2,
    )
    tree = graft.tree()
    os.killpg(graft.process.pid, signal.SIGINT)
    seconds = graft.wait(timeout_s=60)
    assert seconds < EXIT_WITHIN_S, graft.output
    assert graft.process.returncode == 128 + signal.SIGINT, graft.output
    assert _running(tree) == []  # both work trees' dvc repro and stage commands
    stopped = "stage baseline, pretrain was stopped with its whole process tree"
    assert f"interrupted by SIGINT: {stopped}" in graft.output
    assert list(repo.glob(f".graft/worktrees/*/.graft/{STAGE_RECORD}")) == []
    assert "Traceback" not in graft.output


def test_a_temporary_server_outlives_ctrl_c_until_the_run_is_reported(
    repo: Path, server: Server
) -> None:
    # No PREFECT_API_URL: graft run starts its own server, on the same PREFECT_HOME (and so
    # the same database) as the module's server, which then reads how the run ended.
    env = {k: v for k, v in server.env.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(server.home)
    graft, tree, seconds = _interrupt(repo, env, signal.SIGINT, whole_group=True)
    assert "starting a temporary Prefect server" in graft.output
    assert any("server start" in " ".join(p.info["cmdline"]) for p in tree)  # it had one
    _assert_stopped_cleanly(repo, graft, tree, seconds, signal.SIGINT)  # ... and it is gone
    assert _state_of(server, graft.flow_run_name()) in {StateType.CRASHED, StateType.CANCELLED}


def test_a_stage_left_running_by_a_killed_run_is_stopped_by_the_next(
    repo: Path, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    graft = GraftRun(repo, server.env, "pretrain")
    tree = graft.wait_for_stage_command("pretrain")
    graft.process.kill()  # SIGKILL: no finally block runs, the stage's session lives on
    graft.wait(timeout_s=10)
    time.sleep(1)
    orphans = [p for p in tree if "dvc" in _cmdline(p) or "tasks.pretrain" in _cmdline(p)]
    assert len(_running(orphans)) == 2, graft.output  # the orphan this test is about
    assert (repo / ".graft" / STAGE_RECORD).exists()

    with caplog.at_level(logging.WARNING, logger="flows.workspace"):
        started = time.monotonic()
        with workspace_lock(repo, wait_s=0):  # what the next run does first
            assert _running(orphans) == []
        seconds = time.monotonic() - started
    print(f"orphaned stage stopped in {seconds:.1f}s")
    (line,) = [r.getMessage() for r in caplog.records if r.name == "flows.workspace"]
    assert re.fullmatch(
        r"pretrain: stopped `dvc repro` \(pid \d+\) and its stage command, .*", line
    )
    assert not (repo / ".graft" / STAGE_RECORD).exists()
    assert not is_up_to_date(repo, "pretrain")  # DVC's lock is free: no LockError


HOLD_DVC_LOCK = """
import sys, time, zc.lockfile
held = zc.lockfile.LockFile(sys.argv[1])  # DVC's own lock, as a running DVC command holds it
print("held", flush=True)
time.sleep(600)
"""


def test_a_dvc_lock_held_by_a_live_process_is_waited_for(repo: Path, server: Server) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_DVC_LOCK, str(repo / ".dvc" / "tmp" / "lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        graft = GraftRun(repo, server.env, "split")
        # The first stage asks DVC first: the scan (then ingest, then split).
        waiting = f"{SCAN_STAGE}: another DVC command (pid {holder.pid}: "
        poll_until(
            lambda: graft.output,
            lambda output: waiting in output or graft.process.poll() is not None,
            "graft run to report DVC's lock",
            START_WITHIN_S,
            describe=lambda output: output,
        )
    finally:
        holder.kill()  # the holder dies: the kernel drops its lock with it
        holder.wait()
    graft.wait(timeout_s=120)
    assert graft.process.returncode == 0, graft.output
    assert waiting in graft.output and "holds the repository lock; waiting to retry" in graft.output
    assert "Traceback" not in graft.output
    # The retry asked DVC again: the scan ran (it always does) and found nothing new.
    assert "ingest: up to date (DVC cache)" in graft.output
    assert "split: up to date (DVC cache)" in graft.output


def test_a_dvc_repro_killed_outright_leaves_nothing_that_blocks_the_next_run(
    repo: Path,
) -> None:
    log = repo / ".graft" / "dvc-repro.log"
    dvc = start_in_own_session(
        dvc_command("repro", "--single-item", "pretrain"), tool_env(), log, cwd=repo
    )
    try:
        poll_until(
            lambda: psutil.Process(dvc.pid).children(recursive=True),
            lambda tree: any("tasks.pretrain" in _cmdline(p) for p in tree),
            "dvc repro to start pretrain's command",
            START_WITHIN_S,
            interval_s=0.2,
        )
    finally:
        os.killpg(dvc.pid, signal.SIGKILL)  # DVC's locks and rwlock entries left as they are
        dvc.wait()
    assert not is_up_to_date(repo, "pretrain")  # DVC's repository lock: free
    # Its rwlock still names the dead dvc as reading split's output; DVC drops a dead pid.
    forced = run(dvc_command("repro", "--single-item", "--force", "split"), repo)
    assert "Running stage 'split'" in forced.stdout


def test_stop_session_kills_what_ignores_the_first_signal(tmp_path: Path) -> None:
    # A leader and its child that both ignore SIGINT: SIGKILL after the grace, for both.
    script = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN);"
        "subprocess.Popen([sys.executable, '-c', 'import signal, time;"
        " signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)']);"
        "print('started', flush=True); time.sleep(600)"
    )
    log = tmp_path / "ignoring.log"
    leader = start_in_own_session([sys.executable, "-c", script], tool_env(), log, cwd=ROOT)
    poll_until(lambda: log.read_text(), lambda text: "started" in text, "the child", 60)
    tree = [psutil.Process(leader.pid), *psutil.Process(leader.pid).children()]
    assert len(tree) == 2
    started = time.monotonic()
    stop_session(leader, wait_s=1, first_signal=signal.SIGINT)
    assert 1 <= time.monotonic() - started < 5
    assert leader.returncode == -signal.SIGKILL
    time.sleep(0.2)  # the child's new parent reaps it
    assert _running(tree) == []


# Each handler runs at the next bytecode after os.kill: inside __del__, where exceptions drop.
SIGNALLED_IN_FINALIZERS = """
import os, signal, time
from prefect.exceptions import TerminationSignal
from graft.cli.main import STOP_SIGNALS, Interrupted, _stop_signal, raise_on_signals

class SignalledWhileCollected:
    def __init__(self, signum):
        self.signum = signum
    def __del__(self):
        os.kill(os.getpid(), self.signum)

raise_on_signals(STOP_SIGNALS, Interrupted, once=True, signal_of=_stop_signal, quiet=True)
previous = signal.getsignal(signal.SIGTERM)
def as_prefect_does(signum, frame):  # during a flow run, Prefect's handler has SIGTERM
    raise TerminationSignal(signal=signum)
signal.signal(signal.SIGTERM, as_prefect_does)
try:
    SignalledWhileCollected(signal.SIGTERM)
    time.sleep(20)
except TerminationSignal:
    print("terminated")
signal.signal(signal.SIGTERM, previous)
try:
    SignalledWhileCollected(signal.SIGHUP)
    time.sleep(20)
except Interrupted as stop:
    print("interrupted", stop.signum)
    os.kill(os.getpid(), signal.SIGINT)  # a second stop signal: ignored, the clean-up goes on
    time.sleep(0.2)
    print("cleaned up")
"""


def test_stop_signals_dropped_in_finalizers_are_delivered_again_quietly() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SIGNALLED_IN_FINALIZERS],
        cwd=ROOT,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=30,  # without redelivery each sleeps 20 s
    )
    assert result.returncode == 0, result.stderr
    expected = ["terminated", f"interrupted {int(signal.SIGHUP)}", "cleaned up"]
    assert result.stdout.splitlines() == expected
    assert result.stderr == ""  # no "Exception ignored ... Traceback" for what was redelivered
