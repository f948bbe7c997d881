"""Where starting weights come from: ``scratch``, ImageNet (torchvision's weights) or a checkpoint.

``pretrain.init`` is one of:

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
from graft.training.checkpoints import CheckpointError, model_from_checkpoint


class WeightsError(GraftError):
    """Starting weights that are missing, unknown or do not fit the architecture."""


@dataclass(frozen=True)
class StartingWeights:
    """A network with its starting weights, their classes and where they came from."""

    model: nn.Module
    classes: list[str]
    init: str  # "scratch", "imagenet:<Enum.MEMBER>" or "checkpoint:<sha256>"
    provenance: dict[str, Any] = field(default_factory=dict)


def imagenet_weights(arch: str, name: str | None) -> WeightsEnum:
    """torchvision's weights entry for ``arch``: ``DEFAULT`` or the member called ``name``."""
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
    """Where torch's hub cache keeps ``weights`` (honours ``TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def load_imagenet(arch: str, name: str | None) -> StartingWeights:
    """``arch`` with ImageNet weights from the hub cache; never downloads."""
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
    return StartingWeights(model, classes, f"imagenet:{weights}", provenance)


def starting_weights(init: str, arch: str, num_classes: int) -> StartingWeights:
    """The network ``init`` describes: random with ``num_classes`` outputs, or loaded weights."""
    if init == "scratch":
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        return StartingWeights(model, [], "scratch")
    if init == "imagenet" or init.startswith("imagenet:"):
        return load_imagenet(arch, init.partition(":")[2] or None)
    path = Path(init)
    try:
        model, meta = model_from_checkpoint(path)
    except CheckpointError as error:
        raise WeightsError(f"pretrain.init: {error}") from None
    if meta.arch != arch:
        raise WeightsError(
            f"pretrain.init: {path} holds a {meta.arch} network but pretrain.arch is {arch!r}"
        )
    provenance = {"checkpoint": str(path), "sha256": file_sha256(path), "init": meta.init}
    return StartingWeights(model, meta.classes, f"checkpoint:{provenance['sha256']}", provenance)
