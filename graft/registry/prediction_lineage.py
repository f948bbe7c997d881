"""The lineage of a prediction file: which model version made its rows.

Every row ``graft predict`` writes names its model's version, commit and weights sha256
(graft/inference/records.py). A file whose rows all name one model leads to that version's
lineage: by its tag when published, else by its commit, else by its weights among published
versions. A file whose rows name several models is reported as such, with each model's rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graft.inference.records import UNPUBLISHED, ModelRecord, models_in
from graft.registry.lineage import LineageError, index_path
from graft.registry.lineage_index import open_index, refresh
from graft.registry.lineage_queries import versions_with_weights


@dataclass(frozen=True)
class PredictionsModel:
    """The one model behind the prediction file ``path``: its ``record`` (as the rows name
    it), how many ``rows`` there are, and ``ref``, what to look its lineage up by."""

    path: Path
    record: ModelRecord
    rows: int
    ref: str

    def report(self, lineage: dict[str, Any]) -> dict[str, Any]:
        """The ``predictions`` section of ``graft lineage show --json`` for ``lineage``, the
        version it led to: the file, its rows, the model they name, and whether that
        version's weights are the ones the rows name (``weights_match``)."""
        return {
            "file": str(self.path),
            "rows": self.rows,
            "model_version": self.record.version,
            "model_commit": self.record.commit or None,
            "weights_sha256": self.record.weights_sha256,
            "weights_match": lineage["model"]["sha256"] == self.record.weights_sha256,
        }

    def lines(self, lineage: dict[str, Any]) -> list[str]:
        """The lines ``graft lineage show`` prints above the version's lineage."""
        lines = [
            f"{self.path}: {self.rows} predictions, every row by {self.record.version} "
            f"(weights sha256 {self.record.weights_sha256})"
        ]
        if lineage["model"]["sha256"] != self.record.weights_sha256:
            lines.append(
                f"warning: the rows name weights sha256 {self.record.weights_sha256}, but "
                f"{self.ref} holds {lineage['model']['sha256']}: the rows did not come from it"
            )
        return lines


def predictions_model(root: Path, path: Path) -> PredictionsModel | None:
    """The model behind the prediction file ``path``, to be looked up in the project ``root``;
    None when ``path`` is not a prediction file. Raises LineageError when its rows name more
    than one model (each with its count of rows), or name unpublished weights with no commit
    that no published version holds; OSError when it cannot be read."""
    counts = models_in(path)
    if counts is None:
        return None
    if not counts:
        raise LineageError(f"{path}: a prediction file without rows names no model")
    if len(counts) > 1:
        models = "; ".join(
            f"{n} rows by {m.version} (weights sha256 {m.weights_sha256[:12]})"
            for m, n in counts.most_common()
        )
        raise LineageError(
            f"{path}: its rows disagree on the model: {models}. Show each with "
            "`graft lineage show <version>`"
        )
    [(record, rows)] = counts.items()
    return PredictionsModel(path, record, rows, _ref(root, path, record))


def _ref(root: Path, path: Path, record: ModelRecord) -> str:
    if record.version and record.version != UNPUBLISHED:
        return record.version
    if record.commit:
        return record.commit
    with open_index(index_path(root)) as index:
        refresh(index, root)
        tags = versions_with_weights(index, record.weights_sha256)
    if not tags:
        raise LineageError(
            f"{path}: its rows come from unpublished weights (sha256 "
            f"{record.weights_sha256}) that no published version holds"
        )
    return tags[-1]
