"""Stage ``evaluate``: score the fine-tuned model on the target test split.

Writes per-image predictions (the confusion-matrix plot) and metrics: accuracy, macro F1 and
per-class precision, recall and F1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support
from torch import nn

from tasks import atomic, schemas
from tasks.checkpoints import CheckpointMeta, model_from_checkpoint
from tasks.config import Common, Params, load_params
from tasks.data import load_split, make_loader
from tasks.errors import run_main
from tasks.training import predict, resolve_device, seed_everything


def evaluate(
    model: nn.Module,
    meta: CheckpointMeta,
    splits: pd.DataFrame,
    dataset: Path,
    common: Common,
    *,
    batch_size: int,
) -> tuple[pd.DataFrame, dict[str, object]]:
    """Predictions on the target test split and the metrics computed from them."""
    seed_everything(common.seed)
    device = resolve_device(common.device)
    # Preprocess exactly as the model was trained: size and normalisation come from its card.
    preprocessing = common.model_copy(
        update={"image_size": meta.image_size, "mean": tuple(meta.mean), "std": tuple(meta.std)}
    )
    test_set = load_split(
        splits, dataset, role="target", split="test", size=meta.image_size, classes=meta.classes
    )
    loader = make_loader(test_set, preprocessing, batch_size=batch_size)
    probabilities = predict(model.to(device), loader, device)
    confidence, predicted = probabilities.max(dim=1)
    predictions = pd.DataFrame(
        {
            "sha256": test_set.sha256,
            "path": test_set.paths,
            "actual": [meta.classes[i] for i in test_set.targets.tolist()],
            "predicted": [meta.classes[i] for i in predicted.tolist()],
            "confidence": confidence.double().numpy(),
        }
    )
    predictions = schemas.validate(predictions, schemas.PREDICTIONS, where="evaluate")
    return predictions, classification_metrics(predictions, meta.classes)


def classification_metrics(predictions: pd.DataFrame, classes: list[str]) -> dict[str, object]:
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
        "macro_f1": float(
            f1_score(actual, predicted, labels=classes, average="macro", zero_division=0)
        ),
        "per_class": per_class,
    }


def main() -> None:
    params: Params = load_params()
    splits = schemas.read_table(params.paths.split.splits, schemas.SPLITS_TABLE)
    model, meta = model_from_checkpoint(params.paths.finetune.checkpoint)
    predictions, metrics = evaluate(
        model,
        meta,
        splits,
        params.paths.ingest.dataset,
        params.common,
        batch_size=params.evaluate.batch_size,
    )
    out = params.paths.evaluate
    atomic.write_csv(out.predictions, predictions)
    atomic.write_json(out.metrics, metrics)
    print(
        f"evaluate: accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f} "
        f"on {metrics['test_images']} test images",
        file=sys.stderr,
    )


if __name__ == "__main__":
    run_main(main)
