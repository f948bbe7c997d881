"""The ``paths`` section of params.yaml: every output path, declared once.

``dvc.yaml`` interpolates these values and the stage code reads them from here, so no path is
written twice. Paths are kept as written: relative ones are relative to the project root, where
the stages run.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from graft.config.settings import StrictModel


class ScanPaths(StrictModel):
    """``paths.scan``: the fingerprints of the source folders, ingest's only data dependency."""

    sources: Path


class IngestPaths(StrictModel):
    """``paths.ingest``: the ingested dataset folder, its reports and ingest's private cache.

    ``cache`` is not a pipeline output: it is a content-keyed speed-up, safe to delete.
    """

    dataset: Path
    rejected: Path
    summary: Path
    metrics: Path
    cache: Path


class SplitPaths(StrictModel):
    """``paths.split``: the splits table and its reports."""

    splits: Path
    summary: Path
    metrics: Path


class TrainPaths(StrictModel):
    """``paths.<training stage>``: checkpoint, metrics and history of one training stage.

    ``resume`` is where per-epoch state of an interrupted run lives; None: never resume.
    """

    checkpoint: Path
    metrics: Path
    history: Path
    resume: Path | None = None


class EvaluatePaths(StrictModel):
    """``paths.evaluate``: metrics, predictions (confusion matrix), reliability-diagram and ROC
    tables (ROC rows only for two classes), and the PNG grid of the most confident mistakes."""

    metrics: Path
    predictions: Path
    calibration: Path
    roc: Path
    misclassified: Path


class FiguresPaths(StrictModel):
    """``paths.figures``: the folder of PNG figures (training curves, transfer, confusion
    matrix, reliability diagram, ROC with two classes), DVC image plots."""

    folder: Path


class RegisterPaths(StrictModel):
    """``paths.register``: the model package folder and ``graft lineage``'s index.

    ``lineage_index`` is not a pipeline output: it is rebuilt on demand.
    """

    package: Path
    lineage_index: Path


class Paths(StrictModel):
    """``paths``: the output paths of every stage, and the decoded-image cache.

    ``decoded`` is not a pipeline output: decoded, resized images by content and settings, which
    the training and evaluation stages read (graft.data.decoded_cache); safe to delete, best on
    a fast local disk.
    """

    scan: ScanPaths
    ingest: IngestPaths
    split: SplitPaths
    pretrain: TrainPaths
    finetune: TrainPaths
    baseline: TrainPaths  # the finetune recipe from random weights
    evaluate: EvaluatePaths
    figures: FiguresPaths
    # "register" would shadow BaseModel.register (from ABCMeta); the YAML key stays "register".
    registry: RegisterPaths = Field(alias="register")
    decoded: Path
