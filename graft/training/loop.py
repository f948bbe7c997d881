"""The training loop shared by pretrain and finetune: early-stopped, best weights kept, resumable.

:func:`fit` runs epochs of :func:`train_epoch` and :func:`measure`, keeps the best epoch with
:class:`~graft.training.history.EarlyStopping`, and saves a
:class:`~graft.training.fit_state.FitState` after every epoch when asked to. It seeds nothing
and sets no process-wide switch: callers seed (``graft.training.determinism.seeded``).

In a data-parallel group (graft.training.group) every rank runs :func:`fit` on its shares of
the batches with the model wrapped in DistributedDataParallel; the epoch's figures are summed
over the ranks, so every rank takes the same early-stopping and best-epoch decisions, and
rank 0 alone logs and saves the state.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from graft.training.device import DEFAULT_SPEED, Pairs, Speed, Tally
from graft.training.fit_state import FitState, Optimisation
from graft.training.group import LOCAL, Group
from graft.training.history import EarlyStopping, EpochResult, FitOutcome, trainable_state


def set_train_mode(model: nn.Module) -> None:
    """Put ``model`` in training mode, except BatchNorm layers whose parameters are frozen.

    Their running statistics belong to the pretrained backbone and must not drift while only
    the head learns.
    """
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in module.parameters()
        ):
            module.eval()


Combine = Callable[[torch.Tensor], torch.Tensor] | None  # see Tally.means


def train_epoch(
    model: nn.Module,
    batches: Pairs,
    optimisation: Optimisation,
    device: torch.device,
    speed: Speed = DEFAULT_SPEED,
    combine: Combine = None,
) -> tuple[float, float]:
    """One pass of ``optimisation`` over ``batches``, one optimizer step per batch; returns the
    mean cross-entropy (nats per image) and accuracy (fraction) of the batches as trained on
    (over every rank when ``combine`` sums a group's figures, see :meth:`Tally.means`).

    The schedule is not stepped: that is once per epoch, the caller's.
    """
    optimizer, scaler = optimisation.optimizer, optimisation.scaler
    set_train_mode(model)
    tally = Tally(device)
    for inputs, targets in batches:
        targets = targets.to(device)
        optimizer.zero_grad(set_to_none=True)
        with speed.autocast(device):
            logits = model(speed.inputs(inputs, device))
            loss = nn.functional.cross_entropy(logits, targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        tally.add(loss * len(targets), logits, targets)
    return tally.means(combine)


def measure(
    model: nn.Module,
    batches: Pairs,
    device: torch.device,
    speed: Speed = DEFAULT_SPEED,
    combine: Combine = None,
) -> tuple[float, float]:
    """Mean cross-entropy (nats per image) and accuracy (fraction) of ``model`` in eval mode
    over ``batches`` (over every rank with ``combine``, as :func:`train_epoch`); logits are
    compared in float32 even under amp."""
    model.eval()
    tally = Tally(device)
    with torch.no_grad():
        for inputs, targets in batches:
            targets = targets.to(device)
            with speed.autocast(device):
                logits = model(speed.inputs(inputs, device)).float()
            tally.add(
                nn.functional.cross_entropy(logits, targets, reduction="sum"), logits, targets
            )
    return tally.means(combine)


def predict(model: nn.Module, batches: Pairs, device: torch.device) -> torch.Tensor:
    """Class probabilities of ``model`` in eval mode for every input, in batch order: float32
    ``(N, classes)`` on the CPU, rows summing to 1. Targets in ``batches`` are ignored."""
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
    speed: Speed = DEFAULT_SPEED,
    resume: Path | None = None,
    after_epoch: Callable[[EpochResult], None] | None = None,
    on_optimizer: Callable[[torch.optim.Optimizer], None] | None = None,
    group: Group = LOCAL,
    replicated: bool = False,
) -> FitOutcome:
    """Train with AdamW and a cosine schedule; stop early; leave the best weights in ``model``.

    Only parameters in ``param_groups`` (AdamW groups: ``params`` and ``lr``) are optimised,
    so frozen weights carry no optimizer state. "Best" is decided by
    :meth:`EpochResult.beats`; training stops after ``patience`` epochs without a better one.
    ``first_epoch`` numbers the epochs (it continues an earlier phase's count).

    With ``resume`` (a file), the :class:`FitState` after every epoch is saved there, and a
    run that finds it continues from it: the same result as an uninterrupted run, also when
    the saved run had finished. ``on_optimizer`` is called with the optimizer as soon as it is
    built (folding uses it to track weight decay); ``after_epoch`` with every epoch's result,
    after its state is saved, and may raise (:class:`Interrupted`) to stop as a crash would.
    Returns every epoch's figures and the best one.

    In a data-parallel ``group``, ``train`` and ``val`` are this rank's shares and ``model`` is
    trained wrapped in DistributedDataParallel; with ``replicated``, every rank holds all the
    batches and trains the same copy instead (phase 1's small head), and the figures and final
    weights are rank 0's. Rank 0 reads and writes ``resume``; the others receive its state.
    """
    fit_started = time.perf_counter()
    if speed.channels_last:
        model.to(memory_format=torch.channels_last)
    optimisation = _optimisation(
        param_groups, train, epochs, weight_decay, device, speed, on_optimizer
    )
    progress, stopped = _start(model, optimisation, patience, resume, phase, group)
    trainer = model if replicated else group.wrap(model)
    sharing = _Sharing(group, replicated)
    for offset in range(len(progress.history), 0 if stopped else epochs):
        started = time.perf_counter()
        result = _epoch(
            (model, trainer), (train, val), optimisation, device, speed, sharing,
            phase, first_epoch + offset,
        )  # fmt: skip
        improved = progress.record(result, model)
        if group.is_writer:
            _report(result, improved, time.perf_counter() - started)
        if resume is not None:
            finished = progress.exhausted or offset + 1 == epochs
            state = FitState.capture(model, optimisation, progress, finished, group)
            if group.is_writer:
                state.save(resume)
        if after_epoch is not None:
            after_epoch(result)
        if progress.exhausted:
            group.say(f"{phase}: no improvement for {patience} epochs, stopping")
            break
    del trainer  # DistributedDataParallel's hooks go with it
    model.load_state_dict(progress.best_state, strict=False)
    if replicated:
        group.align(model)  # the copies are equal by construction; this makes it certain
    return FitOutcome(progress.history, progress.best, time.perf_counter() - fit_started)


def _start(
    model: nn.Module,
    optimisation: Optimisation,
    patience: int,
    resume: Path | None,
    phase: str,
    group: Group,
) -> tuple[EarlyStopping, bool]:
    # Fresh bookkeeping, or the saved state's (restored into the model and optimisation too),
    # and whether the saved run had already finished. Rank 0 reads it; every rank gets it.
    saved = None
    if group.is_writer and resume is not None and resume.is_file():
        saved = FitState.load(resume)
    saved = group.object_from_writer(saved)
    if saved is None:
        return EarlyStopping(patience, trainable_state(model)), False
    progress = saved.restore(model, optimisation, patience, group.rank)
    group.say(f"{phase}: resuming after epoch {len(progress.history)} from {resume}")
    return progress, saved.stopped


class _Sharing:
    """How the ranks of ``group`` share an epoch's figures: summed over their shares of the
    batches, or (``replicated``) all equal to rank 0's. One process: kept as they are."""

    def __init__(self, group: Group, replicated: bool) -> None:
        self.group, self.replicated = group, replicated

    @property
    def combine(self) -> Combine:
        if not self.group.distributed:
            return None
        return self.group.from_writer if self.replicated else self.group.total

    def before_measuring(self, model: nn.Module) -> None:
        # Each rank's BatchNorm running statistics last moved with its own share of a batch:
        # validate every rank with rank 0's, the ones its checkpoint will hold.
        if not self.replicated:
            self.group.align(model, buffers_only=True)


def _optimisation(
    param_groups: Iterable[dict[str, object]],
    train: Pairs,
    epochs: int,
    weight_decay: float,
    device: torch.device,
    speed: Speed,
    on_optimizer: Callable[[torch.optim.Optimizer], None] | None,
) -> Optimisation:
    # The fused kernel updates all parameters in one pass: for a large head such as VGG's
    # 120M-parameter classifier the optimizer step is otherwise as slow as the forward pass.
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(list(param_groups), weight_decay=weight_decay, fused=fused)
    if on_optimizer is not None:
        on_optimizer(optimizer)
    return Optimisation(
        optimizer,
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs),
        torch.amp.GradScaler(device.type, enabled=speed.uses_amp(device)),
        getattr(train, "generator", None),
    )


def _epoch(
    models: tuple[nn.Module, nn.Module],
    batches: tuple[Pairs, Pairs],
    optimisation: Optimisation,
    device: torch.device,
    speed: Speed,
    sharing: _Sharing,
    phase: str,
    epoch: int,
) -> EpochResult:
    model, trainer = models  # the network, and the same wrapped for data-parallel training
    train, val = batches
    combine = sharing.combine
    train_loss, train_accuracy = train_epoch(trainer, train, optimisation, device, speed, combine)
    lr = optimisation.optimizer.param_groups[0]["lr"]  # the rate this epoch trained at
    optimisation.schedule.step()
    sharing.before_measuring(model)
    val_loss, val_accuracy = measure(model, val, device, speed, combine)
    return EpochResult(phase, epoch, train_loss, train_accuracy, val_loss, val_accuracy, lr)


def _report(result: EpochResult, improved: bool, seconds: float) -> None:
    print(
        f"{result.phase} epoch {result.epoch}: train loss {result.train_loss:.4f} "
        f"acc {result.train_accuracy:.3f} | val loss {result.val_loss:.4f} "
        f"acc {result.val_accuracy:.3f}{' *' if improved else ''} ({seconds:.1f}s)",
        file=sys.stderr,
        flush=True,
    )
