"""Predictions for new image files: verified as ingest verifies, preprocessed as in training.

Each input file is read once in a worker process under ingest's memory and time budget
(graft.data.budget), judged by ingest's check and, when accepted, decoded by that same decode
into the model's input pixels (graft.data.image_check.decode_checked: EXIF rotation, mode
rule, whole-image bilinear resize). The main process gathers accepted images into batches and
runs the network on the chosen device with the checkpoint's own normalisation
(graft.data.augment.BatchTransform, as evaluate uses it). Rows come out in input order; a file
that cannot be used gets its verdict and no prediction, and the run goes on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from graft.data.augment import BatchTransform
from graft.data.budget import Budget, map_budgeted
from graft.data.decoding import configure_pillow
from graft.data.sources import SourceFile, display_name, files_under
from graft.data.verify import FileRecord, default_workers, lost_record
from graft.errors import GraftError
from graft.inference.decode_worker import DecodeTask, check_and_decode
from graft.inference.model_source import ModelSource
from graft.inference.records import Prediction
from graft.progress import Progress
from graft.training.device import resolve_device
from graft.training.loop import predict


class InputError(GraftError):
    """An input path that does not exist or cannot be listed."""


@dataclass(frozen=True)
class Inputs:
    """The files to predict, in the order the paths were given, a folder's files at any depth
    in its place (hidden and system files skipped and counted in ``skipped``). ``path`` of
    each :class:`SourceFile` is the OS path; ``relative`` the path as rows show it."""

    files: list[SourceFile]
    skipped: int


def gather_inputs(paths: Sequence[Path]) -> Inputs:
    """The image files ``paths`` name: files as given, folders walked recursively in a stable
    order (graft.data.sources.files_under). Rows show each file's path as given or joined to
    its folder as given. Raises InputError, naming the path, when one does not exist or a
    folder cannot be listed; nothing is read before every path is checked."""
    files: list[SourceFile] = []
    skipped = 0
    for path in paths:
        if path.is_dir():
            try:
                found, passed = files_under(path)
            except OSError as error:
                raise InputError(f"input folder {path} cannot be listed: {error}") from None
            prefix = display_name(path).rstrip("/")
            files += [f._replace(relative=f"{prefix}/{f.relative}") for f in found]
            skipped += sum(passed.values())
        elif path.exists() or path.is_symlink():
            files.append(SourceFile(os.path.abspath(path), display_name(path), ""))
        else:
            raise InputError(f"input {path} does not exist")
    return Inputs(files, skipped)


@dataclass(frozen=True)
class PredictOptions:
    """How to predict: ``batch_size`` images per forward pass, ``top_k`` ranked classes per row
    (at most the model's classes), ``workers`` decoding processes (0: half the cores when the
    network runs on the CPU, every core otherwise) and ``device`` as ``common.device`` names
    one (``auto``: CUDA, then MPS, then the CPU)."""

    batch_size: int = 256
    top_k: int = 3
    workers: int = 0
    device: str = "auto"


def check_options(options: PredictOptions) -> None:
    """Raise GraftError, naming the option, for a value no run could use: sizes below 1, a
    device torch cannot parse or this machine lacks."""
    for name in ("batch_size", "top_k"):
        if getattr(options, name) < 1:
            raise GraftError(f"--{name.replace('_', '-')} must be at least 1")
    if options.workers < 0:
        raise GraftError("--workers must be 0 (one per core) or more")
    try:
        device = resolve_device(options.device)
    except RuntimeError as error:
        raise GraftError(f"--device {options.device!r}: {error}") from None
    missing = (device.type == "cuda" and not torch.cuda.is_available()) or (
        device.type == "mps" and not torch.backends.mps.is_available()
    )
    if missing:
        raise GraftError(
            f"--device {options.device}: no {device.type} device here; try auto or cpu"
        )


def predict_files(
    model: nn.Module, source: ModelSource, files: Sequence[SourceFile], options: PredictOptions
) -> Iterator[Prediction]:
    """One :class:`Prediction` per file of ``files``, in their order, by ``model`` (whose
    metadata is ``source.meta``) under ``source.settings``' verification limits. Shows
    progress on a terminal and as periodic lines otherwise (standard error). Stopping early
    (closing the iterator, an exception, Ctrl-C) stops every worker process.

    On the CPU the network and the decoding processes share the cores: without ``workers``
    set, half the cores decode, and torch runs on the others for the duration (oversubscribed
    cores made torch's threads spin: a single image took 30 times as long on 2 cores)."""
    device = resolve_device(options.device)
    workers = min(options.workers or _default_workers(device), max(1, len(files)))
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(threads, default_workers() - workers)))
    try:
        yield from _predict(model.to(device).eval(), source, files, options, device, workers)
    finally:
        torch.set_num_threads(threads)


def _default_workers(device: torch.device) -> int:
    cores = default_workers()
    return cores if device.type != "cpu" else max(1, cores // 2)


def _predict(
    model: nn.Module,
    source: ModelSource,
    files: Sequence[SourceFile],
    options: PredictOptions,
    device: torch.device,
    workers: int,
) -> Iterator[Prediction]:
    meta, settings = source.meta, source.settings
    transform = BatchTransform(tuple(meta.mean), tuple(meta.std), None)
    top_k = min(options.top_k, len(meta.classes))
    tasks = [DecodeTask(file, settings, meta.image_size) for file in files]
    budget = Budget(settings.decode_memory_mb, settings.decode_timeout_s)
    done: dict[int, Prediction] = {}
    waiting: list[tuple[int, FileRecord, np.ndarray]] = []  # accepted, not yet predicted
    following = 0  # the first index not yet handed out

    def run_batch() -> None:
        pixels = torch.from_numpy(np.stack([p for _, _, p in waiting])).permute(0, 3, 1, 2)
        inputs = transform(pixels.to(device))
        probabilities = predict(model, [(inputs, inputs)], device)
        values, indices = probabilities.topk(top_k, dim=1)
        for (index, record, _), row_p, row_i in zip(
            waiting, values.tolist(), indices.tolist(), strict=True
        ):
            top = tuple((meta.classes[i], p) for i, p in zip(row_i, row_p, strict=True))
            done[index] = Prediction(record.path, record.sha256, record.verdict, record.reason, top)
        waiting.clear()

    with Progress(len(tasks), "predict") as progress:
        outcomes = map_budgeted(
            check_and_decode, tasks, budget, workers=workers,
            initializer=configure_pillow, initargs=(settings.limits(),),
        )  # fmt: skip
        for index, outcome in outcomes:
            if outcome.result is None:  # timed out, or its process died
                record, pixels = lost_record(tasks[index].file, settings, outcome), None
            else:
                record, pixels = outcome.result
            if pixels is None:
                done[index] = Prediction(record.path, record.sha256, record.verdict, record.reason)
            else:
                waiting.append((index, record, pixels))
                if len(waiting) >= options.batch_size:
                    run_batch()
            progress.update()
            while following in done:
                yield done.pop(following)
                following += 1
        if waiting:
            run_batch()
        while following in done:
            yield done.pop(following)
            following += 1
