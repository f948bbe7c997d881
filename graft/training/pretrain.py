"""The ``pretrain`` stage's work: the backbone finetune starts from, trained on the corpus.

``pretrain.init`` says where its weights start (graft/training/weights.py): ``scratch`` is the
case where no public weights fit the domain and the network learns general features from a
larger labelled corpus (the ``pretrain`` source); ``imagenet`` or a checkpoint path start from
those weights and, with ``epochs`` > 0, go on training on the corpus (their last layer
replaced for its classes); with ``epochs: 0`` they are passed through unchanged, recorded with
their provenance.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from graft.config.params import Common, Pretrain
from graft.data.loaders import TrainingData, decoded_cache_folder, training_data
from graft.training.determinism import seeded
from graft.training.device import Speed, device_record, resolve_device
from graft.training.folding import folded, track_weight_decay
from graft.training.group import LOCAL, Group
from graft.training.history import EpochResult, FitOutcome
from graft.training.loop import fit
from graft.training.models import replace_head
from graft.training.trained import TrainedModel, checkpoint_meta
from graft.training.weights import StartingWeights, starting_weights


def pretrain(
    splits: pd.DataFrame,
    dataset: Path,
    settings: Pretrain,
    common: Common,
    *,
    resume: Path | None = None,
    after_epoch: Callable[[EpochResult], None] | None = None,
    decoded: Path | None = None,
    group: Group = LOCAL,
) -> TrainedModel:
    """Start ``settings.arch`` from ``settings.init`` and train it on the pretrain role.

    ``splits`` is the split table, ``dataset`` the ingested dataset's folder and ``decoded``
    the decoded-image cache (None: a temporary one for this call). With ``resume``
    (a folder) the per-epoch state is kept there and an interrupted run continues from it;
    ``after_epoch`` is called after every epoch (see :func:`graft.training.loop.fit`). Runs
    seeded with ``common.seed`` and leaves the caller's RNGs as they were. Returns the trained
    network on the CPU (the starting weights untrained with ``epochs: 0``) and its record.
    In a data-parallel ``group`` (graft.training.group) each rank trains on its shares and
    every rank returns the same weights.

    Raises WeightsError when the starting weights are missing or do not fit (before any image
    is decoded), and GraftError when the corpus's splits are empty.
    """
    with seeded(common.seed), decoded_cache_folder(decoded) as cache:
        device = resolve_device(common.device)
        corpus_classes = sorted(splits.loc[splits["role"] == "pretrain", "label"].unique())
        # Weights first: a missing ImageNet file must fail before any image is decoded.
        start = starting_weights(settings.init, settings.arch, len(corpus_classes))
        if settings.epochs == 0:
            group.say(f"pretrain: passing {start.init[:40]} through untrained")
            meta = checkpoint_meta(
                common,
                arch=settings.arch,
                classes=start.classes,
                init=start.init,
                best=None,
                extra=_weights_record(start),
            )
            return TrainedModel(start.model, meta, FitOutcome([], None))
        data = training_data(
            splits,
            dataset,
            cache,
            "pretrain",
            common,
            batch_size=settings.batch_size,
            augment=settings.augment,
            group=group,
        )
        return _train_on_corpus(start, data, settings, common, device, resume, after_epoch, group)


def _train_on_corpus(
    start: StartingWeights,
    data: TrainingData,
    settings: Pretrain,
    common: Common,
    device: torch.device,
    resume: Path | None,
    after_epoch: Callable[[EpochResult], None] | None,
    group: Group,
) -> TrainedModel:
    model = start.model
    if start.init != "scratch":
        replace_head(model, len(data.classes))
    model.to(device)
    group.say(
        f"pretrain {settings.arch} from {start.init[:40]} on {len(data.train_set)} images "
        f"({len(data.classes)} classes), validating on {len(data.val_set)}, device {device}"
        + (f", {group.world} processes" if group.distributed else "")
    )
    # VGG below 224 px: the same training, less work.
    with folded(model, common.image_size) as applied:
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
            after_epoch=after_epoch,
            on_optimizer=partial(track_weight_decay, model) if applied else None,
            group=group,
        )
    assert outcome.best is not None  # epochs > 0, so fit ran at least one
    meta = checkpoint_meta(
        common,
        arch=settings.arch,
        classes=data.classes,
        init=start.init,
        best=outcome.best,
        extra={**_weights_record(start), **group.record()},
    )
    return TrainedModel(
        model.cpu(), meta, outcome, {"pretrain": outcome.seconds}, device_record(device)
    )


def _weights_record(start: StartingWeights) -> dict[str, Any]:
    return {"weights": start.provenance} if start.provenance else {}
