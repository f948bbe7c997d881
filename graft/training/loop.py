"""The training loop shared by pretrain and finetune: seeded, early-stopped, best weights kept."""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from graft.atomic import atomic_path
from graft.training.checkpoints import CheckpointMeta
from graft.training.folding import track_weight_decay

# Any re-iterable source of (inputs, targets) batches: a DataLoader, or cached features.
Pairs = Iterable[tuple[torch.Tensor, torch.Tensor]]


def seed_everything(seed: int) -> None:
    """Seed every RNG a run touches and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # cuBLAS is deterministic only with a fixed workspace, set before its first use.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
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
    seconds: float = 0.0  # wall time; kept out of history and checkpoints, which must not vary


@dataclass(frozen=True)
class TrainedModel:
    """A trained network, the metadata its checkpoint records, and how training went."""

    model: nn.Module
    meta: CheckpointMeta
    outcome: FitOutcome
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each phase


def _set_train_mode(model: nn.Module) -> None:
    # Frozen BatchNorm layers stay in eval mode: their running statistics belong to the
    # pretrained backbone and must not drift while only the head learns.
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in module.parameters()
        ):
            module.eval()


@dataclass(frozen=True)
class Speed:
    """Device options that change speed, not the maths (beyond float16 rounding with amp)."""

    amp: bool = False  # float16 autocast + gradient scaling; honoured on CUDA only
    channels_last: bool = False

    def inputs(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        tensor = tensor.to(device, non_blocking=True)
        if self.channels_last and tensor.dim() == 4:
            return tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    def autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, torch.float16, enabled=self.uses_amp(device))

    def uses_amp(self, device: torch.device) -> bool:
        return self.amp and device.type == "cuda"


class _Tally:
    """Summed loss and correct predictions, kept on the device and read once per pass: each
    read waits for the GPU, so reading per batch would stall it every step."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen = 0

    def add(self, loss_sum: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.loss += loss_sum.detach().float()
        self.correct += (logits.argmax(1) == targets).sum()
        self.seen += len(targets)

    def means(self) -> tuple[float, float]:
        """Mean loss and accuracy."""
        return float(self.loss) / self.seen, int(self.correct) / self.seen


def measure(
    model: nn.Module, batches: Pairs, device: torch.device, speed: Speed = Speed()
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` over ``batches``."""
    model.eval()
    tally = _Tally(device)
    with torch.no_grad():
        for inputs, targets in batches:
            targets = targets.to(device)
            with speed.autocast(device):
                logits = model(speed.inputs(inputs, device)).float()
            tally.add(
                nn.functional.cross_entropy(logits, targets, reduction="sum"), logits, targets
            )
    return tally.means()


def predict(model: nn.Module, batches: Pairs, device: torch.device) -> torch.Tensor:
    """Class probabilities for every input, in loader order."""
    model.eval()
    outputs = []
    with torch.no_grad():
        for inputs, _ in batches:
            outputs.append(torch.softmax(model(inputs.to(device)), dim=1).cpu())
    return torch.cat(outputs)


class Interrupted(Exception):
    """Raised by an ``after_epoch`` hook to stop training as a crash would (tests)."""


def fit(
    model: nn.Module,
    param_groups: Iterable[dict[str, object]],
    train: Pairs,
    val: Pairs,
    *,
    epochs: int,
    patience: int,
    device: torch.device,
    phase: str,
    first_epoch: int = 1,
    weight_decay: float = 0.0,
    speed: Speed = Speed(),
    resume: Path | None = None,
    after_epoch: Callable[[EpochResult], None] | None = None,
) -> FitOutcome:
    """Train with AdamW and a cosine schedule; stop early; leave the best weights in ``model``.

    Only parameters in ``param_groups`` are optimised, so frozen weights carry no optimizer
    state. "Best" is decided by :meth:`EpochResult.beats`. With ``resume``, the state after
    every epoch is saved there, and a run that finds it continues from it: the same result
    as an uninterrupted run (the RNGs and the data order are restored too).
    """
    fit_started = time.perf_counter()
    if speed.channels_last:
        model.to(memory_format=torch.channels_last)
    # The fused kernel updates all parameters in one pass: for a large head such as VGG's
    # 120M-parameter classifier the optimizer step is otherwise as slow as the forward pass.
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(list(param_groups), weight_decay=weight_decay, fused=fused)
    track_weight_decay(model, optimizer)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=speed.uses_amp(device))
    generator: torch.Generator | None = getattr(train, "generator", None)
    history: list[EpochResult] = []
    best: EpochResult | None = None
    best_state = _snapshot(model)
    stale = 0
    if resume is not None and resume.is_file():
        saved = torch.load(resume, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["torch_rng"])
        if generator is not None:
            generator.set_state(saved["generator"])
        history = [EpochResult(**row) for row in saved["history"]]
        best = EpochResult(**saved["best"]) if saved["best"] else None
        best_state, stale = saved["best_state"], saved["stale"]
        print(f"{phase}: resuming after epoch {len(history)} from {resume}", file=sys.stderr)
    stopped = resume is not None and resume.is_file() and saved["stopped"]
    for offset in range(len(history), 0 if stopped else epochs):
        started = time.perf_counter()
        _set_train_mode(model)
        tally = _Tally(device)
        for inputs, targets in train:
            targets = targets.to(device)
            optimizer.zero_grad(set_to_none=True)
            with speed.autocast(device):
                logits = model(speed.inputs(inputs, device))
                loss = nn.functional.cross_entropy(logits, targets)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            tally.add(loss * len(targets), logits, targets)
        lr = optimizer.param_groups[0]["lr"]
        schedule.step()
        val_loss, val_accuracy = measure(model, val, device, speed)
        train_loss, train_accuracy = tally.means()
        result = EpochResult(
            phase, first_epoch + offset, train_loss, train_accuracy, val_loss, val_accuracy, lr
        )
        history.append(result)
        improved = result.beats(best)
        if improved:
            best, stale = result, 0
            best_state = _snapshot(model)
        else:
            stale += 1
        print(
            f"{phase} epoch {result.epoch}: train loss {result.train_loss:.4f} "
            f"acc {result.train_accuracy:.3f} | val loss {val_loss:.4f} acc {val_accuracy:.3f}"
            f"{' *' if improved else ''} ({time.perf_counter() - started:.1f}s)",
            file=sys.stderr,
            flush=True,
        )
        stop = stale >= patience
        if resume is not None:
            state = {
                "model": _snapshot(model),  # frozen weights cannot change: not saved
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "generator": generator.get_state() if generator is not None else None,
                "history": [asdict(row) for row in history],
                "best": asdict(best) if best else None,
                "best_state": best_state,
                "stale": stale,
                "stopped": stop or offset + 1 == epochs,
            }
            with atomic_path(resume) as temporary:
                torch.save(state, temporary)
        if after_epoch is not None:
            after_epoch(result)
        if stop:
            print(f"{phase}: no improvement for {patience} epochs, stopping", file=sys.stderr)
            break
    model.load_state_dict(best_state, strict=False)
    return FitOutcome(history, best, time.perf_counter() - fit_started)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of everything ``fit`` can change: trainable parameters and every buffer.

    Frozen parameters are not in the optimizer, so they cannot change; skipping them makes
    keeping the best epoch cheap when a small part of a large network trains.
    """
    return {
        name: tensor.detach().clone()
        for name, tensor in model.state_dict(keep_vars=True).items()
        if not (isinstance(tensor, nn.Parameter) and not tensor.requires_grad)
    }


def history_table(history: list[EpochResult]) -> pd.DataFrame:
    """Per-epoch figures as a table (the stage's DVC plot)."""
    return pd.DataFrame(
        [asdict(result) for result in history], columns=list(EpochResult.__dataclass_fields__)
    )
