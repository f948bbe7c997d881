"""What every training stage does around its training: resume state, outputs, clean-up.

``pretrain``, ``finetune`` and ``baseline`` differ only in how they train; each writes the same
outputs (checkpoint, per-epoch history, metrics) through :func:`run_training_stage`, and each
resumes an interrupted run from the state kept under ``paths.<stage>.resume``. In a
data-parallel group every rank trains and rank 0 alone writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from graft import atomic
from graft.config.params import TrainPaths
from graft.training.checkpoints import save_checkpoint
from graft.training.group import LOCAL, Group
from graft.training.history import history_table
from graft.training.resume import ResumeKey, clear, resume_folder
from graft.training.trained import TrainedModel


def write_outputs(out: TrainPaths, trained: TrainedModel) -> None:
    """Write ``trained``'s checkpoint, history table and metrics to ``out``'s paths, each
    atomically.

    Metrics are the best epoch's validation figures plus ``best_epoch``, and the device it
    trained on (``device``, ``device_name`` for CUDA; none when nothing trained). Raises
    OSError when a file cannot be written.
    """
    save_checkpoint(out.checkpoint, trained.model, trained.meta)
    atomic.write_csv(out.history, history_table(trained.outcome.history))
    metrics = {**trained.meta.metrics, "best_epoch": trained.meta.epoch, **trained.device}
    atomic.write_json(out.metrics, metrics)


def run_training_stage(
    stage: str,
    out: TrainPaths,
    key: ResumeKey,
    inputs: list[Path],
    train: Callable[[Path | None], TrainedModel],
    group: Group = LOCAL,
) -> TrainedModel:
    """Train with resume state keyed by ``key`` and ``inputs``, write the outputs, clean up.

    ``stage`` names the stage in the log; ``inputs`` are the files its result depends on.
    ``train`` receives the resume folder (None when ``out.resume`` is unset) and returns the
    trained model, which is returned too. The resume folder is deleted only after every output
    is written, so a run killed at any point before that resumes from its last finished epoch.
    In a data-parallel ``group`` only rank 0 writes (outputs and resume state) and clears.
    Raises what ``train`` raises, and OSError when an input cannot be read or an output written.
    """
    started = time.perf_counter()
    resume = resume_folder(out.resume, key, inputs) if out.resume else None
    trained = train(resume)
    if not group.is_writer:
        return trained
    write_outputs(out, trained)
    if out.resume:
        clear(out.resume)
    elapsed = time.perf_counter() - started
    group.say(f"{stage} done in {elapsed:.1f}s: {trained.meta.metrics}")
    return trained
