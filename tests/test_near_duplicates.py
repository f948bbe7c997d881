"""Perceptual hashes and near-duplicate grouping (graft.data.near_duplicates)."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from graft.config.settings import DEFAULT_NEAR_DUPLICATE_DISTANCE
from graft.data.near_duplicates import (
    distance_limits,
    group_near_duplicates,
    hamming,
    hash_grids,
    hash_values,
    perceptual_hash,
)


def photo(seed: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A smooth random colour field with a few flat shapes: unlike any other seed's."""
    rng = np.random.default_rng(seed)
    width, height = size
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    amplitude = np.hypot(fx, fy)
    amplitude[0, 0] = np.inf  # no constant term: the field has mean 0
    amplitude = 1 / amplitude**1.3
    shape = (3, *amplitude.shape)
    spectrum = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) * amplitude
    field = np.fft.irfft2(spectrum, s=(height, width))
    field /= field.std(axis=(1, 2), keepdims=True)
    pixels = np.clip(128 + 40 * field.transpose(1, 2, 0), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.uniform(0, 0.8, 2) * size
        w, h = rng.uniform(0.1, 0.4, 2) * size
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse([x, y, x + w, y + h], fill=colour)
    return image


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def distance(a: str, b: str) -> int:
    return int(hamming(hash_values([a]), hash_values([b]))[0])


def brute_force_groups(hashes: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """The reference: every pair compared; group id = index of the group's first member."""
    near = hamming(hashes[:, None], hashes[None, :]) <= np.minimum.outer(limits, limits)
    near |= hashes[:, None] == hashes[None, :]
    _, labels = connected_components(coo_matrix(near), directed=False)
    first = {label: index for index, label in reversed(list(enumerate(labels)))}
    return np.array([first[label] for label in labels])


def planted(rng: np.random.Generator, count: int, max_flips: int) -> np.ndarray:
    """``count`` random 32-of-64-bit hashes (like real ones), then near copies of a fifth of
    them (0 to ``max_flips`` bits flipped), then a few exact repeats."""
    bits = np.argsort(rng.random((count, 64)), axis=1)[:, :32].astype(np.uint64)
    hashes = np.bitwise_or.reduce(np.left_shift(np.uint64(1), bits), axis=1)
    sources = rng.integers(0, count, count // 5)
    copies = hashes[sources].copy()
    for i in range(len(copies)):
        for bit in rng.choice(64, int(rng.integers(0, max_flips + 1)), replace=False):
            copies[i] ^= np.uint64(1) << np.uint64(bit)
    return np.concatenate([hashes, copies, hashes[:20]])


def test_hash_is_16_hex_digits_and_the_same_every_time() -> None:
    image = photo(1)
    digest = perceptual_hash(image)
    assert re.fullmatch(r"[0-9a-f]{16}", digest)
    assert perceptual_hash(image.copy()) == digest
    assert bin(int(digest, 16)).count("1") == 32  # above the median: exactly half the bits
    # The mode does not matter beyond its grey levels.
    assert perceptual_hash(image.convert("L")) == perceptual_hash(image.convert("L").convert("RGB"))


def test_blank_images_hash_to_fixed_values() -> None:
    # All frequencies but (0, 0) are zero up to float noise: the rounding makes them ties,
    # which are not above the median, so no machine's noise can set their bits.
    assert perceptual_hash(Image.new("RGB", (50, 40), (200, 10, 10))) == "8000000000000000"
    assert perceptual_hash(Image.new("RGB", (50, 40))) == "0000000000000000"


@pytest.mark.parametrize("scale", [0.5, 0.7, 1.4, 2.0])
def test_resized_copies_stay_near(scale: float) -> None:
    for seed in range(8):
        image = photo(seed)
        size = (round(image.width * scale), round(image.height * scale))
        copy = image.resize(size, Image.Resampling.BICUBIC)
        assert distance(perceptual_hash(image), perceptual_hash(copy)) <= 4, seed


@pytest.mark.parametrize("quality", [60, 75, 95])
def test_jpeg_copies_stay_near(quality: int) -> None:
    for seed in range(8):
        image = photo(seed)
        copy = jpeg(image, quality)
        assert distance(perceptual_hash(image), perceptual_hash(copy)) <= 4, seed


def test_slightly_cropped_copies_stay_near() -> None:
    for seed in range(8):
        image = photo(seed)
        width, height = image.size
        crops = [(3, 0, width, height), (0, 0, width - 3, height - 2), (2, 2, width - 2, height)]
        for box in crops:  # 2 to 3% of a side
            copy = jpeg(image.crop(box), 85)
            assert distance(perceptual_hash(image), perceptual_hash(copy)) <= 8, (seed, box)


def test_distinct_images_are_far_apart() -> None:
    hashes = hash_values([perceptual_hash(photo(seed)) for seed in range(40)])
    distances = hamming(hashes[:, None], hashes[None, :])[np.triu_indices(40, 1)]
    assert distances.min() > DEFAULT_NEAR_DUPLICATE_DISTANCE
    assert 28 <= np.median(distances) <= 36  # about half the bits, as for unrelated pictures


def test_hash_grids_refuses_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="32, 32"):
        hash_grids(np.zeros((2, 16, 16)))


@pytest.mark.parametrize("max_distance", [0, 1, 4, 8, 12])
def test_grouping_equals_all_pairs(max_distance: int) -> None:
    rng = np.random.default_rng(max_distance)
    hashes = planted(rng, 2500, max_distance + 2)
    limits = np.full(len(hashes), max_distance)
    expected = brute_force_groups(hashes, limits)
    assert np.array_equal(group_near_duplicates(hashes, max_distance), expected)
    hex_digests = [f"{int(h):016x}" for h in hashes]
    assert np.array_equal(group_near_duplicates(hex_digests, max_distance), expected)
    assert len(np.unique(expected)) < len(hashes) - 20  # the planted copies did group


def test_grouping_with_a_limit_per_hash_equals_all_pairs() -> None:
    rng = np.random.default_rng(5)
    hashes = planted(rng, 2000, 10)
    limits = rng.choice([0, 4, 8], size=len(hashes))
    expected = brute_force_groups(hashes, limits)
    assert np.array_equal(group_near_duplicates(hashes, limits), expected)


def test_groups_are_transitive() -> None:
    base = 0x0F0F_0F0F_0F0F_0F0F
    chain = [base, base ^ 0b1111, base ^ 0b1111_1111, base ^ 0xFFF]  # 4 bits per step
    far = base ^ 0xFFFF_FFFF_0000_0000
    hashes = np.array([*chain, far], dtype=np.uint64)
    assert group_near_duplicates(hashes, 4).tolist() == [0, 0, 0, 0, 4]  # ends 12 bits apart
    assert group_near_duplicates(hashes, 3).tolist() == [0, 1, 2, 3, 4]


def test_identical_hashes_are_one_group_even_at_distance_0() -> None:
    blank = "8000000000000000"
    hashes = ["0123456789abcdef", blank, blank, "fedcba9876543210", blank]
    assert group_near_duplicates(hashes, 0).tolist() == [0, 1, 1, 3, 1]
    assert group_near_duplicates(hashes, np.array([0, 8, 0, 0, 0])).tolist() == [0, 1, 1, 3, 1]


def test_group_ids_are_the_first_member_and_the_partition_ignores_order() -> None:
    rng = np.random.default_rng(3)
    hashes = planted(rng, 500, 6)
    order = rng.permutation(len(hashes))
    groups, shuffled = group_near_duplicates(hashes, 6), group_near_duplicates(hashes[order], 6)
    for found in (groups, shuffled):
        names, firsts = np.unique(found, return_index=True)
        assert np.array_equal(names, firsts)  # each group is named by its first member
    # The same partition: group names map one to one between the two orders.
    pairs = set(zip(groups[order].tolist(), order[shuffled].tolist(), strict=True))
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})
    assert len(pairs) < len(hashes)


def test_a_negative_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 0"):
        group_near_duplicates(["0123456789abcdef"], -1)


def test_images_under_the_grid_size_only_join_identical_hashes() -> None:
    limits = distance_limits([8, 31, 32, 500], [8, 64, 32, 20], 8)
    assert limits.tolist() == [0, 0, 8, 0]
