"""params.yaml loaded once into validated, typed settings.

Every stage calls :func:`load_params` before doing any work, so a misspelt key, a value of the
wrong type or fractions that do not sum to one stop the run at once with a message that names
the key. Validation is pure: it reads nothing but the mapping it is given. What depends on this
machine (source folders, the installed torchvision) is checked by :mod:`graft.config.checks`.

This module is the one entry point to the settings: the sections are defined in
:mod:`graft.config.settings` and :mod:`graft.config.paths` and exported from here with
:class:`Params` itself, so callers import every settings type from one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, ValidationError, field_validator

from graft.config.paths import (
    EvaluatePaths,
    FiguresPaths,
    IngestPaths,
    Paths,
    RegisterPaths,
    SplitPaths,
    TrainPaths,
)
from graft.config.settings import (
    DEFAULT_CALIBRATION_BINS,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    ROLES,
    Augment,
    Common,
    Distributed,
    Evaluate,
    Finetune,
    Fractions,
    HeadPhase,
    Ingest,
    NearDuplicates,
    Pretrain,
    Register,
    Role,
    Source,
    Sources,
    Split,
    StrictModel,
    UnfreezePhase,
)
from graft.config.yaml12 import YAMLSyntaxError, parse_yaml
from graft.errors import GraftError

__all__ = [
    "DEFAULT_CALIBRATION_BINS",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_SIDE",
    "DEFAULT_PARAMS",
    "ROLES",
    "Augment",
    "Common",
    "Distributed",
    "Evaluate",
    "EvaluatePaths",
    "FiguresPaths",
    "Finetune",
    "Fractions",
    "HeadPhase",
    "Ingest",
    "IngestPaths",
    "NearDuplicates",
    "Params",
    "ParamsError",
    "Paths",
    "Pretrain",
    "Register",
    "RegisterPaths",
    "Rendezvous",
    "Role",
    "Run",
    "Source",
    "Sources",
    "Split",
    "SplitPaths",
    "TrainPaths",
    "UnfreezePhase",
    "describe_problems",
    "load_params",
    "parse_params",
]

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(GraftError):
    """params.yaml is missing, malformed, has a bad key or value, or does not fit this machine."""


class Rendezvous(StrictModel):
    """``run.distributed``: where the processes of a data-parallel stage meet (torchrun's
    static rendezvous) and how long they wait for each other; not DVC params, as no result
    depends on them.

    ``master_addr``:``master_port`` is node 0's address, the same on every node (the default
    only reaches processes on this machine). ``rendezvous_timeout_s``: seconds every node waits
    for the others to join; ``collective_timeout_s``: seconds a process waits in one collective
    (a gradient sum, a broadcast) before the stage fails rather than hangs.
    """

    master_addr: str = Field(default="127.0.0.1", min_length=1)
    master_port: int = Field(default=29500, ge=1, le=65535)
    rendezvous_timeout_s: float = Field(default=600, gt=0)
    collective_timeout_s: float = Field(default=1800, gt=0)


def _pool_name(name: str) -> str:
    # Prefect takes almost any text as a work pool's name, but not an empty one, and a name
    # with a slash cannot be part of a deployment's "<flow>/<name>" address.
    if not name.strip():
        raise ValueError("a work pool's name cannot be empty")
    if "/" in name or name != name.strip():
        raise ValueError(f"{name!r} is not a work pool name: no '/', no surrounding spaces")
    return name


PoolName = Annotated[str, AfterValidator(_pool_name)]


class Run(StrictModel):
    """``run``: how `graft run` and the flow run stages; not DVC params, as no result depends on
    them. ``timeout_s`` maps stage names to seconds (every value above 0) and must hold a
    ``default`` entry for the stages not named; ``lock_retries`` counts retries while another
    DVC command holds the repository lock; ``distributed`` is the rendezvous of data-parallel
    training stages; ``placement`` maps stage names to the Prefect work pool whose worker runs
    them (a stage not named runs in the orchestrating workspace; flows/placement.py), and
    ``max_parallel`` caps the stages this workspace runs at the same time (placed ones do not
    count; 1: one after another, as `dvc repro` does). Stage names are checked against
    dvc.yaml by the flow, which knows them."""

    timeout_s: dict[str, float]
    lock_retries: int = Field(default=5, ge=0)
    distributed: Rendezvous = Rendezvous()
    placement: dict[str, PoolName] = Field(default_factory=dict)
    max_parallel: int = Field(default=1, ge=1)

    @field_validator("timeout_s")
    @classmethod
    def _positive_with_default(cls, timeouts: dict[str, float]) -> dict[str, float]:
        if "default" not in timeouts:
            raise ValueError("needs a 'default' entry for stages not named")
        if min(timeouts.values()) <= 0:
            raise ValueError("every timeout must be > 0 seconds")
        return timeouts

    def timeout_for(self, stage: str) -> float:
        """Seconds before ``stage`` is killed: its own entry, else the ``default`` one."""
        return self.timeout_s.get(stage, self.timeout_s["default"])


class Params(StrictModel):
    """The whole of params.yaml, one attribute per top-level section."""

    common: Common
    paths: Paths
    ingest: Ingest
    split: Split
    pretrain: Pretrain
    finetune: Finetune
    evaluate: Evaluate
    registry: Register = Field(alias="register")  # see Paths.registry
    run: Run


def describe_problems(origin: str, problems: list[tuple[str, str]]) -> str:
    """The one message format of every params problem: a header naming ``origin``, then one
    ``  <dotted key>: <what is wrong>`` line per ``(key, message)`` pair, in the given order."""
    lines = "\n".join(f"  {key}: {message}" for key, message in problems)
    return f"{origin} has bad settings:\n{lines}"


def _problems(error: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "missing key"
        problems.append((key, message))
    return problems


def parse_params(raw: object, origin: str = "params") -> Params:
    """Validate an already-parsed params mapping (as :func:`graft.config.yaml12.parse_yaml`
    returns it: the values DVC reads from the same file).

    Pure: checks types, ranges and key names only; nothing on disk is looked at. ``origin``
    names the source in messages. Raises ParamsError naming every bad key at once.
    """
    if not isinstance(raw, dict):
        raise ParamsError(f"{origin}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(describe_problems(origin, _problems(error))) from None


def load_params(path: Path = DEFAULT_PARAMS) -> Params:
    """Read and validate params.yaml at ``path`` (see :func:`parse_params`).

    The file is read as DVC reads it (YAML 1.2, see :mod:`graft.config.yaml12`), so the values
    a stage runs with are the ones dvc.lock records. Raises ParamsError when the file is
    missing, is not UTF-8 text, is not valid YAML or has bad settings, naming every bad key at
    once.
    """
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path} not found (run from the project root)") from None
    except UnicodeDecodeError:
        raise ParamsError(f"{path} is not UTF-8 text") from None
    except YAMLSyntaxError as error:
        raise ParamsError(f"{path} is not valid YAML: {error}") from None
    return parse_params(raw, origin=str(path))
