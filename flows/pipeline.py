"""The Prefect flow: one task per DVC stage, in DVC's order, with DVC deciding what runs.

dvc.yaml stays the only declaration of the pipeline. The flow reads the stage graph from DVC,
asks DVC whether each stage is up to date, and runs a stale one through ``dvc repro`` (so
``dvc.lock`` is updated exactly as by hand). A stage DVC reports up to date is a task that
completes at once and says so. A failed stage fails its task and the flow; nothing downstream
of it runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger

from tasks.config import load_params


class StageFailed(RuntimeError):
    """``dvc repro`` of one stage exited with an error."""


@dataclass(frozen=True)
class StageResult:
    stage: str
    ran: bool  # False: DVC reported it up to date, nothing was run
    seconds: float

    def row(self) -> dict[str, object]:
        status = "ran" if self.ran else "cached"
        return {"stage": self.stage, "status": status, "seconds": round(self.seconds, 1)}


def stage_order(root: Path, targets: list[str] | None = None) -> list[str]:
    """Stage names in the order DVC would evaluate them: every stage after its dependencies.

    With ``targets``, only those stages and everything upstream of them.
    """
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        by_name = {stage.name: stage for stage in graph}
        unknown = sorted(set(targets or []) - set(by_name))
        if unknown:
            raise ValueError(f"no such stage in dvc.yaml: {', '.join(unknown)}")
        if targets:
            keep = set().union(*(nx.descendants(graph, by_name[t]) | {by_name[t]} for t in targets))
            graph = graph.subgraph(keep)
        # Post-order visits a stage's dependencies before the stage itself.
        tops = sorted((s for s in graph if graph.in_degree(s) == 0), key=lambda s: s.name)
        order: list[str] = []
        for top in tops:
            for stage in nx.dfs_postorder_nodes(graph, top):
                if stage.name not in order:
                    order.append(stage.name)
        return order


def is_up_to_date(root: Path, stage: str) -> bool:
    """DVC's own verdict: no changed deps, outs, params or command for this stage."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo, repo.lock:
        (found,) = (s for s in repo.index.stages if s.name == stage)
        return not found.status()


def _dvc_env() -> dict[str, str]:
    # The stage commands call `python`: make it this environment's, as `dvc repro` by hand
    # in an activated environment would.
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


@task(name="stage")
def run_stage(root: Path, stage: str, force: bool = False) -> StageResult:
    """Run one DVC stage unless DVC reports it up to date; stream its output into the log."""
    logger = get_run_logger()
    started = time.perf_counter()
    if not force and is_up_to_date(root, stage):
        logger.info("%s: up to date (DVC cache)", stage)
        return StageResult(stage, ran=False, seconds=time.perf_counter() - started)
    command = ["dvc", "repro", "--single-item", stage] + (["--force"] if force else [])
    logger.info("%s: running `%s`", stage, " ".join(command))
    process = subprocess.Popen(
        command,
        cwd=root,
        env=_dvc_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    assert process.stdout is not None
    tail: list[str] = []
    for line in process.stdout:
        logger.info("%s | %s", stage, line.rstrip())
        tail = [*tail[-19:], line.rstrip()]
    if process.wait() != 0:
        last_lines = "\n".join(tail)
        raise StageFailed(f"stage {stage!r} failed (exit {process.returncode}):\n{last_lines}")
    return StageResult(stage, ran=True, seconds=time.perf_counter() - started)


def _publish_artifacts(root: Path, results: list[StageResult]) -> None:
    create_table_artifact(
        key="graft-stages",
        table=[r.row() for r in results],
        description="Stages of this run: ran, or up to date in the DVC cache.",
    )
    metrics_path = root / load_params(root / "params.yaml").paths.evaluate.metrics
    if metrics_path.exists():
        metrics: dict[str, Any] = json.loads(metrics_path.read_text())
        rows = [
            {"class": label, **{k: round(v, 4) for k, v in scores.items()}}
            for label, scores in metrics["per_class"].items()
        ]
        create_table_artifact(key="graft-test-metrics", table=rows, description="Test split.")
        create_markdown_artifact(
            key="graft-summary",
            markdown=(
                f"# graft run\n\nTest accuracy **{metrics['accuracy']:.4f}**, macro F1 "
                f"{metrics['macro_f1']:.4f} on {metrics['test_images']} images.\n\n"
                f"Stages run: {', '.join(r.stage for r in results if r.ran) or 'none'}."
            ),
        )


@flow(name="graft-pipeline", log_prints=True)
def pipeline(
    root: str = ".", stages: list[str] | None = None, force: bool = False
) -> list[StageResult]:
    """Run the DVC pipeline in ``root``, a task per stage; ``stages`` limits it (with upstream)."""
    project = Path(root).resolve()
    load_params(project / "params.yaml")  # bad params fail here, before any stage runs
    results = []
    for stage in stage_order(project, stages):
        results.append(run_stage.with_options(name=stage)(project, stage, force=force))
    _publish_artifacts(project, results)
    return results
