"""The state :func:`graft.training.loop.fit` saves after every epoch, so a killed run resumes.

A resumed run must end with the weights an uninterrupted one would have, so the state holds
everything an epoch changes: the weights that can train and every buffer, the optimizer, the
schedule, the gradient scaler, torch's global RNG (dropout, augmentation) and the training
batches' own generator (their order), and the early-stopping bookkeeping. It is saved as
plain tensors, dicts and lists, so ``torch.load(weights_only=True)`` reads it back.

In a data-parallel group everything but torch's global RNG is the same on every rank (the
batches' generator too: every rank draws the whole batch's order and augmentation), so rank
0's state serves all, with every rank's RNG state kept beside it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graft.atomic import atomic_path
from graft.training.group import LOCAL, Group
from graft.training.history import EarlyStopping, EpochResult, trainable_state


@dataclass(frozen=True)
class Optimisation:
    """What moves a model from epoch to epoch besides its weights.

    ``generator`` draws the training batches' order (a DataLoader's or FeatureBatches'), None
    when the batches have none (a fixed list).
    """

    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    generator: torch.Generator | None


@dataclass
class FitState:
    """Everything after a finished epoch that the next epoch depends on.

    ``model`` and ``best_state`` are :func:`~graft.training.history.trainable_state` dicts
    (name to tensor); ``torch_rng`` and ``generator`` are uint8 RNG states (``torch_rng``
    ``(world, n)``, one row per rank, in a data-parallel group: dropout draws differ by
    rank); ``stopped`` is set once no epoch is left to train (the last epoch ran, or early
    stopping fired).
    """

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    scaler: dict[str, Any]
    torch_rng: torch.Tensor
    generator: torch.Tensor | None
    history: list[EpochResult]
    best: EpochResult | None
    best_state: dict[str, torch.Tensor]
    stale: int
    stopped: bool

    @classmethod
    def capture(
        cls,
        model: nn.Module,
        optimisation: Optimisation,
        progress: EarlyStopping,
        stopped: bool,
        group: Group = LOCAL,
    ) -> FitState:
        """The state of ``model`` and ``optimisation`` now, with ``progress`` so far (every
        rank of a data-parallel ``group`` calls it: each gives its RNG state)."""
        generator = optimisation.generator
        rng = torch.get_rng_state()
        return cls(
            model=trainable_state(model),  # frozen weights cannot change: not saved
            optimizer=optimisation.optimizer.state_dict(),
            schedule=optimisation.schedule.state_dict(),
            scaler=optimisation.scaler.state_dict(),
            torch_rng=torch.stack(group.gather_objects(rng)) if group.distributed else rng,
            generator=generator.get_state() if generator is not None else None,
            history=list(progress.history),
            best=progress.best,
            best_state=progress.best_state,
            stale=progress.stale,
            stopped=stopped,
        )

    def restore(
        self, model: nn.Module, optimisation: Optimisation, patience: int, rank: int = 0
    ) -> EarlyStopping:
        """Put this state into ``model``, ``optimisation`` and torch's global RNG (``rank``'s,
        when it holds one per rank); return the early-stopping bookkeeping to continue with.

        Raises RuntimeError (from torch) when the state does not fit the model or optimizer.
        """
        model.load_state_dict(self.model, strict=False)
        optimisation.optimizer.load_state_dict(self.optimizer)
        optimisation.schedule.load_state_dict(self.schedule)
        optimisation.scaler.load_state_dict(self.scaler)
        rng = self.torch_rng
        # A row of the per-rank states is a view into their storage, which set_rng_state
        # does not handle (torch 2.14 crashes on it): hand it a tensor of its own.
        torch.set_rng_state(rng[rank].clone() if rng.dim() == 2 else rng)
        if optimisation.generator is not None:
            assert self.generator is not None  # the same batches, so the same kind of source
            optimisation.generator.set_state(self.generator)
        return EarlyStopping(patience, self.best_state, list(self.history), self.best, self.stale)

    def save(self, path: Path) -> None:
        """Write the state to ``path`` atomically, as plain data (EpochResults as dicts)."""
        payload = {
            "model": self.model,
            "optimizer": self.optimizer,
            "schedule": self.schedule,
            "scaler": self.scaler,
            "torch_rng": self.torch_rng,
            "generator": self.generator,
            "history": [asdict(row) for row in self.history],
            "best": asdict(self.best) if self.best else None,
            "best_state": self.best_state,
            "stale": self.stale,
            "stopped": self.stopped,
        }
        with atomic_path(path) as temporary:
            torch.save(payload, temporary)

    @classmethod
    def load(cls, path: Path) -> FitState:
        """Read a state :meth:`save` wrote, tensors on the CPU, without unpickling code.

        Raises OSError when ``path`` cannot be read, and pickle.UnpicklingError or KeyError
        when it holds something else.
        """
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return cls(
            model=saved["model"],
            optimizer=saved["optimizer"],
            schedule=saved["schedule"],
            scaler=saved["scaler"],
            torch_rng=saved["torch_rng"],
            generator=saved["generator"],
            history=[EpochResult(**row) for row in saved["history"]],
            best=EpochResult(**saved["best"]) if saved["best"] else None,
            best_state=saved["best_state"],
            stale=saved["stale"],
            stopped=saved["stopped"],
        )
