"""Images of one split, streamed in batches from the decoded-image cache, augmented per batch.

Each image is decoded and resized once per content and settings into the memory-mapped cache
(graft.data.decoded_cache); a split is a list of rows in it. Batches are gathered from the
maps (in DataLoader worker processes when ``common.num_workers`` > 0), moved to the training
device and only there augmented and normalised, whole batches at once
(graft.data.augment). So the memory a stage holds does not grow with its split: the pixels are
file-backed pages the kernel can drop, and a batch is the only working set.

Randomness comes from one generator per batch stream, seeded by ``common.seed``: it draws
each epoch's order first, then every batch's augmentation in turn, in the main process. The
order of draws is therefore fixed whatever the number of workers, and a resumed run that puts
the generator back draws the same (graft.training.fit_state saves it as ``generator``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from graft.config.params import Augment, Common
from graft.data.augment import BatchTransform
from graft.data.decoded_cache import DecodedCache
from graft.data.decoding import decode_square
from graft.data.store import ImageStore
from graft.errors import GraftError
from graft.training.device import resolve_device
from graft.training.group import LOCAL, Group


class ImageSource(Protocol):
    """Images by position: ``gather`` returns uint8 (B, 3, size, size) for B positions."""

    def __len__(self) -> int: ...

    def gather(self, positions: Sequence[int] | np.ndarray) -> torch.Tensor: ...


class InMemoryImages:
    """An :class:`ImageSource` over a uint8 (N, 3, size, size) tensor (tests, small sets)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def gather(self, positions: Sequence[int] | np.ndarray) -> torch.Tensor:
        """The images at ``positions``, in that order."""
        return self.images[torch.as_tensor(np.asarray(positions, dtype=np.int64))]


class DecodingImages:
    """An :class:`ImageSource` that decodes every image each time it is asked for one, the
    textbook way (``ImageFolder``): what the cache saves, and the reference it must equal."""

    def __init__(self, dataset: Path, sha256: Sequence[str], size: int) -> None:
        self.dataset, self.sha256, self.size = dataset, list(sha256), size
        self._store: ImageStore | None = None

    def __len__(self) -> int:
        return len(self.sha256)

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_store": None}  # each worker process opens its own files

    def gather(self, positions: Sequence[int] | np.ndarray) -> torch.Tensor:
        """The images at ``positions``, decoded from the store now, in that order."""
        if self._store is None:
            self._store = ImageStore(self.dataset)
        arrays = [
            decode_square(self._store.read(self.sha256[int(i)]), self.size) for i in positions
        ]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class ImageSet:
    """The images of one role and split, with their class indices.

    Position ``i`` of ``images`` is the image with ``sha256[i]`` and source path ``paths[i]``;
    ``targets[i]`` indexes ``classes``.
    """

    images: ImageSource
    targets: torch.Tensor  # int64, (N,)
    classes: list[str]
    sha256: list[str]
    paths: list[str]

    def __len__(self) -> int:
        return len(self.targets)


def split_rows(
    splits: pd.DataFrame, *, role: str, split: str, classes: list[str] | None = None
) -> tuple[pd.DataFrame, list[str]]:
    """The rows of ``role``/``split`` and the class order (``classes``, or the role's labels
    sorted). Raises GraftError when the split is empty or holds a class not in ``classes``."""
    role_rows = splits[splits["role"] == role]
    classes = classes or sorted(role_rows["label"].unique())
    rows = role_rows[role_rows["split"] == split]
    if rows.empty:
        raise GraftError(f"the {split} split of source {role!r} is empty")
    unknown = sorted(set(rows["label"]) - set(classes))
    if unknown:
        raise GraftError(f"{role}/{split} has classes {unknown} not among {classes}")
    return rows, list(classes)


@contextmanager
def decoded_cache_folder(decoded: Path | None) -> Iterator[Path]:
    """``decoded`` itself, or a temporary folder removed afterwards when it is None (a core
    called without a cache decodes once per call, and leaves nothing behind)."""
    if decoded is not None:
        yield decoded
        return
    with tempfile.TemporaryDirectory(prefix="graft-decoded-") as folder:
        yield Path(folder)


def load_split(
    splits: pd.DataFrame,
    dataset: Path,
    decoded: Path,
    *,
    role: str,
    split: str,
    size: int,
    classes: list[str] | None = None,
) -> ImageSet:
    """The images of ``role``/``split`` of the ingested ``dataset``, from the decoded cache
    under ``decoded`` (images it lacks are decoded into it first, once).

    ``classes`` fixes the label order (taken from the role's whole table when omitted), so
    class indices agree between the train, val and test sets. Each image is resized, whole, to
    ``size`` x ``size`` pixels. Raises GraftError when the split is empty, holds a class not
    in ``classes``, or an image is missing from ``dataset`` or does not match its hash.
    """
    rows, classes = split_rows(splits, role=role, split=split, classes=classes)
    sha256 = rows["sha256"].tolist()
    cache = DecodedCache(decoded, size)
    with ImageStore(dataset) as store:
        cache.build(sha256, store.read, progress=f"decode {role}/{split}")
    index = {label: i for i, label in enumerate(classes)}
    targets = torch.tensor([index[label] for label in rows["label"]], dtype=torch.int64)
    return ImageSet(cache.open(sha256), targets, classes, sha256, rows["path"].tolist())


class _Positions(Sampler[list[int]]):
    """Batches of positions: in order, or in a new order drawn from ``generator`` each epoch
    (drawn when the epoch starts, before that epoch's augmentation).

    With ``at_least`` > 1 (the number of processes sharing each batch), a last batch smaller
    than that joins the one before it, so that every process gets at least one image of every
    batch; with one process nothing changes.
    """

    def __init__(
        self, count: int, batch_size: int, generator: torch.Generator | None, at_least: int = 1
    ) -> None:
        self.count, self.batch_size, self.generator = count, batch_size, generator
        self.at_least = at_least

    def __iter__(self) -> Iterator[list[int]]:
        if self.generator is None:
            order = torch.arange(self.count)
        else:
            order = torch.randperm(self.count, generator=self.generator)
        for batch in self.split(order):
            yield batch.tolist()

    def split(self, order: torch.Tensor) -> list[torch.Tensor]:
        """``order`` cut into this sampler's batches (none for no images)."""
        batches = list(order.split(self.batch_size)) if len(order) else []
        if len(batches) > 1 and len(batches[-1]) < self.at_least:
            batches[-2:] = [torch.cat(batches[-2:])]
        return batches

    def __len__(self) -> int:
        full, rest = divmod(self.count, self.batch_size)
        batches, last = full + (1 if rest else 0), rest or self.batch_size
        return batches - (1 if batches > 1 and last < self.at_least else 0)


class _Gather(Dataset[tuple[torch.Tensor, ...]]):
    """A batch of positions to this process's share of it: (uint8 images, int64 positions,
    the whole batch's size, the share's first row in it), read in one gather."""

    def __init__(self, images: ImageSource, group: Group) -> None:
        self.images, self.group = images, group

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, ...]:
        return self.__getitems__([position])

    def __getitems__(self, positions: list[int]) -> tuple[torch.Tensor, ...]:
        start, stop = self.group.shard(len(positions))
        mine = positions[start:stop]
        pixels = self.images.gather(mine)
        return pixels, torch.tensor(mine, dtype=torch.int64), torch.tensor([len(positions), start])


def _as_is(batch: Any) -> Any:
    return batch  # __getitems__ already returns the batch


class ImageBatches:
    """Re-iterable batches of one image set: (float32 (B, 3, size, size) normalised, and
    augmented when asked, on ``device``; int64 (B,) class indices on the CPU).

    ``batch_size`` is in images (the last batch may hold fewer). ``generator`` (seeded by
    ``common.seed``) draws the order when ``shuffle`` and the augmentation when ``augment``.

    In a data-parallel ``group`` every rank draws the same order and augmentation, cuts each
    batch of ``batch_size`` into the ranks' contiguous shares (:meth:`Group.shard`) and reads
    and yields only its own: ``batch_size`` is the global batch, and each image gets the
    augmentation one process would give it. A last batch smaller than the world size joins
    the one before it.
    """

    def __init__(
        self,
        images: ImageSet,
        common: Common,
        *,
        batch_size: int,
        augment: Augment | None = None,
        shuffle: bool = False,
        group: Group = LOCAL,
    ) -> None:
        self.images = images
        self.device = resolve_device(common.device)
        self.transform = BatchTransform(common.mean, common.std, augment)
        self.augment = augment
        self.group = group
        self.generator = torch.Generator().manual_seed(common.seed)
        self.positions = _Positions(
            len(images), batch_size, self.generator if shuffle else None, group.world
        )
        self.loader = DataLoader(
            _Gather(images.images, group),
            batch_sampler=self.positions,
            collate_fn=_as_is,
            num_workers=common.num_workers,
            persistent_workers=common.num_workers > 0,
            # Workers start from a clean server process, not by forking this one: a fork
            # copies whatever threads and handlers the caller runs (a Prefect client, a test
            # run), and forked workers of a threaded parent died at shutdown (exit code 1).
            # The image source travels by pickle (the decoded cache's maps are reopened).
            multiprocessing_context="forkserver" if common.num_workers > 0 else None,
            # Page-locked batches only help copies to a CUDA device (and warn elsewhere).
            pin_memory=common.pin_memory and self.device.type == "cuda",
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = self.generator if self.augment is not None else None
        for pixels, positions, (whole, start) in self.loader:
            inputs = pixels.to(self.device, non_blocking=True)
            within = (int(start), int(whole))
            yield self.transform(inputs, generator, within), self.images.targets[positions]

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.loader)

    def shares(self) -> list[torch.Tensor]:
        """The positions each rank yields in one epoch, in its order: int64 ``(n_r,)`` per
        rank, for batches in a fixed order only (not ``shuffle``). Raises ValueError else."""
        if self.positions.generator is not None:
            raise ValueError("the shares of shuffled batches change every epoch")
        batches = self.positions.split(torch.arange(len(self.images)))
        shares = []
        for rank in range(self.group.world):
            ranked = Group(rank=rank, world=self.group.world)
            cuts = [batch[slice(*ranked.shard(len(batch)))] for batch in batches]
            shares.append(torch.cat(cuts) if cuts else torch.zeros(0, dtype=torch.int64))
        return shares


def make_loader(
    images: ImageSet,
    common: Common,
    *,
    batch_size: int,
    augment: Augment | None = None,
    shuffle: bool = False,
    group: Group = LOCAL,
) -> ImageBatches:
    """The batches of ``images`` (see :class:`ImageBatches`), fixed by ``common.seed``; in a
    data-parallel ``group``, this rank's share of each."""
    return ImageBatches(
        images, common, batch_size=batch_size, augment=augment, shuffle=shuffle, group=group
    )


@dataclass(frozen=True)
class TrainingData:
    """A role's train and val images and their batches (train shuffled and augmented)."""

    train_set: ImageSet
    val_set: ImageSet
    train: ImageBatches
    val: ImageBatches

    @property
    def classes(self) -> list[str]:
        """The class names, in the order of the class indices."""
        return self.train_set.classes


def training_data(
    splits: pd.DataFrame,
    dataset: Path,
    decoded: Path,
    role: str,
    common: Common,
    *,
    batch_size: int,
    augment: Augment,
    group: Group = LOCAL,
) -> TrainingData:
    """``role``'s train and val splits at ``common.image_size``, from the decoded cache under
    ``decoded``, and their batches (this rank's shares of them in a data-parallel ``group``).

    The val set uses the train set's class order. Raises as :func:`load_split` does, and
    GraftError when a split has fewer images than the group has processes.
    """
    size = common.image_size
    train_set = load_split(splits, dataset, decoded, role=role, split="train", size=size)
    val_set = load_split(
        splits, dataset, decoded, role=role, split="val", size=size, classes=train_set.classes
    )
    for name, images in (("train", train_set), ("val", val_set)):
        if len(images) < group.world:  # a process would get no image of a batch
            raise GraftError(
                f"the {name} split of source {role!r} has {len(images)} images, fewer than "
                f"the {group.world} processes of common.distributed"
            )
    return TrainingData(
        train_set,
        val_set,
        make_loader(
            train_set, common, batch_size=batch_size, augment=augment, shuffle=True, group=group
        ),
        make_loader(val_set, common, batch_size=batch_size, group=group),
    )
