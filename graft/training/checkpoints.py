"""Checkpoints: a plain state dict plus plain metadata, safe to load with ``weights_only=True``.

No pickled objects: a checkpoint is ``{"format": ..., "state_dict": {...}, "meta": {...}}``
where ``meta`` holds only strings, numbers, lists and dicts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graft.atomic import atomic_path
from graft.errors import GraftError
from graft.training.models import build_model

FORMAT = "graft-checkpoint/1"


class CheckpointError(GraftError):
    """A checkpoint is missing, unreadable or does not fit what it is used for."""


@dataclass(frozen=True)
class CheckpointMeta:
    arch: str
    classes: list[str]
    image_size: int
    mean: list[float]
    std: list[float]
    epoch: int
    metrics: dict[str, float]
    # Where the starting weights came from: "scratch", "imagenet:<weights>" or
    # "checkpoint:<sha256>"; extra["weights"] records file, URL and sha256 (tasks/weights.py).
    init: str
    extra: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: Path, model: nn.Module, meta: CheckpointMeta) -> None:
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    with atomic_path(path) as temporary:
        torch.save({"format": FORMAT, "state_dict": state, "meta": asdict(meta)}, temporary)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """Read a checkpoint without unpickling code; raise CheckpointError when it is not ours."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as error:  # torch raises several types for foreign or damaged files
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a graft checkpoint (expected format {FORMAT})")
    return payload["state_dict"], CheckpointMeta(**payload["meta"])


def model_from_checkpoint(path: Path) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the network a checkpoint describes and load its weights."""
    state, meta = load_checkpoint(path)
    model = build_model(meta.arch, len(meta.classes))
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(
            f"{path}: weights do not fit {meta.arch} with {len(meta.classes)} classes: {error}"
        ) from None
    return model, meta


def check_fits(meta: CheckpointMeta, path: Path, *, classes: list[str], arch: str) -> None:
    """Raise CheckpointError when a checkpoint's classes or architecture differ from the run's."""
    if meta.arch != arch:
        raise CheckpointError(f"{path} holds a {meta.arch} network, not {arch}")
    if meta.classes != classes:
        missing = sorted(set(classes) - set(meta.classes))
        extra = sorted(set(meta.classes) - set(classes))
        detail = f"not in the checkpoint: {missing}; only in the checkpoint: {extra}"
        if not missing and not extra:
            detail = "same classes in another order"
        raise CheckpointError(
            f"{path} was trained for classes {meta.classes}, but the data has {classes} ({detail})"
        )
