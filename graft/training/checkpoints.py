"""Checkpoints: a plain state dict plus plain metadata, safe to load with ``weights_only=True``.

No pickled objects: a checkpoint is ``{"format": ..., "state_dict": {...}, "meta": {...}}``
where ``meta`` holds only strings, numbers, lists and dicts.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from graft.atomic import atomic_path
from graft.errors import GraftError
from graft.training.models import ModelError, build_model

FORMAT = "graft-checkpoint/1"


class CheckpointError(GraftError):
    """A checkpoint is missing, unreadable or does not fit what it is used for."""


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint's weights are: plain data only.

    ``arch`` is the torchvision model name; ``classes`` the output classes in index order;
    ``image_size`` (pixels, square), ``mean`` and ``std`` (per RGB channel, on 0-1 values) the
    inputs it expects; ``epoch`` and ``metrics`` the kept epoch and its validation figures
    (0 and empty for weights passed through untrained). ``init`` says where the starting
    weights came from: ``scratch``, ``imagenet:<weights>`` or ``checkpoint:<sha256>``;
    ``extra`` holds their record (``extra["weights"]``: file, URL and sha256 of ImageNet
    weights, see graft/training/weights.py) and a fine-tuned checkpoint's backbone lineage.
    """

    arch: str
    classes: list[str]
    image_size: int
    mean: list[float]
    std: list[float]
    epoch: int
    metrics: dict[str, float]
    init: str
    extra: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: Path, model: nn.Module, meta: CheckpointMeta) -> None:
    """Write ``model``'s state dict (every tensor moved to the CPU) and ``meta`` to ``path``
    atomically, as ``{"format", "state_dict", "meta"}``. Raises OSError when it cannot."""
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    with atomic_path(path) as temporary:
        torch.save({"format": FORMAT, "state_dict": state, "meta": asdict(meta)}, temporary)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """The state dict (CPU tensors by name) and metadata of the checkpoint at ``path``, read
    without unpickling code. Raises CheckpointError when it is missing or not ours."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return _read(path, str(path))


def checkpoint_from_bytes(data: bytes, name: str) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """:func:`load_checkpoint` for a checkpoint file's bytes (read from git, DVC's cache or its
    remote); ``name`` says where they came from, in errors. Raises CheckpointError when they
    are not a graft checkpoint."""
    return _read(io.BytesIO(data), name)


def _read(source: Path | BinaryIO, name: str) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message is a page long and suggests weights_only=False: never for us.
        raise CheckpointError(
            f"{name} is not a graft checkpoint: not a PyTorch file, or one holding more "
            "than tensors and plain data (refused by torch.load(weights_only=True))"
        ) from None
    except Exception as error:  # torch raises several types for foreign or damaged files
        raise CheckpointError(f"cannot read checkpoint {name}: {error}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{name} is not a graft checkpoint (expected format {FORMAT})")
    try:
        return payload["state_dict"], CheckpointMeta(**payload["meta"])
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{name}: its metadata is not graft's: {error}") from None


def model_from_checkpoint(path: Path) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the network the checkpoint at ``path`` describes, load its weights (on the CPU)
    and return it with its metadata.

    The network is built with random weights first, so it draws from torch's global RNG.
    Raises CheckpointError when the file is missing, not ours, or its weights do not fit.
    """
    state, meta = load_checkpoint(path)
    return model_from_state(state, meta, str(path)), meta


def model_from_state(state: dict[str, torch.Tensor], meta: CheckpointMeta, name: str) -> nn.Module:
    """The network ``meta`` describes (architecture, number of classes) with the weights
    ``state`` loaded, on the CPU; ``name`` says where they came from, in errors. Draws from
    torch's global RNG. Raises CheckpointError when the weights do not fit that network or the
    architecture is unknown."""
    try:
        model = build_model(meta.arch, len(meta.classes))
    except ModelError as error:
        raise CheckpointError(f"{name}: {error}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(
            f"{name}: weights do not fit {meta.arch} with {len(meta.classes)} classes: {error}"
        ) from None
    return model


def check_fits(
    meta: CheckpointMeta, path: Path, *, arch: str, classes: list[str] | None = None
) -> None:
    """Raise CheckpointError when the checkpoint at ``path`` (described by ``meta``) holds
    another architecture than ``arch``, or, when ``classes`` is given, other classes or the
    same classes in another order. The error names the classes missing on each side.
    """
    if meta.arch != arch:
        raise CheckpointError(f"{path} holds a {meta.arch} network, not {arch}")
    if classes is not None and meta.classes != classes:
        missing = sorted(set(classes) - set(meta.classes))
        extra = sorted(set(meta.classes) - set(classes))
        detail = f"not in the checkpoint: {missing}; only in the checkpoint: {extra}"
        if not missing and not extra:
            detail = "same classes in another order"
        raise CheckpointError(
            f"{path} was trained for classes {meta.classes}, but the data has {classes} ({detail})"
        )
