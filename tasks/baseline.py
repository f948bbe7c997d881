"""Stage ``baseline``: the finetune recipe started from random weights instead of the backbone.

Same target data, same two phases, same params and the same architecture as the pretrained
backbone (``pretrain.arch``); only the starting weights differ. ``evaluate`` scores it beside
the fine-tuned model, and the difference is the transfer gain: what pretraining bought. It
does not read the pretrained checkpoint, so re-running pretrain never re-trains it.
"""

from __future__ import annotations

import sys
import time

import pandas as pd

from tasks import atomic, schemas
from tasks.checkpoints import save_checkpoint
from tasks.config import Params, load_params
from tasks.errors import run_main
from tasks.finetune import finetune
from tasks.training import TrainedModel, history_table


def train_baseline(splits: pd.DataFrame, params: Params) -> TrainedModel:
    """Fine-tune ``pretrain.arch`` from random weights with the ``finetune`` settings."""
    return finetune(
        splits,
        params.paths.ingest.dataset,
        params.finetune,
        params.common,
        backbone=None,
        arch=params.pretrain.arch,
    )


def main() -> None:
    params: Params = load_params()
    splits = schemas.read_table(params.paths.split.splits, schemas.SPLITS_TABLE)
    started = time.perf_counter()
    trained = train_baseline(splits, params)
    out = params.paths.baseline
    save_checkpoint(out.checkpoint, trained.model, trained.meta)
    atomic.write_csv(out.history, history_table(trained.outcome.history))
    atomic.write_json(out.metrics, {**trained.meta.metrics, "best_epoch": trained.meta.epoch})
    elapsed = time.perf_counter() - started
    print(f"baseline done in {elapsed:.1f}s: {trained.meta.metrics}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
