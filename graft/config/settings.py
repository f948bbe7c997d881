"""The stage sections of params.yaml: common, ingest, split, pretrain, finetune, evaluate, register.

Validation here is pure: types, ranges, key names and how values relate to each other. Whether
the settings fit this machine (source folders present, architecture known to this torchvision)
is :mod:`graft.config.checks`' business, so params can be validated anywhere.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_MIN_SIDE = 8
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold
DEFAULT_DECODE_MEMORY_MB = 2048  # room for a max_pixels RGBA image and its conversions
MIN_DECODE_MEMORY_MB = 256  # a decoding process's own libraries take about 110 MiB
DEFAULT_DECODE_TIMEOUT_S = 60.0
DEFAULT_PNG_MAX_TEXT_CHUNK = 1024 * 1024  # Pillow's own PngImagePlugin.MAX_TEXT_CHUNK
DEFAULT_PNG_MAX_TEXT_MEMORY = 64 * 1024 * 1024  # Pillow's own PngImagePlugin.MAX_TEXT_MEMORY
DEFAULT_NEAR_DUPLICATE_DISTANCE = 8  # bits of 64 in which two perceptual hashes may differ
DEFAULT_CALIBRATION_BINS = 15  # as in Guo et al. 2017, the usual choice for ECE
Role = Literal["pretrain", "target"]
ROLES: tuple[Role, ...] = ("pretrain", "target")


class StrictModel(BaseModel):
    """Base of every params section: unknown keys are errors and values are frozen.

    A typo must never silently fall back to a default, so an extra key raises pydantic's
    ``ValidationError`` (reported as ``unknown key`` by :func:`graft.config.params.parse_params`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


class Distributed(StrictModel):
    """``common.distributed``: how many processes train one model together (DDP, torchrun).

    ``nproc_per_node`` processes on each of ``nnodes`` machines; their product is the world
    size. A result setting: ``batch_size`` stays the global batch, split between the
    processes, but the sums of a step are taken in another order, so weights differ in the
    last bits (and BatchNorm statistics per process unless ``sync_batchnorm``, which needs
    CUDA). Left out of params.yaml, training runs in one process as before.
    """

    nproc_per_node: int = Field(default=1, ge=1, le=1024)
    nnodes: int = Field(default=1, ge=1, le=1024)
    sync_batchnorm: bool = False  # BatchNorm statistics over the global batch (CUDA only)

    @property
    def world_size(self) -> int:
        """Processes in all: ``nproc_per_node * nnodes``."""
        return self.nproc_per_node * self.nnodes


class Common(StrictModel):
    """``common``: seed, input size and normalisation, device and loader settings of every stage.

    ``image_size`` is in pixels (8 to 1024; images are resized to a square of that side);
    ``mean`` and ``std`` are per-channel (RGB) on the 0-1 scale, every ``std`` above 0.
    ``distributed`` (optional) makes pretrain, finetune and baseline data-parallel.
    """

    seed: int = Field(ge=0)
    image_size: int = Field(ge=8, le=1024)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    num_workers: int = Field(default=0, ge=0)
    pin_memory: bool = False  # page-locked batches: faster copies to a CUDA device
    amp: bool = True  # mixed precision (float16 autocast + gradient scaling); CUDA only
    channels_last: bool = False  # NHWC memory format: faster convolutions on recent GPUs
    # Optional, so that a params.yaml without it records in dvc.lock (and the model card)
    # exactly what it recorded before data-parallel training existed.
    distributed: Distributed | None = None

    @property
    def processes(self) -> Distributed:
        """``distributed``, or one process on one node when params.yaml leaves it out."""
        return self.distributed or Distributed()

    @field_validator("std")
    @classmethod
    def _positive_std(cls, std: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(std) <= 0:
            raise ValueError("every std must be > 0")
        return std


class Source(StrictModel):
    """``ingest.sources.<role>``: an ImageFolder-layout folder and its rejection budget.

    ``uri`` is kept as written (relative paths are relative to the folder holding params.yaml);
    it is not looked up here: :func:`graft.config.checks.check_sources` does that.
    ``max_reject_fraction`` is a fraction of the source's files, 0 to 1.
    """

    uri: Path
    max_reject_fraction: float = Field(default=0.05, ge=0, le=1)


class Sources(StrictModel):
    """``ingest.sources``: one source per role."""

    pretrain: Source
    target: Source

    def for_role(self, role: Role) -> Source:
        """The source of ``role`` (``"pretrain"`` or ``"target"``)."""
        return self.pretrain if role == "pretrain" else self.target


class Ingest(StrictModel):
    """``ingest``: the sources, the limits behind the verdicts and the class contract.

    ``min_side`` is in pixels, ``max_pixels`` is width x height in pixels (Pillow's own
    decompression-bomb guard is set to it too). Each file is decoded in a worker process whose
    memory is capped at ``decode_memory_mb`` MiB and which is stopped after ``decode_timeout_s``
    seconds on one file (verdicts ``too_large`` and ``timeout``). ``png_max_text_chunk`` and
    ``png_max_text_memory`` (bytes) are Pillow's limits on one PNG text chunk and on all of a
    file's text chunks. ``lost_class`` says what a class folder with no accepted image does:
    ``fail`` the stage (the default) or ``warn``. ``workers`` is the number of verification
    processes, 0 for one per available core.
    """

    sources: Sources
    min_side: int = Field(default=DEFAULT_MIN_SIDE, ge=1)
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)
    decode_memory_mb: int = Field(default=DEFAULT_DECODE_MEMORY_MB, ge=MIN_DECODE_MEMORY_MB)
    decode_timeout_s: float = Field(default=DEFAULT_DECODE_TIMEOUT_S, gt=0)
    png_max_text_chunk: int = Field(default=DEFAULT_PNG_MAX_TEXT_CHUNK, ge=1)
    png_max_text_memory: int = Field(default=DEFAULT_PNG_MAX_TEXT_MEMORY, ge=1)
    lost_class: Literal["fail", "warn"] = "fail"
    workers: int = Field(default=0, ge=0)  # 0: one per available core


class Fractions(StrictModel):
    """``split.<role>``: per-class fractions of train, val and test, which must sum to 1.

    ``train`` and ``val`` are above 0; ``test`` may be 0 (no test split for that role).
    """

    train: float = Field(gt=0, le=1)
    val: float = Field(gt=0, le=1)
    test: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> Fractions:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        return self


class NearDuplicates(StrictModel):
    """``split.near_duplicates``: how near-identical images are kept out of two splits.

    Images whose 64-bit perceptual hashes differ in at most ``max_distance`` bits form one
    group, and a group lands in one split. ``pretrain_overlap`` says what a target image that
    also appears, exactly or nearly, in the pretraining corpus does: ``report`` it (split
    report, metrics, model card) or ``exclude`` it from the target splits.
    """

    max_distance: int = Field(default=DEFAULT_NEAR_DUPLICATE_DISTANCE, ge=0, le=32)
    pretrain_overlap: Literal["report", "exclude"] = "report"


class Split(StrictModel):
    """``split``: the fractions of each role and the near-duplicate rule."""

    pretrain: Fractions
    target: Fractions
    near_duplicates: NearDuplicates = NearDuplicates()

    def for_role(self, role: Role) -> Fractions:
        """The fractions of ``role`` (``"pretrain"`` or ``"target"``)."""
        return self.pretrain if role == "pretrain" else self.target


class Augment(StrictModel):
    """Training-time augmentation: ``rotation`` in degrees (0-180), ``translate`` as a fraction
    of the image side (0 to below 1), ``hflip`` for random horizontal flips."""

    rotation: float = Field(default=0, ge=0, le=180)
    translate: float = Field(default=0, ge=0, lt=1)
    hflip: bool = False


class Pretrain(StrictModel):
    """``pretrain``: the backbone's architecture, starting weights and training recipe.

    ``arch`` is any name here; :func:`graft.config.checks.check_arch` checks that this
    torchvision knows it. ``init`` is ``scratch``, ``imagenet``, ``imagenet:<weights name>`` or
    the path of a graft checkpoint; ``epochs`` 0 passes the init weights through untrained,
    which ``scratch`` cannot. ``lr`` and ``weight_decay`` are AdamW's.
    """

    arch: str
    init: str = "scratch"
    epochs: int = Field(ge=0)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(default=0, ge=0)
    patience: int = Field(ge=1)
    augment: Augment

    @model_validator(mode="after")
    def _scratch_needs_training(self) -> Pretrain:
        if self.init == "scratch" and self.epochs == 0:
            raise ValueError("epochs: 0 passes the init weights through; init scratch has none")
        return self


class HeadPhase(StrictModel):
    """``finetune.head``: phase 1, the new head trained on a frozen backbone.

    ``scope`` ``top_module`` trains the whole module holding the last linear layer (VGG's
    classifier), ``last_layer`` only the new last linear layer. Head inputs are computed once
    per view: ``views`` 0 is one unaugmented pass, k is k augmented passes (at most 100).
    """

    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)
    scope: Literal["top_module", "last_layer"] = "top_module"
    views: int = Field(default=0, ge=0, le=100)


class UnfreezePhase(StrictModel):
    """``finetune.unfreeze``: phase 2, the deepest ``blocks`` backbone blocks (or ``"all"``)
    trained at ``lr`` beside the head at ``head_lr``; ``epochs`` 0 skips the phase."""

    blocks: Annotated[int, Field(ge=0)] | Literal["all"]
    epochs: int = Field(ge=0)
    lr: float = Field(gt=0)
    head_lr: float = Field(gt=0)


class Finetune(StrictModel):
    """``finetune``: the recipe shared by the ``finetune`` and ``baseline`` stages."""

    batch_size: int = Field(ge=1)
    patience: int = Field(ge=1)
    augment: Augment
    head: HeadPhase
    unfreeze: UnfreezePhase


class Evaluate(StrictModel):
    """``evaluate``: batch size, equal-width confidence bins for the expected calibration error
    (1 to 1000) and how many images the mistakes grid shows at most (1 to 400)."""

    batch_size: int = Field(ge=1)
    calibration_bins: int = Field(default=DEFAULT_CALIBRATION_BINS, ge=1, le=1000)
    misclassified: int = Field(default=16, ge=1, le=400)


class Register(StrictModel):
    """``register``: the model's name and the gate on its test metrics (fractions, 0 to 1).

    ``max_drop_vs_prod`` is checked by ``graft publish``, which reads the production version
    from git tags; a DVC stage may not, or its result would depend on something dvc.lock does
    not record.
    """

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*[a-z0-9]$")
    min_accuracy: float = Field(ge=0, le=1)
    min_class_recall: float = Field(ge=0, le=1)
    max_drop_vs_prod: float = Field(default=0.0, ge=0, le=1)
