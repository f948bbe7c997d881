"""params.yaml loaded once into validated, typed settings.

Every stage calls :func:`load_params` before doing any work, so a misspelt key, a value of the
wrong type, fractions that do not sum to one or a missing source folder stop the run at once
with a message that names the key.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from graft.errors import GraftError

DEFAULT_PARAMS = Path("params.yaml")
DEFAULT_MIN_SIDE = 8
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold
DEFAULT_CALIBRATION_BINS = 15  # as in Guo et al. 2017, the usual choice for ECE
Role = Literal["pretrain", "target"]
ROLES: tuple[Role, ...] = ("pretrain", "target")


class ParamsError(GraftError):
    """params.yaml is missing, malformed or has a bad key or value."""


class _Strict(BaseModel):
    # Unknown keys are errors: a typo must never silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Common(_Strict):
    seed: int = Field(ge=0)
    image_size: int = Field(ge=8, le=1024)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    num_workers: int = Field(default=0, ge=0)
    pin_memory: bool = False  # page-locked batches: faster copies to a CUDA device
    amp: bool = True  # mixed precision (float16 autocast + gradient scaling); CUDA only
    channels_last: bool = False  # NHWC memory format: faster convolutions on recent GPUs

    @field_validator("std")
    @classmethod
    def _positive_std(cls, std: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(std) <= 0:
            raise ValueError("every std must be > 0")
        return std


class IngestPaths(_Strict):
    dataset: Path
    rejected: Path
    summary: Path
    metrics: Path
    cache: Path  # not a pipeline output: ingest's private, content-keyed speed-up


class SplitPaths(_Strict):
    splits: Path
    summary: Path
    metrics: Path


class TrainPaths(_Strict):
    checkpoint: Path
    metrics: Path
    history: Path
    resume: Path | None = None  # per-epoch state of an interrupted run; None: never resume


class EvaluatePaths(_Strict):
    metrics: Path
    predictions: Path
    calibration: Path  # reliability diagram table
    roc: Path  # ROC curve table (rows only for two classes)
    misclassified: Path  # PNG grid of the most confident mistakes


class RegisterPaths(_Strict):
    package: Path
    lineage_index: Path  # not a pipeline output: `graft lineage`'s index, rebuilt on demand


class Paths(_Strict):
    ingest: IngestPaths
    split: SplitPaths
    pretrain: TrainPaths
    finetune: TrainPaths
    baseline: TrainPaths  # the finetune recipe from random weights
    evaluate: EvaluatePaths
    # "register" would shadow BaseModel.register (from ABCMeta); the YAML key stays "register".
    registry: RegisterPaths = Field(alias="register")


class Source(_Strict):
    uri: Path
    max_reject_fraction: float = Field(default=0.05, ge=0, le=1)

    @field_validator("uri")
    @classmethod
    def _folder_exists(cls, uri: Path, info: ValidationInfo) -> Path:
        # Relative paths are relative to the project root, where params.yaml lives.
        root = (info.context or {}).get("root", Path("."))
        if not (root / uri).is_dir():
            raise ValueError(f"source folder {str(uri)!r} does not exist or is not a folder")
        return uri


class Sources(_Strict):
    pretrain: Source
    target: Source

    def for_role(self, role: Role) -> Source:
        return self.pretrain if role == "pretrain" else self.target


class Ingest(_Strict):
    sources: Sources
    min_side: int = Field(default=DEFAULT_MIN_SIDE, ge=1)
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)
    workers: int = Field(default=0, ge=0)  # 0: one per available core


class Fractions(_Strict):
    train: float = Field(gt=0, le=1)
    val: float = Field(gt=0, le=1)
    test: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> Fractions:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        return self


class Split(_Strict):
    pretrain: Fractions
    target: Fractions

    def for_role(self, role: Role) -> Fractions:
        return self.pretrain if role == "pretrain" else self.target


class Augment(_Strict):
    rotation: float = Field(default=0, ge=0, le=180)
    translate: float = Field(default=0, ge=0, lt=1)
    hflip: bool = False


class Pretrain(_Strict):
    arch: str
    # scratch | imagenet | imagenet:<weights name> | path of a graft checkpoint (tasks/weights.py)
    init: str = "scratch"
    epochs: int = Field(ge=0)  # 0: pass the init weights through untrained (not with scratch)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(default=0, ge=0)
    patience: int = Field(ge=1)
    augment: Augment

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        from graft.training.models import check_arch  # torchvision import only when validating

        check_arch(arch)
        return arch

    @model_validator(mode="after")
    def _scratch_needs_training(self) -> Pretrain:
        if self.init == "scratch" and self.epochs == 0:
            raise ValueError("epochs: 0 passes the init weights through; init scratch has none")
        return self


class HeadPhase(_Strict):
    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)
    # top_module: the whole module holding the last linear layer (VGG's classifier);
    # last_layer: only the new last linear layer (the backbone's other layers stay frozen).
    scope: Literal["top_module", "last_layer"] = "top_module"
    # Head inputs are computed once per view: 0 = one unaugmented pass, k = k augmented passes.
    views: int = Field(default=0, ge=0, le=100)


class UnfreezePhase(_Strict):
    blocks: Annotated[int, Field(ge=0)] | Literal["all"]
    epochs: int = Field(ge=0)
    lr: float = Field(gt=0)
    head_lr: float = Field(gt=0)


class Finetune(_Strict):
    batch_size: int = Field(ge=1)
    patience: int = Field(ge=1)
    augment: Augment
    head: HeadPhase
    unfreeze: UnfreezePhase


class Evaluate(_Strict):
    batch_size: int = Field(ge=1)
    # Equal-width bins of top-class confidence for the expected calibration error.
    calibration_bins: int = Field(default=DEFAULT_CALIBRATION_BINS, ge=1, le=1000)
    misclassified: int = Field(default=16, ge=1, le=400)  # images in the mistakes grid, at most


class Register(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*[a-z0-9]$")
    min_accuracy: float = Field(ge=0, le=1)
    min_class_recall: float = Field(ge=0, le=1)
    # Checked by `graft publish`, which reads the production version from git tags; a DVC
    # stage may not, or its result would depend on something dvc.lock does not record.
    max_drop_vs_prod: float = Field(default=0.0, ge=0, le=1)


class Run(_Strict):
    """How `graft run` and the flow run stages; not DVC params, as no result depends on them."""

    timeout_s: dict[str, float]  # per stage name, "default" for the others
    lock_retries: int = Field(default=5, ge=0)

    @field_validator("timeout_s")
    @classmethod
    def _positive_with_default(cls, timeouts: dict[str, float]) -> dict[str, float]:
        if "default" not in timeouts:
            raise ValueError("needs a 'default' entry for stages not named")
        if min(timeouts.values()) <= 0:
            raise ValueError("every timeout must be > 0 seconds")
        return timeouts

    def timeout_for(self, stage: str) -> float:
        return self.timeout_s.get(stage, self.timeout_s["default"])


class Params(_Strict):
    common: Common
    paths: Paths
    ingest: Ingest
    split: Split
    pretrain: Pretrain
    finetune: Finetune
    evaluate: Evaluate
    registry: Register = Field(alias="register")  # see Paths.registry
    run: Run


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "missing key"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def parse_params(raw: object, origin: str = "params", root: Path = Path(".")) -> Params:
    """Validate an already-parsed params mapping; relative source paths are under ``root``."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{origin}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate(raw, context={"root": root})
    except ValidationError as error:
        raise ParamsError(f"{origin} has bad settings:\n{_describe(error)}") from None


def load_params(path: Path = DEFAULT_PARAMS) -> Params:
    """Read and validate params.yaml; raise ParamsError naming every bad key."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path} not found (run from the project root)") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path} is not valid YAML: {error}") from None
    return parse_params(raw, origin=str(path), root=path.parent)
