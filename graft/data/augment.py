"""Augmentation and normalisation of whole uint8 batches, with random parameters per image.

Batches read from the memory-mapped cache arrive as one uint8 tensor (B, 3, H, W), possibly
already on the GPU. A torchvision v2 transform applied to such a tensor would give every image
the same random parameters, so :class:`BatchTransform` draws one angle, shift and flip per
image and applies all of them with a single ``affine_grid`` + ``grid_sample`` call.

The parameters are drawn on the CPU from a caller-supplied :class:`torch.Generator` and never
from the process-wide RNG: the result is then the same on every device (up to the float
rounding of ``grid_sample``), and a resumed run that restores the generator's state draws the
same parameters again.

Draw order, for a batch of ``B`` images (each step only when its option is on, so switching an
option off changes the draws of the ones after it):

1. ``rotation > 0``: ``B`` angles, uniform in [-rotation, rotation) degrees;
2. ``translate > 0``: ``B`` horizontal shifts, then ``B`` vertical shifts, uniform in
   [-translate * W, translate * W) and [-translate * H, translate * H) pixels, each rounded to
   the nearest whole pixel (as torchvision's ``RandomAffine`` does);
3. ``hflip``: ``B`` flips, each with probability 0.5.

Each step is one vectorised ``torch.rand(B, dtype=float64)`` call, so the draws of a batch of
``B`` images are not the draws of two batches of ``B / 2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from graft.config.params import Augment

__all__ = ["AugmentParams", "BatchTransform", "affine_matrices", "draw_params"]


@dataclass(frozen=True)
class AugmentParams:
    """The random parameters of one batch, one row per image, all on the CPU.

    A field is None when its option is off (nothing was drawn for it).

    ``angle``: float64 (B,), degrees; positive turns the picture clockwise as displayed
    (y pointing down), torchvision's ``F.affine`` convention. ``shift``: float64 (B, 2),
    whole pixels (dx, dy); positive moves the picture right and down. ``flip``: bool (B,),
    True mirrors the picture left to right after rotating and shifting it.
    """

    angle: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    flip: torch.Tensor | None = None

    def __len__(self) -> int:
        for field in (self.angle, self.shift, self.flip):
            if field is not None:
                return len(field)
        return 0

    def rows(self, start: int, stop: int) -> AugmentParams:
        """The parameters of images ``start`` to ``stop`` (exclusive) of the batch."""

        def part(field: torch.Tensor | None) -> torch.Tensor | None:
            return None if field is None else field[start:stop]

        return AugmentParams(part(self.angle), part(self.shift), part(self.flip))

    @property
    def is_geometric(self) -> bool:
        """Whether a rotation or shift was drawn (these need resampling; a flip alone does not)."""
        return self.angle is not None or self.shift is not None


def draw_params(
    augment: Augment, count: int, height: int, width: int, generator: torch.Generator
) -> AugmentParams:
    """Draw the parameters of ``count`` images of ``height`` x ``width`` pixels from ``generator``.

    Draws in the order given in the module docstring, only for the options that are on, and
    advances ``generator`` by exactly those draws. Raises ValueError when ``generator`` is not
    a CPU generator or ``count`` is negative.
    """
    if generator.device.type != "cpu":
        raise ValueError(f"augmentation draws from a CPU generator, got one on {generator.device}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")

    def uniform(bound: float) -> torch.Tensor:
        # float64 so the angles and shifts carry no float32 rounding into the matrices.
        values = torch.rand(count, dtype=torch.float64, generator=generator)
        return values.mul_(2 * bound).sub_(bound)

    angle = uniform(augment.rotation) if augment.rotation else None
    shift = None
    if augment.translate:
        dx = uniform(augment.translate * width)
        dy = uniform(augment.translate * height)
        # Whole pixels, as RandomAffine: a shift alone then moves pixel centres onto pixel
        # centres and bilinear sampling copies them instead of blurring.
        shift = torch.stack((dx, dy), dim=1).round_()
    flip = None
    if augment.hflip:
        flip = torch.rand(count, dtype=torch.float64, generator=generator) < 0.5
    return AugmentParams(angle=angle, shift=shift, flip=flip)


def affine_matrices(params: AugmentParams, height: int, width: int) -> torch.Tensor:
    """The ``affine_grid`` matrices, float64 (B, 2, 3), that apply ``params`` to H x W images.

    Each maps an output pixel to the point it is sampled from, in ``grid_sample``'s normalised
    coordinates with ``align_corners=False`` (-1 and 1 are the outer edges of the border
    pixels). The picture turns about its centre, then shifts, then mirrors, which is the order
    of the per-image v2 pipeline (``RandomAffine`` then ``RandomHorizontalFlip``).
    """
    count = len(params)
    angle = params.angle if params.angle is not None else torch.zeros(count, dtype=torch.float64)
    shift = params.shift if params.shift is not None else torch.zeros(count, 2, dtype=torch.float64)
    radians = torch.deg2rad(angle.to(torch.float64))
    cos, sin = torch.cos(radians), torch.sin(radians)
    # The forward map in pixel units about the centre is p_out = R p_in + t with
    # R = [[cos, -sin], [sin, cos]]; sampling needs its inverse, p_in = R^T (p_out - t).
    # A flip after it means p_out = F q with F = diag(-1, 1), so the first column of the
    # inverse (the one multiplying q's x) changes sign.
    mirror = torch.ones(count, dtype=torch.float64)
    if params.flip is not None:
        mirror = torch.where(params.flip, -1.0, 1.0).to(torch.float64)
    tx, ty = shift[:, 0].to(torch.float64), shift[:, 1].to(torch.float64)
    m00, m01 = cos * mirror, sin
    m10, m11 = -sin * mirror, cos
    m02 = -(cos * tx + sin * ty)
    m12 = sin * tx - cos * ty
    # From pixel units to normalised ones: x_norm = x_px / (W / 2), y_norm = y_px / (H / 2).
    # Dividing by the sides rather than by (side - 1) is what align_corners=False means.
    half_w, half_h = width / 2, height / 2
    rows = (
        torch.stack((m00, m01 * half_h / half_w, m02 / half_w), dim=1),
        torch.stack((m10 * half_w / half_h, m11, m12 / half_h), dim=1),
    )
    return torch.stack(rows, dim=1)


class BatchTransform:
    """uint8 image batches to normalised float32 ones, each image augmented on its own.

    ``mean`` and ``std`` are per channel on the 0-1 scale; ``augment`` None means no
    augmentation. Raises ValueError when ``mean`` and ``std`` differ in length or a ``std`` is
    not above 0.
    """

    def __init__(
        self, mean: tuple[float, ...], std: tuple[float, ...], augment: Augment | None
    ) -> None:
        if len(mean) != len(std) or not mean:
            raise ValueError(f"mean and std need one value per channel, got {mean} and {std}")
        if min(std) <= 0:
            raise ValueError(f"every std must be > 0, got {std}")
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.augment = augment
        # Kept on the CPU and moved per call: a transform serves whatever device a batch is on.
        self._mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    @property
    def augments(self) -> bool:
        """Whether calls change the images beyond scaling and normalising them."""
        a = self.augment
        return a is not None and bool(a.rotation or a.translate or a.hflip)

    def __call__(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        within: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Augment (when on) and normalise ``images``, uint8 (B, C, H, W), on any device.

        Draws each image's parameters from ``generator`` (a CPU generator; see
        :func:`draw_params` for the order), and draws nothing when augmentation is off.
        ``within`` ``(start, whole)`` says that ``images`` are rows ``start`` to ``start + B``
        of a batch of ``whole`` split between processes: the parameters of the whole batch are
        drawn and these rows' applied, so every process draws alike and the images get what
        one process would give them. Returns float32 (B, C, H, W) on the device of
        ``images``. Raises ValueError when augmenting without a generator (the result would
        not be reproducible), and as :meth:`apply` does.
        """
        if not self.augments:
            return self.apply(images, AugmentParams())
        if generator is None:
            raise ValueError("augmentation needs a torch.Generator, so that runs are reproducible")
        assert self.augment is not None  # for mypy: self.augments says so
        count, _, height, width = _check_images(images, len(self.mean))
        start, whole = within or (0, count)
        if not 0 <= start <= start + count <= whole:
            raise ValueError(f"rows {start} to {start + count} are not within a batch of {whole}")
        drawn = draw_params(self.augment, whole, height, width, generator)
        return self.apply(images, drawn.rows(start, start + count))

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Apply the given per-image ``params`` to ``images``, then scale to 0-1 and normalise.

        ``images``: uint8 (B, C, H, W) with C = len(mean), any device; ``params``: as
        :func:`draw_params` returns them, for the same B (or all fields None). Returns float32
        (B, C, H, W) on the device of ``images``. With no rotation or shift the result is exact:
        ``(x / 255 - mean) / std`` computed as v2's ``ToDtype`` + ``Normalize`` compute it, of
        the image or of its mirror. Rotated or shifted images are resampled bilinearly and
        points from outside the picture are black (0 before normalising, as v2's default fill).
        Raises ValueError when ``images`` is not such a batch or ``params`` has another length.
        """
        count, _, height, width = _check_images(images, len(self.mean))
        if len(params) not in (0, count):
            raise ValueError(f"{len(params)} sets of parameters for {count} images")
        if count == 0 or not (params.is_geometric or params.flip is not None):
            return self._normalise(images.to(torch.float32))
        if not params.is_geometric:
            # A flip alone is a copy of pixels, not a resampling, so it stays exact.
            assert params.flip is not None  # for mypy: checked just above
            mirrored = params.flip.to(images.device).view(-1, 1, 1, 1)
            return self._normalise(torch.where(mirrored, images.flip(-1), images).to(torch.float32))
        theta = affine_matrices(params, height, width).to(device=images.device, dtype=torch.float32)
        # align_corners=False: the grid spans the pixels' outer edges, so rotating about 0
        # rotates about the picture's true centre, a shift of k pixels is exactly k / (W / 2),
        # and the result matches torchvision's own affine. Bilinear: nearest (v2's default)
        # makes jagged edges on rotated pictures, and the output is float anyway, so nothing
        # is lost to rounding. padding_mode="zeros" fills outside points with black.
        grid = F.affine_grid(theta, [count, images.shape[1], height, width], align_corners=False)
        resampled = F.grid_sample(
            images.to(torch.float32), grid, mode="bilinear", padding_mode="zeros",
            align_corners=False,
        )  # fmt: skip
        return self._normalise(resampled)

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        # The very operations of v2.ToDtype(float32, scale=True) and v2.Normalize, in their
        # order, so the result matches theirs bit for bit (x * (1/255) is not always x / 255).
        mean = self._mean.to(pixels.device)
        std = self._std.to(pixels.device)
        return pixels.mul_(1.0 / 255).sub_(mean).div_(std)


def _check_images(images: torch.Tensor, channels: int) -> tuple[int, int, int, int]:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != channels:
        raise ValueError(
            f"expected uint8 images (B, {channels}, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    count, got_channels, height, width = images.shape
    return count, got_channels, height, width
