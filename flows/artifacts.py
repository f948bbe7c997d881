"""What people read in the Prefect UI after a run: stages, ingest rejections, metrics, summary.

Every artifact is built from the files the stages wrote (reports and the model package), so the
UI shows exactly what DVC versioned; a report that does not exist yet (a run stopped early) is
left out rather than faked.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from graft.config.params import Params

REJECTED_ROWS = 500  # the UI table stays readable; the full list is in the CSV it names


@dataclass(frozen=True)
class StageRow:
    """One row of the run's stage table: the stage, "ran" or "cached", its seconds and where
    it ran ("workspace", "worktree" or "pool <work pool>")."""

    stage: str
    status: str  # "ran" or "cached"
    seconds: float
    where: str = "workspace"


def publish_run_artifacts(root: Path, params: Params, stages: list[StageRow]) -> None:
    """Create this run's artifacts in Prefect: the ``stages`` table, the ingest summary and
    rejected files, the per-class test metrics and the summary with the model card, from the
    reports under the project ``root`` that ``params``' paths name (a report not written yet is
    left out). Must run inside a flow or task run. Raises OSError and ValueError for a report
    that exists but cannot be read or parsed."""
    create_table_artifact(
        key="graft-stages",
        table=[
            {"stage": s.stage, "status": s.status, "seconds": round(s.seconds, 1), "where": s.where}
            for s in stages
        ],
        description="Stages of this run: ran (where: this workspace, a work tree of it beside "
        "other stages, or a work pool's worker), or up to date in the DVC cache (cached).",
    )
    paths = params.paths
    _rejections(root / paths.ingest.summary, root / paths.ingest.rejected)
    metrics_path = root / paths.evaluate.metrics
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else None
    if metrics is not None:
        create_table_artifact(
            key="graft-test-metrics",
            table=[
                {"class": label, **{k: round(v, 4) for k, v in scores.items()}}
                for label, scores in metrics["per_class"].items()
            ],
            description=f"Per-class metrics on the target test split ({metrics_path}).",
        )
    create_markdown_artifact(
        key="graft-summary",
        markdown=_summary(root / paths.registry.package / "model_card.md", metrics, stages),
    )


def _rejections(summary: Path, rejected: Path) -> None:
    if summary.exists():
        create_markdown_artifact(key="graft-ingest-summary", markdown=summary.read_text())
    if rejected.exists():
        with rejected.open(newline="", encoding="utf-8") as handle:
            rows = [
                {k: row[k] for k in ("role", "path", "verdict", "reason")}
                for row in csv.DictReader(handle)
            ]
        create_table_artifact(
            key="graft-ingest-rejected",
            table=rows[:REJECTED_ROWS],
            description=f"{len(rows)} rejected files (all of them in {rejected}).",
        )


def _summary(card: Path, metrics: dict[str, Any] | None, stages: list[StageRow]) -> str:
    ran = [s.stage for s in stages if s.status == "ran"]
    lines = ["# graft run", ""]
    if metrics is not None:
        lines.append(
            f"Test accuracy **{metrics['accuracy']:.4f}**, macro F1 {metrics['macro_f1']:.4f} "
            f"on {metrics['test_images']} images."
        )
    nothing = "none (everything up to date in the DVC cache)"
    lines.append(f"Stages run: {', '.join(ran) or nothing}.")
    if card.exists():
        lines += ["", f"Model card: [{card.name}]({card.resolve().as_uri()})", ""]
        lines.append(card.read_text(encoding="utf-8"))
    return "\n".join(lines) + "\n"
