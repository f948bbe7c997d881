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
import torch
from torch import nn

from graft.config.params import Common, Finetune
from graft.data.loaders import TrainingData, make_loader, training_data
from graft.hashing import file_sha256
from graft.training.checkpoints import CheckpointMeta, model_from_checkpoint
from graft.training.folding import folded
from graft.training.head_inputs import FeatureBatches, cached_views
from graft.training.loop import (
    FitOutcome,
    Speed,
    TrainedModel,
    fit,
    resolve_device,
    seed_everything,
)
from graft.training.models import (
    build_model,
    head_module,
    replace_head,
    set_trainable,
    trainable_head,
)


def starting_model(
    backbone: Path | None, arch: str, num_classes: int
) -> tuple[nn.Module, str, str, dict[str, object]]:
    """The network to fine-tune, its architecture, where its weights came from, and their own
    provenance (the backbone checkpoint's ``init`` and weights record).

    With ``backbone`` None the same recipe starts from random ``arch`` weights: the baseline
    that shows what pretraining buys. Otherwise the architecture is the checkpoint's.
    """
    if backbone is None:
        return build_model(arch, num_classes), arch, "scratch", {}
    model, meta = model_from_checkpoint(backbone)
    replace_head(model, num_classes)
    lineage = {"backbone_init": meta.init, **meta.extra}
    return model, meta.arch, f"checkpoint:{file_sha256(backbone)}", lineage


def finetune(
    splits: pd.DataFrame,
    dataset: Path,
    settings: Finetune,
    common: Common,
    *,
    backbone: Path | None,
    arch: str,
    resume: Path | None = None,
) -> TrainedModel:
    """Two-phase fine-tuning on the target role; ``arch`` is used only when ``backbone`` is None.

    With ``resume`` (a folder), each phase keeps its per-epoch state there and continues from it.
    """
    seed_everything(common.seed)
    device = resolve_device(common.device)
    started = time.perf_counter()
    data: TrainingData = training_data(
        splits, dataset, "target", common, batch_size=settings.batch_size, augment=settings.augment
    )
    decoding = time.perf_counter() - started
    model, arch, init, lineage = starting_model(backbone, arch, len(data.classes))
    model.to(device)
    print(
        f"finetune {arch} from {init[:24]} on {len(data.train_set)} images "
        f"({len(data.classes)} classes), validating on {len(data.val_set)}",
        file=sys.stderr,
    )
    started = time.perf_counter()
    deeper = settings.unfreeze.blocks != 0 and settings.unfreeze.epochs > 0
    with folded(model, common.image_size):  # VGG below 224 px: same training, less work
        outcome = train_head(model, data, settings, common, device, resume)
        head_done = time.perf_counter()
        if deeper:
            outcome = train_deeper(model, data, settings, common, device, outcome, resume)
    finished = time.perf_counter()
    # Wall time per phase. Phase 1 is charged with decoding too (the textbook loop decodes
    # every epoch); the last phase with unfolding.
    seconds = {"head": decoding + (head_done if deeper else finished) - started}
    if deeper:
        seconds["unfreeze"] = finished - head_done
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
        extra={**lineage, "best_phase": best.phase},
    )
    return TrainedModel(model.cpu(), meta, outcome, seconds)


def train_head(
    model: nn.Module,
    data: TrainingData,
    settings: Finetune,
    common: Common,
    device: torch.device,
    resume: Path | None = None,
) -> FitOutcome:
    """Phase 1: the backbone frozen, the head trained on head inputs computed once per view.

    Equivalent to forwarding the frozen backbone every epoch in eval mode, without the cost.
    Views: 0 is one unaugmented pass; k > 0 is k augmented passes, one drawn per image per epoch.
    """
    head = trainable_head(model, settings.head.scope)
    set_trainable(model, 0, head=head)
    size = settings.batch_size
    if settings.head.views == 0:
        passes = [make_loader(data.train_set, common, batch_size=size)]
    else:
        augmented = make_loader(data.train_set, common, batch_size=size, augment=settings.augment)
        passes = [augmented] * settings.head.views  # each pass draws new augmentations
    train_features, train_targets = cached_views(model, head, passes, device)
    val_features, val_targets = cached_views(model, head, [data.val], device)
    return fit(
        head,
        [{"params": list(head.parameters()), "lr": settings.head.lr}],
        FeatureBatches(
            train_features, train_targets, size, torch.Generator().manual_seed(common.seed)
        ),
        FeatureBatches(val_features, val_targets, size),
        epochs=settings.head.epochs,
        patience=settings.patience,
        device=device,
        phase="head",
        speed=Speed(common.amp, common.channels_last),
        resume=resume / "head.pt" if resume else None,
    )


def train_deeper(
    model: nn.Module,
    data: TrainingData,
    settings: Finetune,
    common: Common,
    device: torch.device,
    head_only: FitOutcome,
    resume: Path | None = None,
) -> FitOutcome:
    """Phase 2: the deepest blocks unfrozen at a low learning rate, the head at its own.

    Returns both phases' history and the better best epoch; when no phase 2 epoch beats phase
    1's best, the model goes back to phase 1's weights.
    """
    head_only_state = copy.deepcopy(model.state_dict())
    phase2 = settings.unfreeze
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
        speed=Speed(common.amp, common.channels_last),
        resume=resume / "unfreeze.pt" if resume else None,
    )
    outcome = FitOutcome(
        head_only.history + deeper.history, head_only.best, head_only.seconds + deeper.seconds
    )
    if deeper.best is not None and deeper.best.beats(head_only.best):
        outcome.best = deeper.best
    else:
        model.load_state_dict(head_only_state)
    return outcome
