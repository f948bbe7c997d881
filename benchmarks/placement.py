"""Stages side by side and stages placed on another work pool, on the built-in demo.

Against a real local Prefect server and a real SeaweedFS S3 server, both on 127.0.0.1, three
cold flow runs of the whole demo pipeline, each in a fresh copy of the project:

- serial: ``run.max_parallel: 1`` (the default), every stage in the workspace, one by one;
- parallel: ``run.max_parallel: 2``, ``pretrain`` and ``baseline`` side by side in work trees;
- placed: ``pretrain`` placed on a second process work pool, "gpu", whose worker (`graft
  worker gpu`) runs in a clone of its own; data handed over through the S3 DVC remote.

For the placed stage: its run time on the worker (stage_run_s, the `dvc repro` there) and
the hand-over (handoff_overhead_s): the orchestrator's push of the deps and dispatch, the
worker's pull and push, and the orchestrator's take-over (`dvc repro --pull`); the wait for
the worker to pick the run up (its polling interval) is reported apart, as pickup_s.

Prints a table, then as its last line one JSON object: serial_s, parallel_s,
parallel_speedup, stage_run_s, handoff_overhead_s, handoff_fraction, pickup_s.

    python benchmarks/placement.py       # about 10 minutes on 2 cores
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # flows/ lives in the project, not in the installed library
sys.path.insert(0, str(ROOT / "tests"))  # the SeaweedFS helper the tests use
sys.path.insert(0, str(ROOT / "benchmarks"))

from flow import project_copy  # noqa: E402
from object_store import seaweedfs  # noqa: E402

from flows.local_server import local_prefect_server  # noqa: E402
from graft.processes import env_with_this_python, start_in_own_session, stop_session  # noqa: E402

POOL = "gpu"
HANDOVER = re.compile(r"pushed deps and dispatched in ([\d.]+)s, took over in ([\d.]+)s")


def set_run(repo: Path, **settings: Any) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["run"].update(settings)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(repo, "commit", "-qam", f"run settings {settings}")


def git(repo: Path, *args: str) -> None:
    env = env_with_this_python()
    for role in ("AUTHOR", "COMMITTER"):
        env |= {f"GIT_{role}_NAME": "bench", f"GIT_{role}_EMAIL": "bench@graft.invalid"}
    subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)


def timed_flow(repo: Path) -> tuple[float, Any]:
    from flows.pipeline import pipeline

    started = time.perf_counter()
    state = pipeline(root=str(repo), return_state=True)
    seconds = time.perf_counter() - started
    assert state.is_completed(), state
    return seconds, state


def placed_figures(url: str, state: Any, clone: Path) -> dict[str, float]:
    """The placed pretrain's figures, from its run's artifact (published in the worker's
    ``clone``) and the orchestrator's log."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        LogFilter,
        LogFilterFlowRunId,
    )

    from flows.artifacts import artifact_key

    with SyncPrefectClient(url) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[artifact_key(clone, "placed-pretrain")])
            )
        )
        data: Any = artifact.data
        record = (json.loads(data) if isinstance(data, str) else data)[0]
        flow_run_id = state.state_details.flow_run_id
        logs: list[str] = []
        while True:
            page = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                limit=200,
                offset=len(logs),
            )
            logs += [log.message for log in page]
            if len(page) < 200:
                break
        (task,) = [r for r in state.result() if r.stage == "pretrain"]
    found = [m for m in map(HANDOVER.search, logs) if m]
    assert found, "no hand-over line in the orchestrator's log"
    dispatch_s, take_over_s = float(found[0].group(1)), float(found[0].group(2))
    worker_total = (
        datetime.fromisoformat(record["ended"]) - datetime.fromisoformat(record["started"])
    ).total_seconds()
    handoff = dispatch_s + record["pull_s"] + record["push_s"] + take_over_s
    pickup = max(task.seconds - dispatch_s - take_over_s - worker_total, 0.0)
    return {
        "stage_run_s": record["run_s"],
        "handoff_overhead_s": handoff,
        "dispatch_s": dispatch_s,
        "pull_s": record["pull_s"],
        "push_s": record["push_s"],
        "take_over_s": take_over_s,
        "pickup_s": pickup,
        "placed_task_s": task.seconds,
    }


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="graft-placement-") as scratch:
        base = Path(scratch)
        home = base / "prefect-home"
        home.mkdir()
        env = env_with_this_python() | {"PREFECT_WORKER_QUERY_SECONDS": "2"}
        with seaweedfs(base / "seaweedfs") as store, local_prefect_server(home, env) as (url, _):
            os.environ["PREFECT_API_URL"] = url
            serial_repo = project_copy(base / "serial")
            set_run(serial_repo, max_parallel=1)
            serial_s, _ = timed_flow(serial_repo)
            print(f"serial    {serial_s:7.1f} s", flush=True)

            parallel_repo = project_copy(base / "parallel")
            set_run(parallel_repo, max_parallel=2)
            parallel_s, _ = timed_flow(parallel_repo)
            print(f"parallel  {parallel_s:7.1f} s", flush=True)

            placed_repo = project_copy(base / "placed")
            store.add_dvc_remote(placed_repo, prefix="dvc")
            git(placed_repo, "add", "-A")
            git(placed_repo, "commit", "-qm", "remote")
            set_run(placed_repo, placement={"pretrain": POOL})
            clone = base / "gpu-clone"
            git(base, "clone", "-q", str(placed_repo), str(clone))
            store.add_credentials(clone)
            worker_env = env | {"PREFECT_API_URL": url}
            worker = start_in_own_session(
                ["graft", "worker", POOL, "--root", str(clone)], worker_env,
                base / "worker.log", base,
            )  # fmt: skip
            try:
                time.sleep(15)  # the worker creates its pool and reports online
                placed_s, state = timed_flow(placed_repo)
                figures = placed_figures(url, state, clone)
            finally:
                stop_session(worker)
            print(f"placed    {placed_s:7.1f} s (pretrain on pool {POOL})", flush=True)
    print()
    print("| figure | value |")
    print("|---|---|")
    rows = {"serial_s": serial_s, "parallel_s": parallel_s, "placed_s": placed_s, **figures}
    for name, value in rows.items():
        print(f"| {name} | {value:.2f} |")
    summary = {
        "serial_s": round(serial_s, 1),
        "parallel_s": round(parallel_s, 1),
        "parallel_speedup": round(serial_s / parallel_s, 3),
        "stage_run_s": round(figures["stage_run_s"], 2),
        "handoff_overhead_s": round(figures["handoff_overhead_s"], 2),
        "handoff_fraction": round(figures["handoff_overhead_s"] / figures["stage_run_s"], 3),
        "pickup_s": round(figures["pickup_s"], 2),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
