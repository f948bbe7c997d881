"""Stage ``figures``: draw the run's training curves, transfer chart, confusion matrix,
reliability diagram and (two classes only) ROC curve as PNG files.

Reads only report files (the training histories and evaluate's tables and metrics), so a
change to a figure re-runs this stage and nothing upstream. See graft.evaluation.figures.
"""

from __future__ import annotations

import json
import sys

import pandas as pd

from graft.config.params import load_params
from graft.data import schemas
from graft.errors import run_main
from graft.evaluation.figures import write_figures


def main() -> None:
    """Write ``paths.figures.folder``; run from the project root.

    Raises ParamsError on bad params and TableError on a damaged predictions table.
    """
    paths = load_params().paths
    histories = {
        stage: pd.read_csv(train_paths.history)
        for stage, train_paths in (
            ("pretrain", paths.pretrain),
            ("finetune", paths.finetune),
            ("baseline", paths.baseline),
        )
    }
    evaluated = paths.evaluate
    written = write_figures(
        paths.figures.folder,
        histories,
        schemas.read_table(evaluated.predictions, schemas.PREDICTIONS),
        pd.read_csv(evaluated.calibration),
        pd.read_csv(evaluated.roc),
        json.loads(evaluated.metrics.read_text(encoding="utf-8")),
    )
    print(f"figures: {', '.join(str(path) for path in written)}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
