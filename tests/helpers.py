"""Shared test helpers: tiny params, small real image folders, a real git + DVC project copy."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from graft.processes import env_with_this_python

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"


def tool_env() -> dict[str, str]:
    """Environment for subprocesses: our bin dir first, so `python` and `dvc` are ours."""
    env = env_with_this_python()
    env["DVC_NO_ANALYTICS"] = "1"
    env.setdefault("GIT_AUTHOR_NAME", "graft tests")
    env.setdefault("GIT_AUTHOR_EMAIL", "tests@graft.invalid")
    env.setdefault("GIT_COMMITTER_NAME", "graft tests")
    env.setdefault("GIT_COMMITTER_EMAIL", "tests@graft.invalid")
    return env


def run(command: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=cwd, env=tool_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


# The stage dvc.yaml marks ``always_changed`` (it fingerprints the source folders): `dvc repro`
# runs it every time, and `dvc status` always lists it, with exactly this, when all is current.
SCAN_STAGE = "scan"
SCAN_ALWAYS_CHANGED = {SCAN_STAGE: ["always changed"]}


def pipeline_is_current(repo: Path) -> bool:
    """Whether `dvc status` finds the whole pipeline of ``repo`` up to date: its only entry is
    the scan stage's "always changed", which DVC reports however current everything is.

    Prints what `dvc status` reported when it is not, for pytest to show with the failure."""
    reported = run(["dvc", "status", "--json"], repo).stdout
    status = json.loads(reported or "{}")
    if status == SCAN_ALWAYS_CHANGED:
        return True
    print(f"dvc status in {repo} (current would be only {SCAN_ALWAYS_CHANGED}):\n{reported}")
    return False


def copy_demo_subset(destination: Path, per_class: int, broken: bool = True) -> Path:
    """The first ``per_class`` demo images of every class (plus the broken files) for both roles."""
    for role_dir in sorted(DEMO.iterdir()):
        for class_dir in sorted(role_dir.iterdir()):
            target = destination / role_dir.name / class_dir.name
            target.mkdir(parents=True)
            images = sorted(class_dir.glob("digit-*.png"))[:per_class]
            extras = [p for p in class_dir.iterdir() if not p.name.startswith("digit-")]
            for path in images + (extras if broken else []):
                shutil.copy2(path, target / path.name)
    return destination


def tiny_params(sources: Path) -> dict[str, Any]:
    """The project's params.yaml scaled down to seconds: 16 px, one or two epochs, tiny splits."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["common"].update(image_size=16, device="cpu")
    params["ingest"]["sources"]["pretrain"]["uri"] = str(sources / "pretrain")
    params["ingest"]["sources"]["target"]["uri"] = str(sources / "target")
    params["ingest"]["sources"]["target"]["max_reject_fraction"] = 0.2
    params["split"]["pretrain"] = {"train": 0.7, "val": 0.3, "test": 0.0}
    params["split"]["target"] = {"train": 0.5, "val": 0.25, "test": 0.25}
    params["pretrain"].update(epochs=2, batch_size=16)
    params["finetune"]["head"]["epochs"] = 1
    params["finetune"]["unfreeze"]["epochs"] = 1
    params["register"].update(min_accuracy=0.0, min_class_recall=0.0)
    return params


def make_dvc_project(repo: Path, sources: Path, with_flows: bool = False) -> Path:
    """Copy the pipeline (and with ``with_flows`` the Prefect flow and prefect.yaml) into a new
    git + DVC repository at ``repo``, with tiny params reading images from ``sources``."""
    repo.mkdir()
    folders = ("graft", "tasks", "flows") if with_flows else ("graft", "tasks")
    for folder in folders:
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    files = ("dvc.yaml", ".gitignore") + (("prefect.yaml",) if with_flows else ())
    for name in files:
        shutil.copy2(ROOT / name, repo / name)
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(sources), sort_keys=False))
    run(["git", "init", "-q", "-b", "main"], repo)
    # An identity of the repository's own: code under test commits in-process (graft publish).
    run(["git", "config", "user.name", "graft tests"], repo)
    run(["git", "config", "user.email", "tests@graft.invalid"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "pipeline"], repo)
    return repo


def poll_until(
    probe: Callable[[], T],
    done: Callable[[T], bool],
    waiting_for: str,
    timeout_s: float,
    interval_s: float = 0.5,
    describe: Callable[[T], str] = str,
) -> T:
    """Call ``probe`` every ``interval_s`` seconds until ``done`` holds for what it returns,
    and return that. Raises AssertionError naming ``waiting_for`` and what ``probe`` last
    returned (as ``describe`` puts it) when ``timeout_s`` seconds pass first, and whatever
    ``probe`` raises."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = probe()
        if done(seen):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(
                f"waited {timeout_s:g}s for {waiting_for}; last seen: {describe(seen)}"
            )
        time.sleep(interval_s)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the system's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def snippet_of(markdown: str) -> str:
    """The Python code of the card's "Use it without graft" section in ``markdown``."""
    section = markdown.split("## Use it without graft", 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert found, "the section holds no Python code block"
    return found.group(1)
