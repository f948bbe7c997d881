"""What people read in the Prefect UI after a run: stages, ingest rejections, metrics, summary.

Every artifact is built from the files the stages wrote (reports and the model package), so the
UI shows exactly what DVC versioned. A failed run publishes them too, with the reason first:
the stage table says which stage failed and which never started, and a report is shown only
when the stage that writes it finished in this run (one left by an earlier run would describe
another model). Artifact keys carry the workspace (:func:`artifact_key`): runs of several
clones on one server do not overwrite each other's.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from graft.config.params import Params

REJECTED_ROWS = 500  # the UI table stays readable; the full list is in the CSV it names


@dataclass(frozen=True)
class StageRow:
    """One row of the run's stage table: the stage, its status ("ran", "cached", "failed" or
    "not run": downstream of a failure), its seconds (None when it did not end by itself) and
    where it ran ("workspace", "worktree" or "pool <work pool>")."""

    stage: str
    status: str
    seconds: float | None
    where: str = "workspace"


def workspace_label(root: Path) -> str:
    """A short name for the project folder ``root`` that tells clones apart on one Prefect
    server: its folder name in lowercase letters, digits and dashes (at most 24 characters),
    a dash, and 6 hex digits of the sha256 of its absolute path."""
    name = re.sub(r"[^a-z0-9]+", "-", root.resolve().name.lower()).strip("-")[:24] or "project"
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:6]
    return f"{name}-{digest}"


def artifact_key(root: Path, name: str) -> str:
    """The key of artifact ``name`` (lowercase letters, digits, dashes) of runs in the project
    ``root``: ``graft-<workspace label>-<name>``, so that two workspaces do not share it."""
    return f"graft-{workspace_label(root)}-{name}"


def publish_run_artifacts(
    root: Path,
    params: Params,
    stages: list[StageRow],
    failure: str | None = None,
) -> None:
    """Create this run's artifacts in Prefect: the ``stages`` table, the ingest summary and
    rejected files, the per-class test metrics and the summary with the model card, from the
    reports under the project ``root`` that ``params``' paths name. A report is left out when
    the stage that writes it did not finish in this run (ran or cached in ``stages``).
    ``failure``: why the run failed (one line), put first in the summary. Must run inside a
    flow or task run. Raises OSError and ValueError for a report that exists but cannot be
    read or parsed."""
    create_table_artifact(
        key=artifact_key(root, "stages"),
        table=[
            {
                "stage": s.stage,
                "status": s.status,
                "seconds": "" if s.seconds is None else round(s.seconds, 1),
                "where": s.where if s.status in ("ran", "cached") else "",
            }
            for s in stages
        ],
        description="Stages of this run: ran (where: this workspace, a work tree of it beside "
        "other stages, or a work pool's worker), up to date in the DVC cache (cached), failed, "
        "or not run (downstream of a failure).",
    )
    finished = {s.stage for s in stages if s.status in ("ran", "cached")}
    paths = params.paths
    if "ingest" in finished:
        _rejections(root, root / paths.ingest.summary, root / paths.ingest.rejected)
    metrics_path = root / paths.evaluate.metrics
    metrics = None
    if "evaluate" in finished and metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        create_table_artifact(
            key=artifact_key(root, "test-metrics"),
            table=[
                {"class": label, **{k: round(v, 4) for k, v in scores.items()}}
                for label, scores in metrics["per_class"].items()
            ],
            description=f"Per-class metrics on the target test split ({paths.evaluate.metrics}).",
        )
    card = root / paths.registry.package / "model_card.md"
    create_markdown_artifact(
        key=artifact_key(root, "summary"),
        markdown=_summary(
            card if "register" in finished else None, metrics, stages, params, failure
        ),
    )


def _rejections(root: Path, summary: Path, rejected: Path) -> None:
    if summary.exists():
        create_markdown_artifact(
            key=artifact_key(root, "ingest-summary"), markdown=summary.read_text()
        )
    if rejected.exists():
        with rejected.open(newline="", encoding="utf-8") as handle:
            rows = [
                {k: row[k] for k in ("role", "path", "verdict", "reason")}
                for row in csv.DictReader(handle)
            ]
        create_table_artifact(
            key=artifact_key(root, "ingest-rejected"),
            table=rows[:REJECTED_ROWS],
            description=f"{len(rows)} rejected files (all of them in {rejected}).",
        )


def _summary(
    card: Path | None,
    metrics: dict[str, Any] | None,
    stages: list[StageRow],
    params: Params,
    failure: str | None,
) -> str:
    lines = ["# graft run" + (": failed" if failure else ""), ""]
    if failure:
        lines += [f"**Why:** {failure}", ""]
        failed = [s.stage for s in stages if s.status == "failed"]
        skipped = [s.stage for s in stages if s.status == "not run"]
        lines.append(f"Failed: {', '.join(failed) or 'before any stage ran'}.")
        if skipped:
            lines.append(f"Not run (downstream of the failure): {', '.join(skipped)}.")
        lines.append("")
    if metrics is not None:
        lines.append(
            f"Test accuracy **{metrics['accuracy']:.4f}**, macro F1 {metrics['macro_f1']:.4f} "
            f"on {metrics['test_images']} images."
        )
        gate = params.registry
        recalls = [scores["recall"] for scores in metrics["per_class"].values()]
        lines.append(
            f"Gate: test accuracy {metrics['accuracy']:.4f} against register.min_accuracy "
            f"{gate.min_accuracy}; lowest class recall {min(recalls):.4f} against "
            f"register.min_class_recall {gate.min_class_recall}."
        )
    ran = [s.stage for s in stages if s.status == "ran"]
    nothing = "none (everything up to date in the DVC cache)" if not failure else "none"
    lines.append(f"Stages run: {', '.join(ran) or nothing}.")
    if card is not None and card.exists():
        # The card itself (it has its own heading), not a link: a file:// link is one a
        # browser refuses from the UI.
        lines += ["", card.read_text(encoding="utf-8")]
    return "\n".join(lines) + "\n"
