"""Training from the decoded cache is training from the images: the same batches as decoding
every image every time, the same weights, whatever the number of loader workers."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from graft.config.params import Augment, Common
from graft.data.loaders import DecodingImages, ImageSet, load_split, make_loader
from graft.data.store import pack, read_index
from graft.errors import GraftError
from graft.hashing import sha256_hex

COMMON = Common(seed=3, image_size=12, mean=(0.5,) * 3, std=(0.25,) * 3, device="cpu")
AUGMENT = Augment(rotation=15, translate=0.1, hflip=True)


def dataset_of(folder: Path, count: int = 24) -> tuple[pd.DataFrame, Path]:
    """A packed dataset of ``count`` small JPEG and PNG images in two classes, and its splits
    table (every image in target/train)."""
    images: dict[str, bytes] = {}
    rows = []
    for i in range(count):
        picture = Image.new("RGB", (20 + i % 5, 17), (i * 9 % 256, 255 - i * 7 % 256, i * 31 % 256))
        picture.putpixel((i % 17, 3), (255, 255, 255))  # something for rotations to move
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG" if i % 2 else "PNG")
        sha = sha256_hex(buffer.getvalue())
        images[sha] = buffer.getvalue()
        label = "a" if i % 3 else "b"
        rows.append(
            {
                "role": "target",
                "sha256": sha,
                "label": label,
                "split": "train",
                "path": f"{label}/{i}",
            }
        )
    folder.mkdir()
    pack(folder, {sha: len(data) for sha, data in images.items()}, None, images.__getitem__)
    return pd.DataFrame(rows), folder


def decoding_twin(cached: ImageSet, dataset: Path) -> ImageSet:
    """The same set, decoded from the store every time it is read."""
    source = DecodingImages(dataset, cached.sha256, COMMON.image_size)
    return ImageSet(source, cached.targets, cached.classes, cached.sha256, cached.paths)


def train(images: ImageSet, common: Common) -> dict[str, torch.Tensor]:
    """Two epochs of a small network on shuffled, augmented batches; its final weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    batches = make_loader(images, common, batch_size=5, augment=AUGMENT, shuffle=True)
    model(next(iter(make_loader(images, common, batch_size=5)))[0])  # materialise LazyLinear
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        for inputs, targets in batches:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
    return model.state_dict()


def test_the_cache_trains_bit_identical_weights_to_decoding_every_time(tmp_path: Path) -> None:
    splits, dataset = dataset_of(tmp_path / "ingested")
    cached = load_split(
        splits, dataset, tmp_path / "decoded", role="target", split="train", size=12
    )
    direct = decoding_twin(cached, dataset)
    assert torch.equal(
        cached.images.gather(range(len(cached))), direct.images.gather(range(len(direct)))
    )
    from_cache, from_files = train(cached, COMMON), train(direct, COMMON)
    for name, tensor in from_cache.items():
        assert torch.equal(tensor, from_files[name]), name


def test_batches_do_not_depend_on_the_number_of_workers(tmp_path: Path) -> None:
    splits, dataset = dataset_of(tmp_path / "ingested")
    images = load_split(
        splits, dataset, tmp_path / "decoded", role="target", split="train", size=12
    )

    def epochs(workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        common = COMMON.model_copy(update={"num_workers": workers})
        batches = make_loader(images, common, batch_size=7, augment=AUGMENT, shuffle=True)
        return [batch for _ in range(2) for batch in batches]

    alone, with_workers = epochs(0), epochs(2)
    assert len(alone) == 2 * 4  # 24 images in batches of 7: the last one holds 3
    assert [len(t) for _, t in alone[:4]] == [7, 7, 7, 3]
    for (x0, y0), (x2, y2) in zip(alone, with_workers, strict=True):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    # every image once per epoch, and a new order (and new augmentation) in the second
    assert sorted(torch.cat([t for _, t in alone[:4]]).tolist()) == sorted(images.targets.tolist())
    assert not torch.equal(alone[0][0], alone[4][0])


def test_a_corrupted_store_fails_naming_the_image(tmp_path: Path) -> None:
    splits, dataset = dataset_of(tmp_path / "ingested", count=4)
    shard = next((dataset / "shards").iterdir())
    shard.chmod(0o644)
    first = read_index(dataset).iloc[0]
    data = bytearray(shard.read_bytes())
    data[int(first["offset"]) + int(first["size"]) // 2] ^= 0xFF  # one flipped bit in an image
    shard.write_bytes(bytes(data))
    with pytest.raises(GraftError, match=str(first["sha256"])):
        load_split(splits, dataset, tmp_path / "decoded", role="target", split="train", size=12)
