"""How training goes, epoch by epoch: each epoch's figures, the best epoch, early stopping."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pandas as pd
import torch
from torch import nn


@dataclass(frozen=True)
class EpochResult:
    """One epoch's figures: mean cross-entropy (nats per image) and accuracy (fraction correct)
    on the training batches as they were trained on, and on the validation set after it.

    ``epoch`` is counted across phases (1-based), so the curves of several phases join up;
    ``lr`` is the first parameter group's learning rate during the epoch.
    """

    phase: str
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float

    def beats(self, other: EpochResult | None) -> bool:
        """Whether this epoch is better than ``other`` (always, when ``other`` is None):
        higher validation accuracy wins; ties go to the lower validation loss."""
        if other is None:
            return True
        return (self.val_accuracy, -self.val_loss) > (other.val_accuracy, -other.val_loss)


@dataclass
class FitOutcome:
    """Every epoch's figures in order, the best epoch (None when none ran), and wall time."""

    history: list[EpochResult]
    best: EpochResult | None
    seconds: float = 0.0  # wall time; kept out of history and checkpoints, which must not vary


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of everything training can change in ``model``: trainable parameters and every
    buffer (BatchNorm statistics), by state-dict name, on the model's device.

    Frozen parameters are not in the optimizer, so they cannot change; skipping them makes
    keeping the best epoch cheap when a small part of a large network trains.
    """
    return {
        name: tensor.detach().clone()
        for name, tensor in model.state_dict(keep_vars=True).items()
        if not (isinstance(tensor, nn.Parameter) and not tensor.requires_grad)
    }


@dataclass
class EarlyStopping:
    """The bookkeeping that keeps the best epoch and stops after ``patience`` epochs without
    a better one.

    ``best_state`` is :func:`trainable_state` of the best epoch (before any epoch: of the
    starting weights); ``stale`` counts the epochs since the best one.
    """

    patience: int
    best_state: dict[str, torch.Tensor]
    history: list[EpochResult] = field(default_factory=list)
    best: EpochResult | None = None
    stale: int = 0

    def record(self, result: EpochResult, model: nn.Module) -> bool:
        """Add ``result``, the epoch ``model`` has just finished; keep ``model``'s weights when
        it is the best so far. Returns whether it was."""
        self.history.append(result)
        if not result.beats(self.best):
            self.stale += 1
            return False
        self.best, self.stale = result, 0
        self.best_state = trainable_state(model)
        return True

    @property
    def exhausted(self) -> bool:
        """Whether ``patience`` epochs in a row brought no better epoch: time to stop."""
        return self.stale >= self.patience


def history_table(history: list[EpochResult]) -> pd.DataFrame:
    """Per-epoch figures as a table, one row per epoch and one column per
    :class:`EpochResult` field (the stage's DVC plot)."""
    return pd.DataFrame(
        [asdict(result) for result in history], columns=list(EpochResult.__dataclass_fields__)
    )
