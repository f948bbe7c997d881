"""Every stage survives being killed outright, at random moments, as `dvc repro` runs it.

One tiny real git + DVC project is run twice. Once uninterrupted, in a pristine copy: its
dvc.lock's output hashes are the reference, and each stage's time sets the window its kills
are drawn from. Then, stage by stage in pipeline order, `dvc repro --single-item --force
<stage>` is started in a session of its own and SIGKILLed with everything it started (DVC, the
stage, its children) after a seeded random delay, or, a training stage's last time, right
after it saved an epoch's resume state. Each stage is then run to completion. A crash must
cost only time: the same outputs bit for bit, DVC satisfied, nothing left behind
(temporaries, locks, processes), and a training stage picking up from its last saved epoch.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml
from helpers import (
    SCAN_STAGE,
    copy_demo_subset,
    make_dvc_project,
    pipeline_is_current,
    run,
    tool_env,
)

from flows.dvc_files import keep_whole_copy, repair_dvc_files
from graft.processes import dvc_command, start_in_own_session

pytestmark = pytest.mark.slow

# The scan is killed too: its window (DVC's start-up, then the scan's second or so) can land
# while it runs, and it writes both its output and ingest's stat cache, which it reads through.
STAGES = [
    SCAN_STAGE, "ingest", "split", "pretrain", "finetune", "baseline", "evaluate", "figures",
    "register",
]  # fmt: skip
TRAINING = {"pretrain", "finetune", "baseline"}
KILLS = 2  # per stage; a training stage's last lands right after an epoch's state is saved
SEED = 1729  # the delays drawn; where a kill lands also depends on how fast the machine is
RESUMED = "resuming after epoch"
TEMPORARY_MARKS = (".tmp-", ".old-")  # graft.atomic's temporaries and retired folders
STAGE_TIMEOUT_S = 300  # a run to completion; far above the seconds one takes


@dataclass
class Attempt:
    """One run of a stage that was to be killed, and what became of it."""

    stage: str
    when: str  # "at 1.23s" or "after an epoch's state (1.23s)"
    outcome: str  # killed | finished (before the kill) | failed (exited non-zero on its own)
    log: str
    dvc_damage: str = ""  # what the kill left broken in DVC's own files (graft repaired it)


@dataclass
class Record:
    """What the fault injection did to the project and what the runs to completion said."""

    attempts: list[Attempt] = field(default_factory=list)
    completions: dict[str, str] = field(default_factory=dict)  # stage -> its output
    failed_completions: list[str] = field(default_factory=list)
    killed_groups: list[int] = field(default_factory=list)

    @property
    def injected(self) -> int:
        return sum(a.outcome == "killed" for a in self.attempts)

    @property
    def survived(self) -> int:
        """Kills after which the stage's next run, killed later or run to the end, did not
        fail, and its run to completion succeeded."""
        count = 0
        for stage in STAGES:
            runs = [a for a in self.attempts if a.stage == stage]
            for index, attempt in enumerate(runs):
                if attempt.outcome != "killed":
                    continue
                following = runs[index + 1 :]
                if (not following or not following[0].outcome.startswith("failed")) and (
                    stage not in self.failed_completions
                ):
                    count += 1
        return count

    def summary(self) -> str:
        lines = [f"{self.survived}/{self.injected} kills survived"]
        lines += [
            f"  {a.stage}: {a.when} -> {a.outcome}"
            + (f"; DVC left {a.dvc_damage}, repaired" if a.dvc_damage else "")
            for a in self.attempts
        ]
        lines += [f"  {stage}: run to completion failed" for stage in self.failed_completions]
        return "\n".join(lines)


def lock_outputs(project: Path) -> dict[str, str]:
    """``{output path: md5}`` of every stage's ``outs`` in the project's dvc.lock."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {
        out["path"]: out["md5"]
        for stage in lock["stages"].values()
        for out in stage.get("outs", [])
    }


def complete(project: Path, stage: str) -> subprocess.CompletedProcess[str]:
    """`dvc repro --single-item <stage>` run to its end; stdout and stderr together.

    Without DVC's run-cache, which would restore a killed run's outputs from a forced run that
    finished instead of running the stage from what the kills left. (Where dvc.lock still
    records that run, DVC checks the outputs out of its cache all the same, as for a user.)
    """
    return subprocess.run(
        dvc_command("repro", "--single-item", "--no-run-cache", stage),
        cwd=project,
        env=tool_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=STAGE_TIMEOUT_S,
    )


def fresh_epoch_state(resume: Path, since: float) -> bool:
    """Whether a training stage saved an epoch's state under ``resume`` after ``since``
    (seconds since the epoch): each save is a new file, renamed into place."""
    try:
        return any(
            not path.name.startswith(".") and path.stat().st_mtime > since
            for path in resume.rglob("*")
            if path.is_file()
        )
    except FileNotFoundError:  # the stage finished and removed its state while we looked
        return False


def kill_at_random(
    project: Path, stage: str, window_s: float, rng: random.Random, record: Record, epoch: bool
) -> str:
    """Start the stage, SIGKILL its whole session after a delay drawn from its uninterrupted
    time ``window_s`` (with ``epoch``: as soon as it has saved an epoch's resume state),
    record it and return its outcome."""
    log = project.parent / f"{project.name}-{stage}-{len(record.attempts)}.log"
    keep_whole_copy(project)  # as graft's flow does before each `dvc repro`
    started_wall = time.time()
    started = time.monotonic()
    # Forced: a run that finished before its kill must not leave the next one nothing to do.
    process = start_in_own_session(
        dvc_command("repro", "--single-item", "--force", stage), tool_env(), log, project
    )
    delay = rng.uniform(0.0, 0.9 * window_s)  # 0.9: the same stage is seldom as slow twice
    resume = project / ".graft" / "resume" / stage
    when, outcome = f"{'after an epoch' if epoch else f'at {delay:.2f}s'}, too late", ""
    while process.poll() is None:
        elapsed = time.monotonic() - started
        if epoch and fresh_epoch_state(resume, started_wall):
            when, outcome = f"after an epoch's state ({elapsed:.2f}s)", "killed"
        elif not epoch and elapsed >= delay:
            when, outcome = f"at {elapsed:.2f}s", "killed"
        elif elapsed > STAGE_TIMEOUT_S:
            when, outcome = f"at {elapsed:.2f}s", "failed (stuck)"
        if outcome:
            os.killpg(process.pid, signal.SIGKILL)  # the session: DVC, the stage, its children
            record.killed_groups.append(process.pid)
            break
        time.sleep(0.02)
    process.wait()
    if not outcome:
        outcome = "finished" if process.returncode == 0 else "failed"
    # What the next graft run does when it takes the workspace (flows/dvc_files.py): a DVC
    # killed while rewriting dvc.lock or its rwlock in place leaves them cut short.
    damage = "; ".join(repair_dvc_files(project)) if outcome == "killed" else ""
    attempt = Attempt(stage, when, outcome, log.read_text(errors="replace"), damage)
    record.attempts.append(attempt)
    left = f"; DVC left {damage}" if damage else ""
    print(f"{stage}: kill {when} -> {outcome}{left}", flush=True)
    return outcome


@pytest.fixture(scope="module")
def projects(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two identical fresh projects (pristine, faulty), with kills landing mid-training:
    six pretrain epochs, three per finetune phase, no early stop, 16 px images."""
    base = tmp_path_factory.mktemp("faults")
    sources = copy_demo_subset(base / "sources", per_class=12)
    pristine = make_dvc_project(base / "pristine", sources)
    params = yaml.safe_load((pristine / "params.yaml").read_text())
    assert params["common"]["image_size"] == 16
    params["pretrain"].update(epochs=6, patience=6)
    params["finetune"]["head"]["epochs"] = 3
    params["finetune"]["unfreeze"]["epochs"] = 3
    params["finetune"]["patience"] = 6
    (pristine / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-q", "-am", "long enough to be killed mid-training"], pristine)
    # A copy, not a reset: DVC's run-cache would restore every output without running.
    faulty = base / "faulty"
    shutil.copytree(pristine, faulty, symlinks=True)
    return pristine, faulty


@pytest.fixture(scope="module")
def reference(projects: tuple[Path, Path]) -> tuple[dict[str, str], dict[str, float]]:
    """The uninterrupted `dvc repro`: ``({output: md5}, {stage: seconds})``, a stage's seconds
    counted as a single-item run's would be: DVC's start-up, then from DVC announcing the
    stage to its announcing the next (or exiting)."""
    pristine, _ = projects
    started = time.monotonic()
    process = subprocess.Popen(
        dvc_command("repro"),
        cwd=pristine,
        env={**tool_env(), "PYTHONUNBUFFERED": "1"},  # each line as it is written
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    output, announced = [], {}
    for line in process.stdout:
        output.append(line)
        if found := re.search(r"Running stage '([\w-]+)'", line):
            announced[found.group(1)] = time.monotonic()
    ended = time.monotonic()
    assert process.wait() == 0 and list(announced) == STAGES, "".join(output)
    startup = announced[STAGES[0]] - started
    bounds = [*announced.values(), ended]
    seconds = {stage: startup + bounds[i + 1] - bounds[i] for i, stage in enumerate(STAGES)}
    print("uninterrupted: " + ", ".join(f"{s} {t:.1f}s" for s, t in seconds.items()))
    return lock_outputs(pristine), seconds


@pytest.fixture(scope="module")
def record(
    projects: tuple[Path, Path], reference: tuple[dict[str, str], dict[str, float]]
) -> Record:
    """Kill every stage of the faulty project several times, then run it to completion."""
    _, faulty = projects
    _, seconds = reference
    rng = random.Random(SEED)
    record = Record()
    for stage in STAGES:
        landed = 0
        for _ in range(KILLS + 1):  # one spare, for a run faster than the reference's
            epoch = stage in TRAINING and landed == KILLS - 1
            outcome = kill_at_random(faulty, stage, seconds[stage], rng, record, epoch)
            landed += outcome == "killed"
            if landed == KILLS or outcome.startswith("failed"):
                break
        result = complete(faulty, stage)
        record.completions[stage] = result.stdout
        if result.returncode != 0 or "Traceback" in result.stdout:
            record.failed_completions.append(stage)
            print(f"{stage}: run to completion failed:\n{result.stdout}")
        else:
            print(f"{stage}: ran to completion{' (resumed)' if RESUMED in result.stdout else ''}")
    print(record.summary())
    return record


def test_every_injected_kill_is_survived(record: Record) -> None:
    failed = [a for a in record.attempts if a.outcome.startswith("failed")]
    assert not failed, "\n\n".join(f"{a.stage} {a.when}:\n{a.log}" for a in failed)
    assert not record.failed_completions, record.summary()
    assert record.injected >= len(STAGES), record.summary()  # most kills land in the window
    # (DVC's own locks clear themselves: the repo lock is an OS lock the kernel releases with
    # its holder, and DVC drops a dead pid's entries from .dvc/tmp/rwlock. Its files do not:
    # graft repairs them, and such a kill counts as survived only when that repair worked.)
    assert record.survived == record.injected, record.summary()


def test_outputs_equal_the_uninterrupted_runs_bit_for_bit(
    projects: tuple[Path, Path], reference: tuple[dict[str, str], dict[str, float]], record: Record
) -> None:
    _, faulty = projects
    expected, _ = reference
    assert lock_outputs(faulty) == expected, record.summary()
    assert pipeline_is_current(faulty), record.summary()


def test_nothing_is_left_behind(projects: tuple[Path, Path], record: Record) -> None:
    _, faulty = projects
    leftovers = [
        str(path.relative_to(faulty))
        for path in faulty.rglob("*")
        if path.relative_to(faulty).parts[0] not in (".git", ".dvc")
        and any(mark in path.name for mark in TEMPORARY_MARKS)
    ]
    assert not leftovers, leftovers
    # A stage that ran to the end deletes its resume state. (DVC may not run it: when its
    # dvc.lock entry still matches, from a run that finished before a forced one was killed,
    # DVC checks the outputs out of its cache, and the state waits for the next real run.)
    ran = [stage for stage, out in record.completions.items() if f"Running stage '{stage}'" in out]
    kept = [p for stage in ran for p in (faulty / ".graft/resume" / stage).rglob("*")]
    assert not kept, f"resume state outlived its stage: {kept}"

    def ours(process: psutil.Process) -> bool:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return False  # dead; only waits for a parent to read its exit status
            if os.getpgid(process.pid) in record.killed_groups:
                return True  # started by a killed run, escaped the kill
            command = " ".join(process.cmdline())
            return str(faulty) in command or (
                "tasks." in command and Path(process.cwd()).is_relative_to(faulty)
            )
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            return False

    # (By working folder too: other test runs on this machine run `python -m tasks.*` as well.)
    survivors = [p.info for p in psutil.process_iter(["pid", "cmdline"]) if ours(p)]
    assert not survivors, survivors

    # DVC drops a dead process's entries from its rwlock only when they are in the way, so
    # killed runs' read locks may stay listed (harmless); no other run's may.
    rwlock = json.loads((faulty / ".dvc" / "tmp" / "rwlock").read_text())
    holders = {info["pid"] for infos in rwlock.get("read", {}).values() for info in infos}
    holders |= {info["pid"] for info in rwlock.get("write", {}).values()}
    print(f"DVC's rwlock still lists {len(holders)} of the killed runs")
    assert holders <= set(record.killed_groups), (holders, record.killed_groups)


def test_a_training_stage_resumes_after_a_real_crash(record: Record) -> None:
    resumed = [stage for stage in TRAINING if RESUMED in record.completions.get(stage, "")]
    assert resumed, record.summary()
