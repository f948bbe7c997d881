"""Stage ``evaluate``: score the fine-tuned model and the baseline on the target test split.

Writes predictions, the reliability-diagram and ROC tables, the grid of confident mistakes and
the metrics (see graft.evaluation.evaluate).
"""

from __future__ import annotations

import sys

from graft import atomic
from graft.config.params import load_params
from graft.data import schemas
from graft.data.decoding import PillowLimits, configure_pillow
from graft.errors import run_main
from graft.evaluation.evaluate import evaluate_checkpoints
from graft.evaluation.misclassified import write_grid
from graft.training.determinism import use_deterministic_kernels


def main() -> None:
    """Score both checkpoints and write ``paths.evaluate.*``; run from the project root.

    Raises ParamsError on bad params, TableError on a damaged splits table and CheckpointError
    when a checkpoint is missing or the baseline does not fit the fine-tuned model.
    """
    params = load_params()
    configure_pillow(PillowLimits.of(params.ingest))  # as ingest decoded
    # The library seeds only within its own calls; the kernel choice is this process's.
    use_deterministic_kernels()
    splits = schemas.read_table(params.paths.split.splits, schemas.SPLITS_TABLE)
    dataset = params.paths.ingest.dataset
    scored = evaluate_checkpoints(
        params.paths.finetune.checkpoint,
        params.paths.baseline.checkpoint,
        splits,
        dataset,
        params.evaluate,
        params.common,
        decoded=params.paths.decoded,
    )
    out = params.paths.evaluate
    atomic.write_csv(out.predictions, scored.predictions)
    atomic.write_csv(out.calibration, scored.calibration)
    atomic.write_csv(out.roc, scored.roc)
    write_grid(out.misclassified, scored.predictions, dataset, params.evaluate.misclassified)
    atomic.write_json(out.metrics, scored.metrics)
    metrics, gain = scored.metrics, scored.metrics["transfer_gain"]
    assert isinstance(gain, dict)
    print(
        f"evaluate: accuracy {metrics['accuracy']:.4f}, balanced accuracy "
        f"{metrics['balanced_accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}, "
        f"ECE {metrics['ece']:.4f} on {metrics['test_images']} test images; "
        f"from random weights {gain['scratch_accuracy']:.4f} (gain {gain['gain']:+.4f})",
        file=sys.stderr,
    )


if __name__ == "__main__":
    run_main(main)
