"""What running the pipeline as a Prefect flow costs over `dvc repro`, on the built-in demo.

One run, against a real local Prefect server (`prefect server start` on 127.0.0.1 with a
temporary PREFECT_HOME, as a deployment would use):

- full: a cold `dvc repro` in one fresh copy of the project against a cold flow run in another
  copy (each with its own empty DVC cache and ingest cache), so both do all the work;
- cached: a no-op `dvc repro` against a flow run in which DVC reports every stage up to date.

Prints a table, then as its last line one JSON object: cached_flow_s, noop_repro_s,
full_flow_s, full_repro_s, full_overhead (full_flow_s / full_repro_s).

    python benchmarks/flow.py            # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # flows/ lives in the project, not in the installed library

from flows.local_server import local_prefect_server  # noqa: E402
from graft.processes import env_with_this_python  # noqa: E402


def project_copy(destination: Path) -> Path:
    """The project's tracked files (demo images included) as a new git repo, nothing computed."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if name == "dvc.lock" or not source.is_file():
            continue  # without a lock every stage is stale: a cold run
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    env = env_with_this_python()
    for role in ("AUTHOR", "COMMITTER"):
        env |= {f"GIT_{role}_NAME": "bench", f"GIT_{role}_EMAIL": "bench@graft.invalid"}
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "x"]):
        subprocess.run(command, cwd=destination, env=env, check=True)
    return destination


def timed_repro(repo: Path) -> float:
    started = time.perf_counter()
    env = env_with_this_python()
    subprocess.run(["dvc", "repro"], cwd=repo, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def timed_flow(repo: Path) -> tuple[float, list[str]]:
    from flows.pipeline import pipeline  # after PREFECT_API_URL is set

    started = time.perf_counter()
    results = pipeline(root=str(repo))
    assert isinstance(results, list)  # a run started by hand is never skipped
    return time.perf_counter() - started, [r.stage for r in results if r.ran]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    arguments = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="graft-flow-bench-"))
    try:
        home = work / "prefect-home"
        home.mkdir()
        with local_prefect_server(home) as (url, _):
            os.environ["PREFECT_API_URL"] = url
            os.environ["PREFECT_HOME"] = str(home)
            by_hand, by_flow = project_copy(work / "by-hand"), project_copy(work / "by-flow")
            full_repro = timed_repro(by_hand)
            full_flow, ran = timed_flow(by_flow)
            noop_repro = timed_repro(by_hand)
            cached_flow, ran_cached = timed_flow(by_flow)
            from prefect.logging.handlers import APILogHandler

            APILogHandler().flush()  # send the last log lines while the server is still up
        if ran_cached:
            raise SystemExit(f"the cached flow run ran stages: {ran_cached}")
    finally:
        if not arguments.keep:
            shutil.rmtree(work, ignore_errors=True)
    figures = {
        "cached_flow_s": round(cached_flow, 2),
        "noop_repro_s": round(noop_repro, 2),
        "full_flow_s": round(full_flow, 1),
        "full_repro_s": round(full_repro, 1),
        "full_overhead": round(full_flow / full_repro, 3),
    }
    print(f"{'':28}{'dvc repro':>12}{'flow run':>12}")
    print(f"{'full (cold caches)':28}{full_repro:>11.1f}s{full_flow:>11.1f}s")
    print(f"{'cached (nothing to do)':28}{noop_repro:>11.2f}s{cached_flow:>11.2f}s")
    print(f"stages the full flow run ran: {', '.join(ran)}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
