"""Stage ``finetune``: graft the pretrained backbone onto a new head for the target classes.

Phase 1 freezes the backbone and trains the head, whose last linear layer is replaced for the
target classes. Phase 2 unfreezes the deepest backbone blocks and trains on at a much lower
learning rate, so the transferred features adapt without being destroyed. The best weights by
validation accuracy over both phases are kept.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import pandas as pd
from torch import nn

from tasks import atomic, schemas
from tasks.checkpoints import CheckpointMeta, model_from_checkpoint, save_checkpoint
from tasks.config import Common, Finetune, Params, load_params
from tasks.data import TrainingData, training_data
from tasks.errors import run_main
from tasks.hashing import file_sha256
from tasks.models import build_model, head_module, replace_head, set_trainable
from tasks.training import (
    FitOutcome,
    TrainedModel,
    fit,
    history_table,
    resolve_device,
    seed_everything,
)


def starting_model(
    backbone: Path | None, arch: str, num_classes: int
) -> tuple[nn.Module, str, str]:
    """The network to fine-tune, its architecture name and where its weights came from.

    With ``backbone`` None the same recipe starts from random ``arch`` weights: the baseline
    that shows what pretraining buys. Otherwise the architecture is the checkpoint's.
    """
    if backbone is None:
        return build_model(arch, num_classes), arch, "scratch"
    model, meta = model_from_checkpoint(backbone)
    replace_head(model, num_classes)
    return model, meta.arch, f"checkpoint:{file_sha256(backbone)}"


def finetune(
    splits: pd.DataFrame,
    dataset: Path,
    settings: Finetune,
    common: Common,
    *,
    backbone: Path | None,
    arch: str,
) -> TrainedModel:
    """Two-phase fine-tuning on the target role; ``arch`` is used only when ``backbone`` is None."""
    seed_everything(common.seed)
    device = resolve_device(common.device)
    data: TrainingData = training_data(
        splits, dataset, "target", common, batch_size=settings.batch_size, augment=settings.augment
    )
    model, arch, init = starting_model(backbone, arch, len(data.classes))
    model.to(device)
    print(
        f"finetune {arch} from {init[:24]} on {len(data.train_set)} images "
        f"({len(data.classes)} classes), validating on {len(data.val_set)}",
        file=sys.stderr,
    )
    set_trainable(model, 0)
    head_only = fit(
        model,
        [{"params": list(head_module(model).parameters()), "lr": settings.head.lr}],
        data.train,
        data.val,
        epochs=settings.head.epochs,
        patience=settings.patience,
        device=device,
        phase="head",
    )
    outcome = head_only
    phase2 = settings.unfreeze
    if phase2.blocks > 0 and phase2.epochs > 0:
        head_only_state = copy.deepcopy(model.state_dict())
        unfrozen = set_trainable(model, phase2.blocks)
        deeper = fit(
            model,
            [
                {"params": list(head_module(model).parameters()), "lr": phase2.head_lr},
                {"params": unfrozen, "lr": phase2.lr},
            ],
            data.train,
            data.val,
            epochs=phase2.epochs,
            patience=settings.patience,
            device=device,
            phase="unfreeze",
            first_epoch=len(head_only.history) + 1,
        )
        outcome = FitOutcome(head_only.history + deeper.history, head_only.best)
        if deeper.best is not None and deeper.best.beats(head_only.best):
            outcome.best = deeper.best
        else:  # unfreezing did not help: go back to the head-only weights
            model.load_state_dict(head_only_state)
    best = outcome.best
    assert best is not None
    meta = CheckpointMeta(
        arch=arch,
        classes=data.classes,
        image_size=common.image_size,
        mean=list(common.mean),
        std=list(common.std),
        epoch=best.epoch,
        metrics={"val_accuracy": best.val_accuracy, "val_loss": best.val_loss},
        init=init,
        extra={"best_phase": best.phase},
    )
    return TrainedModel(model.cpu(), meta, outcome)


def main() -> None:
    params: Params = load_params()
    splits = schemas.read_table(params.paths.split.splits, schemas.SPLITS_TABLE)
    started = time.perf_counter()
    trained = finetune(
        splits,
        params.paths.ingest.dataset,
        params.finetune,
        params.common,
        backbone=params.paths.pretrain.checkpoint,
        arch=params.pretrain.arch,
    )
    out = params.paths.finetune
    save_checkpoint(out.checkpoint, trained.model, trained.meta)
    atomic.write_csv(out.history, history_table(trained.outcome.history))
    metrics = {**trained.meta.metrics, "best_epoch": trained.meta.epoch}
    atomic.write_json(out.metrics, metrics)
    elapsed = time.perf_counter() - started
    print(f"finetune done in {elapsed:.1f}s: {trained.meta.metrics}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
