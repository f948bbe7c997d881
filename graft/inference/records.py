"""Prediction files: one row per input file, each naming the model that made it.

Two formats with the same fields. CSV (one header line) has the columns::

    path, sha256, verdict, reason, class, probability,
    class_1, probability_1, ..., class_K, probability_K,
    model_version, model_commit, weights_sha256

and JSON lines hold one object per row with ``top_k``, a list of ``{"class", "probability"}``,
in place of the numbered columns. ``class`` and ``probability`` are the top class and its
softmax probability (0-1); a rejected file has its verdict and reason and no class. Every row
carries the model's version (or ``unpublished``), commit and weights sha256, so a file of
predictions names its model on its own (graft lineage show reads them back:
:func:`models_in`).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple

from graft.atomic import atomic_path
from graft.errors import GraftError

if TYPE_CHECKING:  # the model code imports torch; reading rows back (lineage) must not
    from graft.inference.model_source import ModelSource

FORMATS = ("csv", "jsonl")
UNPUBLISHED = "unpublished"  # the model_version of weights no published version holds
MODEL_FIELDS = ("model_version", "model_commit", "weights_sha256")
DIGITS = 6  # probabilities are written rounded to this many decimals


class Prediction(NamedTuple):
    """One input file's row: its ``path`` as given, content ``sha256`` (None when it could not
    be read), ``verdict`` and ``reason`` (graft.data.schemas.VERDICTS; the reason of an
    accepted file is empty or a warning), and ``top``: (class, probability) pairs, most probable
    first, empty unless accepted."""

    path: str
    sha256: str | None
    verdict: str
    reason: str
    top: tuple[tuple[str, float], ...] = ()


def csv_columns(top_k: int) -> list[str]:
    """The CSV header for ``top_k`` ranked classes per row."""
    ranked = [f"{name}_{rank}" for rank in range(1, top_k + 1) for name in ("class", "probability")]
    return ["path", "sha256", "verdict", "reason", "class", "probability", *ranked, *MODEL_FIELDS]


class PredictionWriter:
    """Writes :class:`Prediction` rows in ``form`` (``csv`` or ``jsonl``) to ``stream``, each
    row completed with ``source``'s version, commit and weights sha256 and padded to
    ``top_k`` ranked classes (CSV)."""

    def __init__(self, stream: IO[str], form: str, top_k: int, source: ModelSource) -> None:
        if form not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {form!r}")
        self.stream, self.form, self.top_k = stream, form, top_k
        self.model = dict(zip(MODEL_FIELDS, _model_values(source), strict=True))
        self.rows = 0
        self._csv = csv.writer(stream, lineterminator="\n") if form == "csv" else None
        if self._csv is not None:
            self._csv.writerow(csv_columns(top_k))

    def write(self, row: Prediction) -> None:
        """Write one row."""
        self.rows += 1
        top = [(label, round(float(p), DIGITS)) for label, p in row.top]
        best = top[0] if top else (None, None)
        if self._csv is None:
            record = {
                "path": row.path, "sha256": row.sha256, "verdict": row.verdict,
                "reason": row.reason, "class": best[0], "probability": best[1],
                "top_k": [{"class": label, "probability": p} for label, p in top], **self.model,
            }  # fmt: skip
            self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
            return
        ranked: list[Any] = [value for pair in top for value in pair]
        ranked += [""] * (2 * self.top_k - len(ranked))
        self._csv.writerow(
            [row.path, row.sha256 or "", row.verdict, row.reason, best[0] or "",
             "" if best[1] is None else best[1], *ranked, *self.model.values()]
        )  # fmt: skip


def _model_values(source: ModelSource) -> tuple[str, str, str]:
    return source.version, source.commit or "", source.weights_sha256


class OutputError(GraftError):
    """An ``--out`` that graft must not or cannot write."""


def output_target(out: Path | None, inputs: set[str]) -> Path | None:
    """Where ``--out`` ``out`` writes, checked before any work: None for standard output
    (``out`` None or ``-``); a symbolic link's target (the link is kept). ``inputs`` are the
    absolute paths of the input files. Creates missing parent folders. Raises OutputError when
    ``out`` is a folder, device or pipe (a file graft would replace by renaming), one of the
    inputs, or in a folder that cannot be created or written."""
    if out is None or str(out) == "-":
        return None
    target = Path(os.path.realpath(out))
    if target.exists() and not target.is_file():
        raise OutputError(
            f"--out {out} is not a regular file (a folder, device or pipe): predictions go to a "
            "new file renamed into place, which would replace it"
        )
    if str(target) in inputs or os.path.abspath(out) in inputs:
        raise OutputError(f"--out {out} is one of the inputs: it would be overwritten")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"--out {out}: cannot create its folder: {error.strerror}") from None
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise OutputError(f"--out {out}: its folder {target.parent} is not writable")
    return target


@contextmanager
def prediction_output(
    out: Path | None, form: str, top_k: int, source: ModelSource
) -> Iterator[PredictionWriter]:
    """A writer to ``out``, which appears whole or not at all (written to a temporary file
    beside it and renamed on success; an error or interrupt leaves ``out`` as it was; a
    temporary left by a killed writer is removed by the next write to ``out``), or to standard
    output when ``out`` is None. Check ``out`` first with :func:`output_target`. Raises
    OSError when ``out`` cannot be written."""
    if out is None:
        yield PredictionWriter(sys.stdout, form, top_k, source)
        sys.stdout.flush()
        return
    with atomic_path(out) as temporary, temporary.open("w", newline="", encoding="utf-8") as f:
        yield PredictionWriter(f, form, top_k, source)


class ModelRecord(NamedTuple):
    """The model fields of prediction rows: version (tag or ``unpublished``), commit (empty
    when unknown) and weights sha256."""

    version: str
    commit: str
    weights_sha256: str


def models_in(path: Path) -> Counter[ModelRecord] | None:
    """How many rows of the prediction file ``path`` each model made; None when ``path`` is not
    a prediction file (neither JSON lines nor CSV with the model columns). Raises OSError when
    it cannot be read."""
    with path.open("rb") as raw:
        if b"\0" in raw.read(4096):  # binary (a model file, an image): not text rows
            return None
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        first = handle.readline()
        handle.seek(0)
        if first.lstrip().startswith("{"):
            return _jsonl_models(handle)
        return _csv_models(handle)


def _jsonl_models(handle: IO[str]) -> Counter[ModelRecord] | None:
    counts: Counter[ModelRecord] = Counter()
    for line in handle:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            counts[ModelRecord(*(str(record[key] or "") for key in MODEL_FIELDS))] += 1
        except (ValueError, KeyError, TypeError):
            return None
    return counts or None


def _csv_models(handle: IO[str]) -> Counter[ModelRecord] | None:
    try:
        reader = csv.DictReader(handle)
        if not set(MODEL_FIELDS) <= set(reader.fieldnames or ()):
            return None
        return Counter(ModelRecord(*(row[key] or "" for key in MODEL_FIELDS)) for row in reader)
    except csv.Error:
        return None
