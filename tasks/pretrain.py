"""Stage ``pretrain``: train a backbone from random initialisation on the pretraining corpus.

This is the case where no public weights fit the domain: the network learns general features
from a larger labelled corpus (the ``pretrain`` source) that finetune then transfers.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd

from tasks import atomic, schemas
from tasks.checkpoints import CheckpointMeta, save_checkpoint
from tasks.config import Common, Params, Pretrain, load_params
from tasks.data import training_data
from tasks.errors import run_main
from tasks.models import build_model
from tasks.training import (
    TrainedModel,
    fit,
    history_table,
    resolve_device,
    seed_everything,
)


def pretrain(
    splits: pd.DataFrame, dataset: Path, settings: Pretrain, common: Common
) -> TrainedModel:
    """Train ``settings.arch`` from scratch on the pretrain role's train split."""
    seed_everything(common.seed)
    device = resolve_device(common.device)
    data = training_data(
        splits,
        dataset,
        "pretrain",
        common,
        batch_size=settings.batch_size,
        augment=settings.augment,
    )
    model = build_model(settings.arch, len(data.classes)).to(device)
    print(
        f"pretrain {settings.arch} from scratch on {len(data.train_set)} images "
        f"({len(data.classes)} classes), validating on {len(data.val_set)}, device {device}",
        file=sys.stderr,
    )
    outcome = fit(
        model,
        [{"params": list(model.parameters()), "lr": settings.lr}],
        data.train,
        data.val,
        epochs=settings.epochs,
        patience=settings.patience,
        device=device,
        phase="pretrain",
        weight_decay=settings.weight_decay,
    )
    best = outcome.best
    assert best is not None  # fit runs at least one epoch
    meta = CheckpointMeta(
        arch=settings.arch,
        classes=data.classes,
        image_size=common.image_size,
        mean=list(common.mean),
        std=list(common.std),
        epoch=best.epoch,
        metrics={"val_accuracy": best.val_accuracy, "val_loss": best.val_loss},
        init="scratch",
    )
    return TrainedModel(model.cpu(), meta, outcome)


def main() -> None:
    params: Params = load_params()
    splits = schemas.read_table(params.paths.split.splits, schemas.SPLITS_TABLE)
    started = time.perf_counter()
    trained = pretrain(splits, params.paths.ingest.dataset, params.pretrain, params.common)
    out = params.paths.pretrain
    save_checkpoint(out.checkpoint, trained.model, trained.meta)
    atomic.write_csv(out.history, history_table(trained.outcome.history))
    atomic.write_json(out.metrics, {**trained.meta.metrics, "best_epoch": trained.meta.epoch})
    elapsed = time.perf_counter() - started
    print(f"pretrain done in {elapsed:.1f}s: {trained.meta.metrics}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
