"""The training loop shared by pretrain and finetune: seeded, early-stopped, best weights kept."""

from __future__ import annotations

import copy
import random
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from tasks.checkpoints import CheckpointMeta
from tasks.data import Batches


def seed_everything(seed: int) -> None:
    """Seed every RNG a run touches and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_device(setting: str) -> torch.device:
    if setting != "auto":
        return torch.device(setting)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class EpochResult:
    phase: str
    epoch: int  # counted across phases, so curves of several phases join up
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float

    def beats(self, other: EpochResult | None) -> bool:
        """Higher validation accuracy wins; ties go to the lower validation loss."""
        if other is None:
            return True
        return (self.val_accuracy, -self.val_loss) > (other.val_accuracy, -other.val_loss)


@dataclass
class FitOutcome:
    history: list[EpochResult]
    best: EpochResult | None


@dataclass(frozen=True)
class TrainedModel:
    """A trained network, the metadata its checkpoint records, and how training went."""

    model: nn.Module
    meta: CheckpointMeta
    outcome: FitOutcome


def _set_train_mode(model: nn.Module) -> None:
    # Frozen BatchNorm layers stay in eval mode: their running statistics belong to the
    # pretrained backbone and must not drift while only the head learns.
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in module.parameters()
        ):
            module.eval()


def measure(model: nn.Module, batches: Batches, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` over ``batches``."""
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    with torch.no_grad():
        for inputs, targets in batches:
            inputs, targets = inputs.to(device), targets.to(device)
            logits = model(inputs)
            loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            correct += int((logits.argmax(1) == targets).sum())
            seen += len(targets)
    return loss_sum / seen, correct / seen


def predict(model: nn.Module, batches: Batches, device: torch.device) -> torch.Tensor:
    """Class probabilities for every input, in loader order."""
    model.eval()
    outputs = []
    with torch.no_grad():
        for inputs, _ in batches:
            outputs.append(torch.softmax(model(inputs.to(device)), dim=1).cpu())
    return torch.cat(outputs)


def fit(
    model: nn.Module,
    param_groups: Iterable[dict[str, object]],
    train: Batches,
    val: Batches,
    *,
    epochs: int,
    patience: int,
    device: torch.device,
    phase: str,
    first_epoch: int = 1,
    weight_decay: float = 0.0,
) -> FitOutcome:
    """Train with AdamW and a cosine schedule; stop early; leave the best weights in ``model``.

    Only parameters in ``param_groups`` are optimised, so frozen weights carry no optimizer
    state. "Best" is decided by :meth:`EpochResult.beats`.
    """
    optimizer = torch.optim.AdamW(list(param_groups), weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    history: list[EpochResult] = []
    best: EpochResult | None = None
    best_state = copy.deepcopy(model.state_dict())
    stale = 0
    for offset in range(epochs):
        started = time.perf_counter()
        _set_train_mode(model)
        loss_sum, correct, seen = 0.0, 0, 0
        for inputs, targets in train:
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad(set_to_none=True)
            logits = model(inputs)
            loss = nn.functional.cross_entropy(logits, targets)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(targets)
            correct += int((logits.argmax(1) == targets).sum())
            seen += len(targets)
        lr = optimizer.param_groups[0]["lr"]
        schedule.step()
        val_loss, val_accuracy = measure(model, val, device)
        result = EpochResult(
            phase, first_epoch + offset, loss_sum / seen, correct / seen, val_loss, val_accuracy, lr
        )
        history.append(result)
        improved = result.beats(best)
        if improved:
            best, stale = result, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        print(
            f"{phase} epoch {result.epoch}: train loss {result.train_loss:.4f} "
            f"acc {result.train_accuracy:.3f} | val loss {val_loss:.4f} acc {val_accuracy:.3f}"
            f"{' *' if improved else ''} ({time.perf_counter() - started:.1f}s)",
            file=sys.stderr,
            flush=True,
        )
        if stale >= patience:
            print(f"{phase}: no improvement for {patience} epochs, stopping", file=sys.stderr)
            break
    model.load_state_dict(best_state)
    return FitOutcome(history, best)


def history_table(history: list[EpochResult]) -> pd.DataFrame:
    """Per-epoch figures as a table (the stage's DVC plot)."""
    return pd.DataFrame(
        [asdict(result) for result in history], columns=list(EpochResult.__dataclass_fields__)
    )
