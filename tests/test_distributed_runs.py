"""Data-parallel training stages, run for real: `dvc repro` with two gloo processes on this
CPU (torchrun's engine), a second identical run, a killed run that resumes, a rank that
crashes, two "nodes" on 127.0.0.1, a rendezvous that never completes."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import yaml
from helpers import (
    copy_demo_subset,
    free_port,
    make_dvc_project,
    pipeline_is_current,
    poll_until,
    tool_env,
)
from helpers import run as run_command
from torch import nn

from graft.training.checkpoints import load_checkpoint, model_from_checkpoint

pytestmark = pytest.mark.slow
STAGE = [sys.executable, "-m", "tasks.pretrain"]
CHECKPOINT = Path("models/pretrained.pt")
OUTPUTS = (CHECKPOINT, Path("reports/pretrain/metrics.json"), Path("reports/pretrain/history.csv"))


@dataclass(frozen=True)
class Project:
    repo: Path
    log: str  # what `dvc repro` printed
    outputs: dict[Path, bytes]  # pretrain's outputs after it


def set_params(repo: Path, **sections: dict[str, Any]) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def two_processes(nproc: int = 2, nnodes: int = 1, **meeting: Any) -> dict[str, Any]:
    return {
        "common": {"distributed": {"nproc_per_node": nproc, "nnodes": nnodes}},
        "run": {"distributed": {"master_port": free_port(), "rendezvous_timeout_s": 60,
                                "collective_timeout_s": 60, **meeting}},
    }  # fmt: skip


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    """A DVC project whose training stages run as two processes, after a real `dvc repro`."""
    home = tmp_path_factory.mktemp("distributed")
    repo = make_dvc_project(home / "repo", copy_demo_subset(home / "sources", per_class=12))
    set_params(repo, pretrain={"epochs": 4}, **two_processes())
    run_command(["git", "commit", "-qam", "two processes"], repo)
    log = run_command(["dvc", "repro"], repo)
    return Project(repo, log.stdout + log.stderr, {p: (repo / p).read_bytes() for p in OUTPUTS})


def copy_of(project: Project, folder: Path) -> Path:
    shutil.copytree(project.repo, folder, symlinks=True)
    return folder


def start(
    repo: Path, log: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [*STAGE, *args], cwd=repo, env={**tool_env(), **(env or {})}, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


@pytest.fixture
def stages() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Stage processes a test starts; whatever of their sessions is left is killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def ranks_of(process: subprocess.Popen[bytes]) -> dict[int, psutil.Process]:
    """The running ranks a stage process started, by global rank."""
    found = {}
    for child in psutil.Process(process.pid).children(recursive=True):
        try:
            found[int(child.environ()["RANK"])] = child
        except (psutil.Error, KeyError):
            continue
    return found


def resume_state(repo: Path) -> list[Path]:
    return sorted((repo / ".graft" / "resume" / "pretrain").glob("*/pretrain.pt"))


def test_dvc_repro_trains_with_two_processes_and_rank_0_writes(project: Project) -> None:
    assert "pretrain: node 0 of 1 starting 2 processes (world size 2)" in project.log
    assert "finetune: node 0 of 1 starting 2 processes" in project.log
    assert "baseline: node 0 of 1 starting 2 processes" in project.log
    assert project.log.count("pretrain epoch 1:") == 1  # rank 0 alone logs
    for checkpoint in ("models/pretrained.pt", "models/finetuned.pt", "models/baseline.pt"):
        _, meta = load_checkpoint(project.repo / checkpoint)
        assert meta.extra["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert pipeline_is_current(project.repo)
    assert not resume_state(project.repo)


def test_a_second_run_gives_the_same_bits(project: Project) -> None:
    run_command(STAGE, project.repo)
    for path, content in project.outputs.items():
        assert (project.repo / path).read_bytes() == content, path
    assert pipeline_is_current(project.repo)


def test_a_stopped_run_resumes_to_the_uninterrupted_weights(
    project: Project, tmp_path: Path, stages: list[subprocess.Popen[bytes]]
) -> None:
    repo = copy_of(project, tmp_path / "repo")
    (repo / CHECKPOINT).unlink()
    stage = start(repo, tmp_path / "stopped.log")
    stages.append(stage)
    poll_until(lambda: resume_state(repo), bool, "the first epoch's state", 120, 0.02)
    ranks = list(ranks_of(stage).values())
    stage.send_signal(signal.SIGTERM)  # as Ctrl-C or graft run's timeout stops a stage
    assert stage.wait(60) == 128 + signal.SIGTERM
    _, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive, "ranks outlived their stage"
    assert not (repo / CHECKPOINT).exists()  # nothing half-written
    resumed = run_command(STAGE, repo)
    assert "pretrain: resuming after epoch" in resumed.stderr
    assert (repo / CHECKPOINT).read_bytes() == project.outputs[CHECKPOINT]
    assert not resume_state(repo)


def test_a_crashed_rank_fails_the_stage_naming_it(
    project: Project, tmp_path: Path, stages: list[subprocess.Popen[bytes]]
) -> None:
    repo = copy_of(project, tmp_path / "repo")
    (repo / CHECKPOINT).unlink()
    log = tmp_path / "crash.log"
    stage = start(repo, log)
    stages.append(stage)
    poll_until(lambda: resume_state(repo), bool, "the first epoch's state", 120, 0.02)
    ranks = ranks_of(stage)
    ranks[1].kill()
    started = time.monotonic()
    assert stage.wait(60) == 1
    assert time.monotonic() - started < 30  # torchrun stops the other rank at once
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith("error: pretrain failed on rank 1 of 2"), last
    assert "SIGKILL" in last
    _, alive = psutil.wait_procs(list(ranks.values()), timeout=30)
    assert not alive
    assert not (repo / CHECKPOINT).exists()


def test_a_stuck_rank_fails_the_stage_after_the_collective_timeout(
    project: Project, tmp_path: Path, stages: list[subprocess.Popen[bytes]]
) -> None:
    repo = copy_of(project, tmp_path / "repo")
    set_params(repo, **two_processes(collective_timeout_s=3))
    log = tmp_path / "stuck.log"
    stage = start(repo, log)
    stages.append(stage)
    poll_until(lambda: resume_state(repo), bool, "the first epoch's state", 120, 0.02)
    ranks = ranks_of(stage)
    ranks[1].suspend()  # SIGSTOP: alive, in the middle of a step, never answering
    started = time.monotonic()
    assert stage.wait(60) == 1
    assert time.monotonic() - started < 40  # 3 s waiting, then 10 s for the stuck one to go
    stage_error = log.read_text()[log.read_text().rindex("error: pretrain failed on rank") :]
    assert stage_error.startswith("error: pretrain failed on rank 0 of 2"), stage_error
    assert "run.distributed.collective_timeout_s = 3" in stage_error
    _, alive = psutil.wait_procs(list(ranks.values()), timeout=30)
    assert not alive


def test_two_nodes_on_loopback_train_as_one_node_of_two_processes(
    project: Project, tmp_path: Path, stages: list[subprocess.Popen[bytes]]
) -> None:
    # Each "machine" has its own clone with the stage's inputs; they meet on 127.0.0.1.
    nodes = [copy_of(project, tmp_path / f"node{rank}") for rank in (0, 1)]
    settings = two_processes(nproc=1, nnodes=2)
    for node in nodes:
        set_params(node, **settings)
        (node / CHECKPOINT).unlink()
    # One thread per process, as graft gives each of two processes on this 2-core machine:
    # the bits depend on the world size and on the threads each process sums with.
    threads = {"OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // 2))}
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    second = start(nodes[1], logs[1], "--node-rank", "1", env=threads)
    first = start(nodes[0], logs[0], env=threads)
    stages.extend((second, first))
    assert first.wait(120) == 0, logs[0].read_text()
    assert second.wait(120) == 0, logs[1].read_text()
    assert "node 0 of 2 starting 1 processes (world size 2)" in logs[0].read_text()
    assert not (nodes[1] / CHECKPOINT).exists()  # rank 0, on node 0, writes
    # The same world size and threads compute the same sums: the one-machine run's bits.
    assert (nodes[0] / CHECKPOINT).read_bytes() == project.outputs[CHECKPOINT]


def test_a_rendezvous_that_never_completes_fails_naming_the_setting(
    project: Project, tmp_path: Path
) -> None:
    repo = copy_of(project, tmp_path / "repo")
    set_params(repo, **two_processes(nproc=1, nnodes=2, rendezvous_timeout_s=3))
    (repo / CHECKPOINT).unlink()
    started = time.monotonic()
    failed = run_command(STAGE, repo, check=False)  # node 1 never comes
    assert failed.returncode == 1
    assert time.monotonic() - started < 60
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: pretrain: the 2 nodes did not start together"), last
    assert "run.distributed.rendezvous_timeout_s = 3" in last
    assert not (repo / CHECKPOINT).exists()


def test_bad_settings_fail_before_any_rank_starts_or_on_every_rank(
    project: Project, tmp_path: Path
) -> None:
    repo = copy_of(project, tmp_path / "repo")
    cores = len(os.sched_getaffinity(0))
    set_params(repo, common={"distributed": {"nproc_per_node": cores + 1}}, pretrain={"arch": "x"})
    refused = run_command(STAGE, repo, check=False)
    assert refused.returncode == 1
    assert "common.distributed.nproc_per_node" in refused.stderr
    assert "pretrain.arch" in refused.stderr
    assert "starting" not in refused.stderr  # no process was started
    # Input the ranks find bad: each fails with its message, the stage names a rank.
    set_params(repo, common={"distributed": {"nproc_per_node": 2}}, pretrain={"arch": "resnet18"})
    (repo / "data" / "splits.csv").write_text("role,label\n")
    failed = run_command(STAGE, repo, check=False)
    assert failed.returncode == 1
    # The stage's error (the last; its message may take several lines) names rank and file.
    stage_error = failed.stderr[failed.stderr.rindex("error: pretrain failed on rank") :]
    assert re.match(r"error: pretrain failed on rank [01] of 2 \(exit code 1\): ", stage_error)
    assert "data/splits.csv" in stage_error


def test_vgg_folding_trains_data_parallel_into_a_torchvision_checkpoint(
    project: Project, tmp_path: Path
) -> None:
    # VGG below 224 px trains with its classifier's input folded (graft/training/folding.py);
    # the ranks train the folded network and rank 0 writes the unfolded weights.
    repo = copy_of(project, tmp_path / "repo")
    set_params(
        repo, common={"image_size": 32}, pretrain={"arch": "vgg11", "epochs": 1, "lr": 0.0003}
    )
    run_command(STAGE, repo)
    model, meta = model_from_checkpoint(repo / CHECKPOINT)
    assert meta.arch == "vgg11" and meta.extra["distributed"]["world_size"] == 2
    first = model.get_submodule("classifier.0")
    assert isinstance(first, nn.Linear) and first.in_features == 512 * 7 * 7


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_train_with_nccl_and_sync_batchnorm(project: Project, tmp_path: Path) -> None:
    repo = copy_of(project, tmp_path / "repo")
    processes = two_processes()
    processes["common"]["distributed"]["sync_batchnorm"] = True
    set_params(repo, common={"device": "cuda", **processes["common"]}, run=processes["run"])
    run_command(STAGE, repo)
    _, meta = load_checkpoint(repo / CHECKPOINT)
    assert meta.extra["distributed"] == {"world_size": 2, "backend": "nccl"}
