"""What a training core hands to its stage: the network, its checkpoint record, how it went."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from graft.config.params import Common
from graft.training.checkpoints import CheckpointMeta
from graft.training.history import EpochResult, FitOutcome


@dataclass(frozen=True)
class TrainedModel:
    """A trained network (on the CPU), the metadata its checkpoint records, how training went,
    the wall time of each phase in seconds (kept out of every output: it varies), and the
    device it trained on (graft.training.device.device_record; empty when nothing trained)."""

    model: nn.Module
    meta: CheckpointMeta
    outcome: FitOutcome
    seconds: dict[str, float] = field(default_factory=dict)
    device: dict[str, str] = field(default_factory=dict)


def checkpoint_meta(
    common: Common,
    *,
    arch: str,
    classes: list[str],
    init: str,
    best: EpochResult | None,
    extra: dict[str, Any],
) -> CheckpointMeta:
    """The checkpoint record of weights trained under ``common``'s input settings.

    ``best`` is the epoch whose weights are kept: its number and validation accuracy and loss
    are recorded; None (weights passed through untrained) records epoch 0 and no metrics.
    ``init`` and ``extra`` say where the starting weights came from (see CheckpointMeta).
    """
    metrics = {"val_accuracy": best.val_accuracy, "val_loss": best.val_loss} if best else {}
    return CheckpointMeta(
        arch=arch,
        classes=classes,
        image_size=common.image_size,
        mean=list(common.mean),
        std=list(common.std),
        epoch=best.epoch if best else 0,
        metrics=metrics,
        init=init,
        extra=extra,
    )
