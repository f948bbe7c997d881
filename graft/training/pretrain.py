"""Stage ``pretrain``: the backbone finetune starts from, trained on the pretraining corpus.

``pretrain.init`` says where its weights start (tasks/weights.py): ``scratch`` is the case where
no public weights fit the domain and the network learns general features from a larger labelled
corpus (the ``pretrain`` source); ``imagenet`` or a checkpoint path start from those weights
and, with ``epochs`` > 0, go on training on the corpus (their last layer replaced for its
classes); with ``epochs: 0`` they are passed through unchanged, recorded with their provenance.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd

from graft.config.params import Common, Pretrain
from graft.data.loaders import training_data
from graft.training.checkpoints import CheckpointMeta
from graft.training.folding import folded
from graft.training.loop import (
    FitOutcome,
    Speed,
    TrainedModel,
    fit,
    resolve_device,
    seed_everything,
)
from graft.training.models import replace_head
from graft.training.weights import starting_weights


def pretrain(
    splits: pd.DataFrame,
    dataset: Path,
    settings: Pretrain,
    common: Common,
    *,
    resume: Path | None = None,
) -> TrainedModel:
    """Start ``settings.arch`` from ``settings.init`` and train it on the pretrain role."""
    seed_everything(common.seed)
    device = resolve_device(common.device)
    corpus_classes = sorted(splits.loc[splits["role"] == "pretrain", "label"].unique())
    # Weights first: a missing ImageNet file must fail before any image is decoded.
    start = starting_weights(settings.init, settings.arch, len(corpus_classes))
    meta = CheckpointMeta(
        arch=settings.arch,
        classes=start.classes,
        image_size=common.image_size,
        mean=list(common.mean),
        std=list(common.std),
        epoch=0,
        metrics={},
        init=start.init,
        extra={"weights": start.provenance} if start.provenance else {},
    )
    if settings.epochs == 0:
        print(f"pretrain: passing {start.init[:40]} through untrained", file=sys.stderr)
        return TrainedModel(start.model, meta, FitOutcome([], None))
    data = training_data(
        splits,
        dataset,
        "pretrain",
        common,
        batch_size=settings.batch_size,
        augment=settings.augment,
    )
    model = start.model
    if start.init != "scratch":
        replace_head(model, len(data.classes))
    model.to(device)
    print(
        f"pretrain {settings.arch} from {start.init[:40]} on {len(data.train_set)} images "
        f"({len(data.classes)} classes), validating on {len(data.val_set)}, device {device}",
        file=sys.stderr,
    )
    with folded(model, common.image_size):  # VGG below 224 px: same training, less work
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
            speed=Speed(common.amp, common.channels_last),
            resume=resume / "pretrain.pt" if resume else None,
        )
    best = outcome.best
    assert best is not None  # fit runs at least one epoch
    metrics = {"val_accuracy": best.val_accuracy, "val_loss": best.val_loss}
    meta = replace(meta, classes=data.classes, epoch=best.epoch, metrics=metrics)
    return TrainedModel(model.cpu(), meta, outcome, {"pretrain": outcome.seconds})
