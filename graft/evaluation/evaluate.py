"""The ``evaluate`` stage's work: score the fine-tuned model on the target test split.

Writes per-image predictions (the confusion-matrix plot), a reliability-diagram table, a ROC
curve table (filled for two classes), a PNG grid of the most confident mistakes, and metrics:
accuracy, balanced accuracy, macro F1, per-class precision, recall and F1, expected calibration
error, ROC-AUC (two classes), and the transfer gain: the same test scores for the ``baseline``
stage's model, fine-tuned with the same recipe from random weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)
from torch import nn

from graft.config.params import Common, Evaluate
from graft.data import schemas
from graft.data.loaders import decoded_cache_folder, load_split, make_loader
from graft.training.checkpoints import (
    CheckpointError,
    CheckpointMeta,
    check_fits,
    model_from_checkpoint,
)
from graft.training.determinism import seeded
from graft.training.device import resolve_device
from graft.training.loop import predict

CALIBRATION_COLUMNS = ["bin", "lower", "upper", "images", "confidence", "accuracy"]
ROC_COLUMNS = ["fpr", "tpr", "threshold"]


@dataclass(frozen=True)
class SplitPredictions:
    """A model's output on the test split: the predictions table and every class probability."""

    table: pd.DataFrame  # one row per image, schemas.PREDICTIONS
    probabilities: np.ndarray  # (images, classes), columns in ``classes`` order
    classes: list[str]


def predict_test_split(
    model: nn.Module,
    meta: CheckpointMeta,
    splits: pd.DataFrame,
    dataset: Path,
    common: Common,
    *,
    batch_size: int,
    decoded: Path | None = None,
) -> SplitPredictions:
    """Run ``model`` over the target test split, preprocessed exactly as it was trained.

    Size, normalisation and class order come from ``meta`` (the model's checkpoint), the
    device, loader settings and seed from ``common``; ``batch_size`` is in images. Global RNGs
    are seeded for the run and restored afterwards. Returns one predictions row per test image
    (probabilities of shape (images, classes)). Images come through the decoded-image cache
    ``decoded`` (None: a temporary one for this call). Raises GraftError when the test split
    is empty or holds classes the model does not know.
    """
    with seeded(common.seed), decoded_cache_folder(decoded) as cache:
        device = resolve_device(common.device)
        # Size and normalisation come from the model's card, not from today's params.
        preprocessing = common.model_copy(
            update={
                "image_size": meta.image_size,
                "mean": tuple(meta.mean),
                "std": tuple(meta.std),
            }
        )
        test_set = load_split(
            splits,
            dataset,
            cache,
            role="target",
            split="test",
            size=meta.image_size,
            classes=meta.classes,
        )
        loader = make_loader(test_set, preprocessing, batch_size=batch_size)
        probabilities = predict(model.to(device), loader, device).double()
    confidence, predicted = probabilities.max(dim=1)
    table = pd.DataFrame(
        {
            "sha256": test_set.sha256,
            "path": test_set.paths,
            "actual": [meta.classes[i] for i in test_set.targets.tolist()],
            "predicted": [meta.classes[i] for i in predicted.tolist()],
            "confidence": confidence.numpy(),
        }
    )
    table = schemas.validate(table, schemas.PREDICTIONS, where="evaluate")
    return SplitPredictions(table, probabilities.numpy(), list(meta.classes))


def classification_metrics(predictions: pd.DataFrame, classes: list[str]) -> dict[str, object]:
    """Accuracy, balanced accuracy (mean recall over classes), macro F1 and per-class scores.

    ``predictions`` is a predictions table (``actual`` and ``predicted`` class names, one row
    per image); ``classes`` lists every class, in the order ``per_class`` follows. Returns
    ``test_images`` (count), ``accuracy``, ``balanced_accuracy``, ``macro_f1`` (fractions, 0 to
    1) and ``per_class``: ``{class: {precision, recall, f1, support}}``, support in images. A
    class without predictions or images scores 0, never NaN.
    """
    actual, predicted = predictions["actual"], predictions["predicted"]
    precision, recall, f1, support = precision_recall_fscore_support(
        actual, predicted, labels=classes, zero_division=0
    )
    per_class = {
        label: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(classes)
    }
    return {
        "test_images": len(predictions),
        "accuracy": float(accuracy_score(actual, predicted)),
        "balanced_accuracy": float(balanced_accuracy_score(actual, predicted)),
        "macro_f1": float(
            f1_score(actual, predicted, labels=classes, average="macro", zero_division=0)
        ),
        "per_class": per_class,
    }


def calibration_table(predictions: pd.DataFrame, bins: int) -> pd.DataFrame:
    """The reliability diagram: top-class confidence cut into ``bins`` equal-width bins.

    Bin ``b`` holds confidences in ``(b/bins, (b+1)/bins]`` (0 falls into bin 0). Returns one
    row per non-empty bin with columns CALIBRATION_COLUMNS: ``bin``, its ``lower`` and ``upper``
    edge, ``images`` (count), mean ``confidence`` and ``accuracy`` (fractions). Empty bins are
    left out (they have neither).
    """
    confidence = predictions["confidence"].to_numpy(dtype=np.float64)
    correct = (predictions["actual"] == predictions["predicted"]).to_numpy(dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges, right=True) - 1, 0, bins - 1)
    rows = []
    for b in np.unique(index):
        members = index == b
        rows.append(
            {
                "bin": int(b),
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "images": int(members.sum()),
                "confidence": float(confidence[members].mean()),
                "accuracy": float(correct[members].mean()),
            }
        )
    return pd.DataFrame(rows, columns=CALIBRATION_COLUMNS)


def expected_calibration_error(calibration: pd.DataFrame) -> float:
    """Sum over bins of (share of images) x |accuracy - mean confidence|: 0 to 1, 0 calibrated.

    ``calibration`` is a :func:`calibration_table` with at least one row.
    """
    images = calibration["images"].to_numpy(dtype=np.float64)
    gaps = (calibration["accuracy"] - calibration["confidence"]).abs().to_numpy()
    return float((images * gaps).sum() / images.sum())


def roc(test: SplitPredictions) -> tuple[float | None, pd.DataFrame]:
    """ROC-AUC and curve for two classes, the second (sorted) class being the positive one.

    Returns the area under the curve (0 to 1) and the curve as a frame of ROC_COLUMNS (false
    and true positive rates, score threshold), one row per threshold. None and an empty curve
    for more classes, or when the test split holds only one class (the curve needs both).
    """
    empty = pd.DataFrame(columns=ROC_COLUMNS)
    if len(test.classes) != 2:
        return None, empty
    positive = (test.table["actual"] == test.classes[1]).to_numpy()
    if positive.all() or not positive.any():
        return None, empty
    score = test.probabilities[:, 1]
    fpr, tpr, threshold = roc_curve(positive, score)
    curve = pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": threshold}, columns=ROC_COLUMNS)
    return float(roc_auc_score(positive, score)), curve


@dataclass(frozen=True)
class Evaluation:
    """Everything the stage writes except the image grid: the predictions table, the
    reliability-diagram and ROC tables and the metrics (see :func:`evaluation`)."""

    predictions: pd.DataFrame
    calibration: pd.DataFrame
    roc: pd.DataFrame
    metrics: dict[str, object]


def evaluation(test: SplitPredictions, calibration_bins: int) -> Evaluation:
    """Every metric and table computed from one model's test predictions.

    ``calibration_bins`` is the number of equal-width confidence bins of the ECE. The metrics
    are :func:`classification_metrics`' plus ``ece``, and ``roc_auc`` when :func:`roc` gives one.
    """
    metrics = classification_metrics(test.table, test.classes)
    calibration = calibration_table(test.table, calibration_bins)
    metrics["ece"] = expected_calibration_error(calibration)
    auc, curve = roc(test)
    if auc is not None:
        metrics["roc_auc"] = auc
    return Evaluation(test.table, calibration, curve, metrics)


def transfer_gain(pretrained: dict[str, object], scratch: dict[str, object]) -> dict[str, float]:
    """What pretraining bought: test scores from the pretrained backbone against random weights.

    ``pretrained`` and ``scratch`` are :func:`classification_metrics` of the two models on the
    same test images. Returns both accuracies and macro F1 scores (fractions) and their
    differences, ``gain`` and ``macro_f1_gain`` (pretrained minus scratch, -1 to 1).
    """
    accuracy, scratch_accuracy = _score(pretrained, "accuracy"), _score(scratch, "accuracy")
    macro_f1, scratch_macro_f1 = _score(pretrained, "macro_f1"), _score(scratch, "macro_f1")
    return {
        "pretrained_accuracy": accuracy,
        "scratch_accuracy": scratch_accuracy,
        "gain": accuracy - scratch_accuracy,
        "pretrained_macro_f1": macro_f1,
        "scratch_macro_f1": scratch_macro_f1,
        "macro_f1_gain": macro_f1 - scratch_macro_f1,
    }


def _score(metrics: dict[str, object], key: str) -> float:
    value = metrics[key]
    assert isinstance(value, float), f"{key} is {value!r}"
    return value


def evaluate_checkpoints(
    finetuned: Path,
    baseline: Path,
    splits: pd.DataFrame,
    dataset: Path,
    settings: Evaluate,
    common: Common,
    *,
    decoded: Path | None = None,
) -> Evaluation:
    """Score the fine-tuned model, and the random-weights baseline beside it, on the test split.

    ``finetuned`` and ``baseline`` are checkpoint paths; ``splits`` the splits table and
    ``dataset`` the ingested dataset folder, read through the decoded-image cache ``decoded``
    (None: a temporary one for this call). Returns the fine-tuned model's :class:`Evaluation`,
    its metrics with a ``transfer_gain`` entry (:func:`transfer_gain`). Raises CheckpointError
    when a checkpoint cannot be read or the baseline's classes or architecture differ from the
    fine-tuned model's (naming the classes missing on each side), and GraftError as
    :func:`predict_test_split` does.
    """
    model, meta = model_from_checkpoint(finetuned)
    scratch_model, scratch_meta = model_from_checkpoint(baseline)
    try:
        check_fits(scratch_meta, baseline, classes=meta.classes, arch=meta.arch)
    except CheckpointError as error:
        # The baseline is the same recipe from random weights: it must fit the fine-tuned model.
        message = f"{error}; it must match {finetuned}: re-run the baseline stage"
        raise CheckpointError(message) from None
    batch_size = settings.batch_size
    test = predict_test_split(
        model, meta, splits, dataset, common, batch_size=batch_size, decoded=decoded
    )
    scored = evaluation(test, settings.calibration_bins)
    scratch = predict_test_split(
        scratch_model, scratch_meta, splits, dataset, common, batch_size=batch_size, decoded=decoded
    )
    scratch_metrics = classification_metrics(scratch.table, scratch.classes)
    scored.metrics["transfer_gain"] = transfer_gain(scored.metrics, scratch_metrics)
    return scored
