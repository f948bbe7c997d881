"""The ``finetune`` stage's work: graft the pretrained backbone onto a head for the target classes.

Phase 1 freezes the backbone and trains the head, whose last linear layer is replaced for the
target classes. Phase 2 unfreezes the deepest backbone blocks and trains on at a much lower
learning rate, so the transferred features adapt without being destroyed. The best weights by
validation accuracy over both phases are kept.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from graft.config.params import Common, Finetune
from graft.data.loaders import TrainingData, decoded_cache_folder, make_loader, training_data
from graft.training.checkpoints import CheckpointMeta
from graft.training.determinism import seeded
from graft.training.device import Speed, device_record, resolve_device
from graft.training.folding import folded, track_weight_decay
from graft.training.group import LOCAL, Group
from graft.training.head_inputs import FeatureBatches, cached_views
from graft.training.history import EpochResult, FitOutcome
from graft.training.loop import fit
from graft.training.models import head_module, set_trainable, trainable_head
from graft.training.trained import TrainedModel, checkpoint_meta
from graft.training.weights import StartingWeights, backbone_weights

AfterEpoch = Callable[[EpochResult], None]


@dataclass(frozen=True)
class PhaseHooks:
    """What each phase's :func:`~graft.training.loop.fit` calls back: ``after_epoch`` with
    every epoch's result, ``on_optimizer`` with its optimizer once built (folding's weight
    decay tracking); and the data-parallel ``group`` the phase trains in."""

    after_epoch: AfterEpoch | None = None
    on_optimizer: Callable[[torch.optim.Optimizer], None] | None = None
    group: Group = LOCAL


def finetune(
    splits: pd.DataFrame,
    dataset: Path,
    settings: Finetune,
    common: Common,
    *,
    backbone: Path | None,
    arch: str,
    resume: Path | None = None,
    after_epoch: AfterEpoch | None = None,
    decoded: Path | None = None,
    group: Group = LOCAL,
) -> TrainedModel:
    """Two-phase fine-tuning of the ``backbone`` checkpoint on the target role.

    Images come from the ingested ``dataset`` folder through the decoded-image cache
    ``decoded`` (None: a temporary one for this call).

    With ``backbone`` None it is the baseline: the same recipe from random ``arch`` weights
    (``arch`` is used only then; otherwise the architecture is the checkpoint's). With
    ``resume`` (a folder), each phase keeps its per-epoch state there and continues from it;
    ``after_epoch`` is called after every epoch of both phases (see
    :func:`graft.training.loop.fit`). Runs seeded with ``common.seed`` and leaves the
    caller's RNGs as they were. Returns the network with the best weights of both phases, on
    the CPU, with its record (``extra``: the backbone's lineage and ``best_phase``) and the wall
    time of each phase in seconds. In a data-parallel ``group`` (graft.training.group) each
    rank trains on its shares and every rank returns the same weights.

    Raises CheckpointError when the backbone checkpoint is missing or does not fit, GraftError
    when a target split is empty, and ModelError when the network cannot be frozen by blocks.
    """
    with seeded(common.seed), decoded_cache_folder(decoded) as cache:
        device = resolve_device(common.device)
        started = time.perf_counter()
        data = training_data(
            splits,
            dataset,
            cache,
            "target",
            common,
            batch_size=settings.batch_size,
            augment=settings.augment,
            group=group,
        )
        decoding = time.perf_counter() - started
        start = backbone_weights(backbone, arch, len(data.classes))
        model = start.model
        model.to(device)
        group.say(
            f"finetune {start.arch} from {start.init[:24]} on {len(data.train_set)} images "
            f"({len(data.classes)} classes), validating on {len(data.val_set)}"
            + (f", {group.world} processes" if group.distributed else "")
        )
        hooks = PhaseHooks(after_epoch, group=group)
        outcome, seconds = _train_phases(model, data, settings, common, device, resume, hooks)
        # Phase 1 is charged with decoding too: the textbook loop decodes every epoch.
        seconds["head"] += decoding
        meta = _finetuned_meta(start, data.classes, common, outcome, group)
        return TrainedModel(model.cpu(), meta, outcome, seconds, device_record(device))


def _finetuned_meta(
    start: StartingWeights, classes: list[str], common: Common, outcome: FitOutcome, group: Group
) -> CheckpointMeta:
    best = outcome.best
    assert best is not None  # the head phase runs at least one epoch
    # A fine-tuned checkpoint carries its backbone's own record of where its weights came from.
    source = start.source
    lineage = {"backbone_init": source.init, **source.extra} if source else {}
    return checkpoint_meta(
        common,
        arch=start.arch,
        classes=classes,
        init=start.init,
        best=best,
        extra={**lineage, "best_phase": best.phase, **group.record()},
    )


def _train_phases(
    model: nn.Module,
    data: TrainingData,
    settings: Finetune,
    common: Common,
    device: torch.device,
    resume: Path | None,
    hooks: PhaseHooks,
) -> tuple[FitOutcome, dict[str, float]]:
    """Both phases, folded where it applies; the outcome and each phase's wall time."""
    started = time.perf_counter()
    deeper = settings.unfreeze.blocks != 0 and settings.unfreeze.epochs > 0
    # VGG below 224 px: the same training, less work.
    with folded(model, common.image_size) as applied:
        if applied:
            hooks = replace(hooks, on_optimizer=partial(track_weight_decay, model))
        outcome = train_head(model, data, settings, common, device, resume, hooks)
        head_done = time.perf_counter()
        if deeper:
            outcome = train_deeper(model, data, settings, common, device, outcome, resume, hooks)
    finished = time.perf_counter()
    # The last phase is charged with unfolding.
    seconds = {"head": (head_done if deeper else finished) - started}
    if deeper:
        seconds["unfreeze"] = finished - head_done
    return outcome, seconds


def train_head(
    model: nn.Module,
    data: TrainingData,
    settings: Finetune,
    common: Common,
    device: torch.device,
    resume: Path | None = None,
    hooks: PhaseHooks = PhaseHooks(),
) -> FitOutcome:
    """Phase 1: the backbone frozen, the head trained on head inputs computed once per view.

    Equivalent to forwarding the frozen backbone every epoch in eval mode, without the cost.
    Views: 0 is one unaugmented pass; k > 0 is k augmented passes, one drawn per image per epoch.
    ``model`` is on ``device``; its state after the phase goes to ``resume``/head.pt when
    ``resume`` (a folder) is given. Returns the phase's outcome, with its best weights left in
    ``model``. Raises ModelError when the network's forward never reaches its head.

    In a data-parallel group each rank computes the head inputs of its shares, which are then
    gathered, and every rank trains the same head on all of them: the head is small, the
    backbone passes were the cost.
    """
    group = hooks.group
    head = trainable_head(model, settings.head.scope)
    set_trainable(model, 0, head=head)
    size = settings.batch_size
    if settings.head.views == 0:
        passes = [make_loader(data.train_set, common, batch_size=size, group=group)]
    else:
        augmented = make_loader(
            data.train_set, common, batch_size=size, augment=settings.augment, group=group
        )
        passes = [augmented] * settings.head.views  # each pass draws new augmentations
    train_features, train_targets = _gathered(
        group, passes[0].shares(), *cached_views(model, head, passes, device)
    )
    val_features, val_targets = _gathered(
        group, data.val.shares(), *cached_views(model, head, [data.val], device)
    )
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
        after_epoch=hooks.after_epoch,
        on_optimizer=hooks.on_optimizer,
        group=group,
        replicated=True,
    )


def _gathered(
    group: Group, shares: list[torch.Tensor], features: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's cached head inputs ``(views, n_r, ...)`` and targets ``(n_r,)``, put
    together in image order: ``(views, N, ...)`` and ``(N,)``. One process: as they are."""
    if not group.distributed:
        return features, targets
    by_image = group.gather_rows(features.movedim(1, 0).contiguous(), shares)
    return by_image.movedim(0, 1).contiguous(), group.gather_rows(targets, shares)


def train_deeper(
    model: nn.Module,
    data: TrainingData,
    settings: Finetune,
    common: Common,
    device: torch.device,
    head_only: FitOutcome,
    resume: Path | None = None,
    hooks: PhaseHooks = PhaseHooks(),
) -> FitOutcome:
    """Phase 2: the deepest blocks unfrozen at a low learning rate, the head at its own.

    ``head_only`` is phase 1's outcome; the phase's state goes to ``resume``/unfreeze.pt when
    ``resume`` (a folder) is given. Returns both phases' history and the better best epoch;
    when no phase 2 epoch beats phase 1's best, the model goes back to phase 1's weights.
    Raises ModelError when the network cannot be split into blocks.
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
        after_epoch=hooks.after_epoch,
        on_optimizer=hooks.on_optimizer,
        group=hooks.group,
    )
    outcome = FitOutcome(
        head_only.history + deeper.history, head_only.best, head_only.seconds + deeper.seconds
    )
    if deeper.best is not None and deeper.best.beats(head_only.best):
        outcome.best = deeper.best
    else:
        model.load_state_dict(head_only_state)
    return outcome
