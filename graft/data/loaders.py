"""Images of one split, decoded once into memory, served as normalised (augmented) tensors.

Each image is decoded and resized exactly once per run into a uint8 tensor; augmentation then
works on tensors, so no epoch pays for JPEG/PNG decoding again.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from graft.config.params import Augment, Common
from graft.data.decoding import load_rgb
from graft.data.layout import image_path
from graft.errors import GraftError
from graft.training.device import resolve_device

Batches = DataLoader[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class ImageSet:
    """Decoded images of one role and split, with their class indices.

    Row ``i`` of ``images`` is the image with ``sha256[i]`` and source path ``paths[i]``;
    ``targets[i]`` indexes ``classes``.
    """

    images: torch.Tensor  # uint8, (N, 3, size, size)
    targets: torch.Tensor  # int64, (N,)
    classes: list[str]
    sha256: list[str]
    paths: list[str]

    def __len__(self) -> int:
        return len(self.targets)


def load_split(
    splits: pd.DataFrame,
    dataset: Path,
    *,
    role: str,
    split: str,
    size: int,
    classes: list[str] | None = None,
) -> ImageSet:
    """Decode the images of ``role``/``split`` from the ingested dataset.

    ``classes`` fixes the label order (taken from the role's whole table when omitted), so
    class indices agree between the train, val and test sets. Each image is resized, whole, to
    ``size`` x ``size`` pixels. Returns images of shape (N, 3, size, size), uint8. Raises
    GraftError when the split is empty or holds a class not in ``classes``, and OSError when
    an image is missing from ``dataset``.
    """
    role_rows = splits[splits["role"] == role]
    classes = classes or sorted(role_rows["label"].unique())
    rows = role_rows[role_rows["split"] == split]
    if rows.empty:
        raise GraftError(f"the {split} split of source {role!r} is empty")
    index = {label: i for i, label in enumerate(classes)}
    unknown = sorted(set(rows["label"]) - set(index))
    if unknown:
        raise GraftError(f"{role}/{split} has classes {unknown} not among {classes}")
    # Pillow releases the GIL while it decodes and resizes, so threads use every core.
    paths = [image_path(dataset, sha) for sha in rows["sha256"]]
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        arrays = [torch.from_numpy(a) for a in pool.map(load_rgb, paths, [size] * len(paths))]
    images = torch.stack(arrays).permute(0, 3, 1, 2).contiguous()
    targets = torch.tensor([index[label] for label in rows["label"]], dtype=torch.int64)
    return ImageSet(images, targets, list(classes), list(rows["sha256"]), list(rows["path"]))


class _TensorImages(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self, images: ImageSet, transform: v2.Transform) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images.images[i]), self.images.targets[i]


def make_transform(
    mean: tuple[float, ...], std: tuple[float, ...], augment: Augment | None
) -> v2.Transform:
    """uint8 (3, H, W) image tensor to a normalised float32 one, augmented when ``augment``.

    ``mean`` and ``std`` are per channel on the 0-1 scale; ``augment`` None means none.
    """
    steps: list[v2.Transform] = []
    if augment is not None:
        if augment.rotation or augment.translate:
            translate = (augment.translate, augment.translate) if augment.translate else None
            steps.append(v2.RandomAffine(degrees=augment.rotation, translate=translate))
        if augment.hflip:
            steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def make_loader(
    images: ImageSet,
    common: Common,
    *,
    batch_size: int,
    augment: Augment | None = None,
    shuffle: bool = False,
) -> Batches:
    """A DataLoader whose shuffling and augmentation are fixed by ``common.seed``.

    Batches are (images, targets): float32 (B, 3, size, size) normalised with
    ``common.mean``/``std``, and int64 (B,) class indices; ``batch_size`` is in images.
    """
    return DataLoader(
        _TensorImages(images, make_transform(common.mean, common.std, augment)),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(common.seed),
        num_workers=common.num_workers,
        worker_init_fn=_seed_worker if common.num_workers else None,
        # Page-locked batches only help copies to a CUDA device (and warn elsewhere).
        pin_memory=common.pin_memory and resolve_device(common.device).type == "cuda",
    )


@dataclass(frozen=True)
class TrainingData:
    """A role's train and val images and their loaders (train shuffled and augmented)."""

    train_set: ImageSet
    val_set: ImageSet
    train: Batches
    val: Batches

    @property
    def classes(self) -> list[str]:
        """The class names, in the order of the class indices."""
        return self.train_set.classes


def training_data(
    splits: pd.DataFrame,
    dataset: Path,
    role: str,
    common: Common,
    *,
    batch_size: int,
    augment: Augment,
) -> TrainingData:
    """Decode ``role``'s train and val splits at ``common.image_size`` and wrap them in loaders.

    The val set uses the train set's class order. Raises as :func:`load_split` does.
    """
    size = common.image_size
    train_set = load_split(splits, dataset, role=role, split="train", size=size)
    val_set = load_split(
        splits, dataset, role=role, split="val", size=size, classes=train_set.classes
    )
    return TrainingData(
        train_set,
        val_set,
        make_loader(train_set, common, batch_size=batch_size, augment=augment, shuffle=True),
        make_loader(val_set, common, batch_size=batch_size),
    )


def _seed_worker(worker_id: int) -> None:
    # Each worker's torch seed is derived from the loader's generator; mirror it into the
    # other RNGs a transform might use.
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
