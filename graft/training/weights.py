"""Where a network's starting weights come from: random, ImageNet (torchvision's) or a checkpoint.

This is the one place that decides it, for every stage: :func:`starting_weights` for
``pretrain.init``, :func:`backbone_weights` for finetune (the pretrained checkpoint) and the
baseline (random weights). ``pretrain.init`` is one of:

- ``scratch``: random initialisation;
- ``imagenet`` or ``imagenet:<NAME>``: torchvision's weights for the architecture (``DEFAULT``, or
  a member such as ``IMAGENET1K_V1``), read from the torch hub cache
  (``$TORCH_HOME/hub/checkpoints``). Nothing is ever downloaded during a run: a missing file is
  an immediate error naming the file, the folder to put it in and the URL to fetch it from;
- any other value: the path of a graft checkpoint of the same architecture.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from graft.errors import GraftError
from graft.hashing import file_sha256
from graft.training.checkpoints import (
    CheckpointError,
    CheckpointMeta,
    check_fits,
    model_from_checkpoint,
)
from graft.training.models import build_model, replace_head


class WeightsError(GraftError):
    """Starting weights that are missing, unknown or do not fit the architecture."""


@dataclass(frozen=True)
class StartingWeights:
    """A network (on the CPU) with its starting weights, and where they came from.

    ``arch`` is its torchvision name; ``classes`` the classes the weights were trained for
    (empty for random weights); ``init`` is ``scratch``, ``imagenet:<Enum.MEMBER>`` or
    ``checkpoint:<sha256>``; ``provenance`` records the file (ImageNet: name, URL, sha256 and
    whether it is the published file; checkpoint: path, sha256 and its own ``init``), empty for
    random weights; ``source`` is a checkpoint's own metadata (None otherwise).
    """

    model: nn.Module
    arch: str
    classes: list[str]
    init: str
    provenance: dict[str, Any] = field(default_factory=dict)
    source: CheckpointMeta | None = None


def imagenet_weights(arch: str, name: str | None) -> WeightsEnum:
    """torchvision's weights entry for ``arch``: ``DEFAULT`` or the member called ``name``.

    Raises WeightsError when torchvision has no weights for ``arch`` or none called ``name``.
    """
    try:
        members = torchvision.models.get_model_weights(arch)
    except (KeyError, ValueError):
        raise WeightsError(f"pretrain.init: torchvision has no weights for {arch!r}") from None
    if name is None:
        return members.DEFAULT
    try:
        return members[name]
    except KeyError:
        known = ", ".join(members.__members__)
        message = f"pretrain.init: {arch} has no weights {name!r} (known: {known})"
        raise WeightsError(message) from None


def hub_file(weights: WeightsEnum) -> Path:
    """The file where torch's hub cache keeps ``weights`` (honours ``TORCH_HOME``); it may not
    exist."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def load_imagenet(arch: str, name: str | None) -> StartingWeights:
    """``arch`` with ImageNet weights (``DEFAULT`` or ``name``) from the hub cache, with their
    1000 categories as classes; never downloads. A file whose sha256 does not start with the
    hash in its name is used, with a warning on stderr, and recorded as not the published one.

    Raises WeightsError when the weights are unknown, the file is missing from the cache (naming
    the file, the folder and the URL) or does not hold ``arch`` weights.
    """
    weights = imagenet_weights(arch, name)
    path = hub_file(weights)
    if not path.is_file():
        raise WeightsError(
            f"pretrain.init: the weights {weights} are not in the torch hub cache: {path.name} is "
            f"missing from {path.parent} (set TORCH_HOME to use another cache). graft does not "
            f"download during a run: fetch {weights.url} into that folder, for example "
            f"`curl -L --create-dirs -o {path} {weights.url}`"
        )
    categories = weights.meta.get("categories") or []
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = torchvision.models.get_model(arch, weights=None, num_classes=len(categories) or 1000)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise WeightsError(f"{path} does not hold {arch} weights ({weights}): {error}") from None
    sha256 = file_sha256(path)
    # torchvision names each file after the start of its sha256 (resnet18-f37072fd.pth).
    published = re.search(r"-([0-9a-f]{6,})\.", path.name)
    matches = bool(published and sha256.startswith(published.group(1)))
    if not matches:
        print(f"warning: {path} is not the published file (sha256 {sha256})", file=sys.stderr)
    provenance = {
        "weights": str(weights),
        "file": path.name,
        "url": weights.url,
        "sha256": sha256,
        "matches_published_hash": matches,
    }
    classes = list(categories) or [f"class_{i}" for i in range(1000)]
    return StartingWeights(model, arch, classes, f"imagenet:{weights}", provenance)


def starting_weights(init: str, arch: str, num_classes: int) -> StartingWeights:
    """The network ``pretrain.init`` (``init``) describes for ``pretrain.arch`` (``arch``):
    random with ``num_classes`` outputs, ImageNet weights, or a checkpoint's weights (heads
    keep their own classes; the caller replaces them).

    Raises WeightsError when the weights are missing or unknown, or the checkpoint is
    unreadable or holds another architecture.
    """
    if init == "scratch":
        return random_weights(arch, num_classes)
    if init == "imagenet" or init.startswith("imagenet:"):
        return load_imagenet(arch, init.partition(":")[2] or None)
    path = Path(init)
    try:
        start = checkpoint_weights(path)
    except CheckpointError as error:
        raise WeightsError(f"pretrain.init: {error}") from None
    assert start.source is not None
    try:
        check_fits(start.source, path, arch=arch)
    except CheckpointError as error:
        raise WeightsError(f"pretrain.init does not fit pretrain.arch: {error}") from None
    return start


def backbone_weights(backbone: Path | None, arch: str, num_classes: int) -> StartingWeights:
    """Where fine-tuning starts: the ``backbone`` checkpoint, in its own architecture, with its
    last linear layer replaced by a random one for ``num_classes``; or, with ``backbone`` None
    (the baseline), random ``arch`` weights.

    Raises CheckpointError when the checkpoint is missing, unreadable or its weights do not
    fit, and ModelError when the network has no linear layer to replace.
    """
    if backbone is None:
        return random_weights(arch, num_classes)
    start = checkpoint_weights(backbone)
    replace_head(start.model, num_classes)
    return start


def random_weights(arch: str, num_classes: int) -> StartingWeights:
    """``arch`` randomly initialised (from torch's global RNG) with ``num_classes`` outputs.

    Raises ModelError for an unknown architecture and for one without a linear head.
    """
    return StartingWeights(build_model(arch, num_classes), arch, [], "scratch")


def checkpoint_weights(path: Path) -> StartingWeights:
    """The network and weights of the graft checkpoint at ``path``, in its own architecture.

    Raises CheckpointError when it is missing, unreadable or its weights do not fit.
    """
    model, meta = model_from_checkpoint(path)
    sha256 = file_sha256(path)
    provenance = {"checkpoint": str(path), "sha256": sha256, "init": meta.init}
    return StartingWeights(model, meta.arch, meta.classes, f"checkpoint:{sha256}", provenance, meta)
