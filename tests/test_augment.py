"""Whole-batch augmentation: exact normalisation, per-image randomness, determinism, geometry."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from graft.config.params import Augment
from graft.data.augment import AugmentParams, BatchTransform, affine_matrices, draw_params

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
ALL_ON = Augment(rotation=30, translate=0.2, hflip=True)


def _images(count: int, height: int = 16, width: int = 20, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, height, width), dtype=torch.uint8, generator=generator)


def _v2_normalise(images: torch.Tensor) -> torch.Tensor:
    steps = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(MEAN), list(STD))])
    return torch.stack([steps(image) for image in images])


def _one_pixel(height: int, width: int, row: int, col: int) -> torch.Tensor:
    image = torch.zeros(1, 3, height, width, dtype=torch.uint8)
    image[0, :, row, col] = 255
    return image


def _unit(pixels: torch.Tensor) -> torch.Tensor:
    """A transform with mean 0 and std 1 returns pixels / 255; back to the 0-255 scale."""
    return pixels * 255


@pytest.mark.parametrize("augment", [None, Augment(), Augment(rotation=0, translate=0)])
def test_without_augmentation_it_is_v2_todtype_and_normalize_bit_for_bit(
    augment: Augment | None,
) -> None:
    images = _images(8, 17, 23)
    out = BatchTransform(MEAN, STD, augment)(images)  # no generator needed
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert torch.equal(out, _v2_normalise(images))


def test_each_image_gets_its_own_parameters() -> None:
    transform = BatchTransform(MEAN, STD, Augment(rotation=45, translate=0.2))
    twins = _images(1).expand(2, -1, -1, -1)
    differ = sum(
        not torch.equal(*transform(twins, torch.Generator().manual_seed(seed)))
        for seed in range(20)
    )
    assert differ >= 18  # equal only if both drew the same angle and shift


def test_a_batch_equals_its_images_one_by_one() -> None:
    images = _images(6)
    transform = BatchTransform(MEAN, STD, ALL_ON)
    params = draw_params(ALL_ON, 6, 16, 20, torch.Generator().manual_seed(3))
    assert params.flip is not None and 0 < int(params.flip.sum()) < 6  # both kinds present
    batch = transform.apply(images, params)
    assert torch.equal(batch, transform(images, torch.Generator().manual_seed(3)))
    for i in range(6):
        one = AugmentParams(
            *(
                None if f is None else f[i : i + 1]
                for f in (params.angle, params.shift, params.flip)
            )
        )
        torch.testing.assert_close(transform.apply(images[i : i + 1], one), batch[i : i + 1])


def test_the_same_seed_gives_the_same_output_and_the_state_advances() -> None:
    images = _images(5)
    transform = BatchTransform(MEAN, STD, ALL_ON)
    first = transform(images, torch.Generator().manual_seed(7))
    assert torch.equal(first, transform(images, torch.Generator().manual_seed(7)))
    generator = torch.Generator().manual_seed(7)
    state = generator.get_state()
    assert torch.equal(transform(images, generator), first)
    assert not torch.equal(transform(images, generator), first)  # the generator moved on
    generator.set_state(state)  # as a resumed run restores it
    assert torch.equal(transform(images, generator), first)
    assert first.shape == images.shape and first.dtype == torch.float32
    assert first.device == images.device


def test_draws_only_what_is_on_in_a_fixed_order() -> None:
    seed = torch.Generator().manual_seed(11)
    u = torch.rand(5 * 4, dtype=torch.float64, generator=seed).view(4, 5)
    params = draw_params(ALL_ON, 5, 10, 40, torch.Generator().manual_seed(11))
    assert params.angle is not None and params.shift is not None and params.flip is not None
    torch.testing.assert_close(params.angle, u[0] * 60 - 30)
    torch.testing.assert_close(params.shift[:, 0], (u[1] * 16 - 8).round())  # 0.2 * 40 wide
    torch.testing.assert_close(params.shift[:, 1], (u[2] * 4 - 2).round())  # 0.2 * 10 high
    assert torch.equal(params.flip, u[3] < 0.5)
    flip_only = draw_params(Augment(hflip=True), 5, 10, 40, torch.Generator().manual_seed(11))
    assert flip_only.angle is None and flip_only.shift is None
    assert flip_only.flip is not None and torch.equal(flip_only.flip, u[0] < 0.5)
    assert params.angle.abs().max() <= 30
    assert (params.shift.abs() <= torch.tensor([8.0, 2.0], dtype=torch.float64)).all()


def test_nothing_process_wide_is_drawn() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    BatchTransform(MEAN, STD, ALL_ON)(_images(4), torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), before)


def test_a_quarter_turn_is_clockwise_about_the_centre() -> None:
    transform = BatchTransform((0.0,) * 3, (1.0,) * 3, None)
    top_middle = _one_pixel(5, 5, 0, 2)
    turned = transform.apply(top_middle, AugmentParams(angle=torch.tensor([90.0])))
    right_middle = transform.apply(_one_pixel(5, 5, 2, 4), AugmentParams())
    torch.testing.assert_close(_unit(turned), _unit(right_middle), atol=1e-3, rtol=0)


def test_a_shift_of_k_pixels_moves_a_pixel_by_k() -> None:
    transform = BatchTransform((0.0,) * 3, (1.0,) * 3, None)
    shift = AugmentParams(shift=torch.tensor([[3.0, -2.0]], dtype=torch.float64))
    moved = transform.apply(_one_pixel(8, 10, 4, 2), shift)
    expected = transform.apply(_one_pixel(8, 10, 2, 5), AugmentParams())
    torch.testing.assert_close(_unit(moved), _unit(expected), atol=1e-3, rtol=0)
    gone = transform.apply(_one_pixel(8, 10, 4, 8), shift)  # pushed off the right edge
    assert _unit(gone).abs().max() < 1e-3  # and black came in


def test_a_flip_alone_is_exact() -> None:
    images = _images(6)
    flip = torch.tensor([True, False, True, True, False, False])
    transform = BatchTransform(MEAN, STD, Augment(hflip=True))
    out = transform.apply(images, AugmentParams(flip=flip))
    expected = _v2_normalise(torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images))
    assert torch.equal(out, expected)
    drawn = draw_params(Augment(hflip=True), 6, 16, 20, torch.Generator().manual_seed(1))
    called = transform(images, torch.Generator().manual_seed(1))
    assert torch.equal(called, transform.apply(images, drawn))


@pytest.mark.parametrize(
    ("angle", "shift", "flip"), [(17.5, (3, -1), False), (-120.0, (0, 4), True)]
)
def test_it_matches_torchvision_affine_then_flip(
    angle: float, shift: tuple[int, int], flip: bool
) -> None:
    images = _images(1, 16, 20)
    transform = BatchTransform(MEAN, STD, ALL_ON)
    params = AugmentParams(
        angle=torch.tensor([angle], dtype=torch.float64),
        shift=torch.tensor([shift], dtype=torch.float64),
        flip=torch.tensor([flip]),
    )
    reference = TF.affine(
        images.float(), angle=angle, translate=list(shift), scale=1.0, shear=[0.0, 0.0],
        interpolation=v2.InterpolationMode.BILINEAR,
    )  # fmt: skip
    if flip:
        reference = TF.horizontal_flip(reference)
    expected = TF.normalize(reference / 255, list(MEAN), list(STD))
    torch.testing.assert_close(transform.apply(images, params), expected, atol=1e-4, rtol=0)


def test_the_matrices_of_no_change_are_the_identity() -> None:
    params = AugmentParams(
        angle=torch.zeros(2, dtype=torch.float64), shift=torch.zeros(2, 2, dtype=torch.float64)
    )
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    assert torch.equal(affine_matrices(params, 7, 9), identity.expand(2, 2, 3))


def test_augmenting_without_a_generator_is_refused() -> None:
    with pytest.raises(ValueError, match="Generator"):
        BatchTransform(MEAN, STD, Augment(rotation=10))(_images(2))


@pytest.mark.parametrize(
    "images",
    [
        torch.zeros(2, 3, 4, 4),
        torch.zeros(3, 4, 4, dtype=torch.uint8),
        torch.zeros(2, 1, 4, 4, dtype=torch.uint8),
    ],
)
def test_bad_batches_are_refused(images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="uint8"):
        BatchTransform(MEAN, STD, None)(images)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="per channel"):
        BatchTransform(MEAN, STD[:2], None)
    with pytest.raises(ValueError, match="std"):
        BatchTransform(MEAN, (0.2, 0.0, 0.2), None)
    two = draw_params(ALL_ON, 2, 16, 20, torch.Generator())
    with pytest.raises(ValueError, match="sets of parameters"):
        BatchTransform(MEAN, STD, ALL_ON).apply(_images(3), two)


def test_an_empty_batch_passes_through() -> None:
    out = BatchTransform(MEAN, STD, ALL_ON)(_images(0), torch.Generator().manual_seed(0))
    assert out.shape == (0, 3, 16, 20) and out.dtype == torch.float32


@pytest.mark.gpu
def test_cuda_gives_what_the_cpu_gives() -> None:
    images = _images(16, 32, 32)
    for augment in (None, Augment(hflip=True), ALL_ON):
        transform = BatchTransform(MEAN, STD, augment)
        cpu = transform(images, torch.Generator().manual_seed(5))
        cuda = transform(images.cuda(), torch.Generator().manual_seed(5))
        assert cuda.device.type == "cuda" and cuda.dtype == torch.float32
        torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-4, rtol=0)
