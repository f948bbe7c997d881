"""Which model a prediction uses: a reference resolved to weights, their version and settings.

A reference is anything ``graft lineage show`` accepts (graft/registry/lineage.py): a
published version (``name@vX.Y.Z``, ``name@latest``, ``name#stage``) or any git revision, whose
package is read at that commit from the DVC cache or remote (graft/registry/revisions.py), never
from the workspace; or a package folder or ``model.pt`` file on disk, used as it is and matched
to a published version by its sha256 when one has it.

The verification settings come with the model: the ``ingest`` section of params.yaml at its
commit, so new images are judged by the very limits its training images were.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from graft.config.settings import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE
from graft.data.verify import CheckSettings
from graft.errors import GraftError
from graft.hashing import sha256_hex
from graft.inference.records import UNPUBLISHED
from graft.registry.lineage import LineageError, Target, index_path, resolve
from graft.registry.lineage_index import open_index, refresh
from graft.registry.lineage_queries import versions_with_weights
from graft.registry.package_layout import CARD_JSON, WEIGHTS, card_file
from graft.registry.revisions import RevisionError, output_file, output_json, params_at
from graft.registry.versions import list_versions
from graft.training.checkpoints import (
    CheckpointError,
    CheckpointMeta,
    checkpoint_from_bytes,
    model_from_state,
)


class ModelSourceError(GraftError):
    """A model reference that names no usable model."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from, as every prediction row records it.

    ``ref`` is the reference as given; ``version`` the published version's tag
    (``digits-5-9@v1.0.0``) or :data:`UNPUBLISHED`; ``commit`` the git commit its package was
    read at (None for a file on disk that no published version holds); ``weights_sha256`` the
    sha256 of the ``model.pt`` bytes used; ``meta`` the checkpoint's metadata (architecture,
    classes, input size, mean and std); ``settings`` the verification limits.
    """

    ref: str
    version: str
    commit: str | None
    weights_sha256: str
    meta: CheckpointMeta
    settings: CheckSettings


def load_model(root: Path, ref: str) -> tuple[nn.Module, ModelSource]:
    """The network ``ref`` names (on the CPU, eval mode, weights loaded) and where it came from.

    ``root`` is the project (a git repository with params.yaml) that versions and revisions
    are looked up in; a file or folder ``ref`` needs no project. Raises ModelSourceError when
    ``ref`` names nothing usable: no version, revision or file; a package without model.pt; a
    file that is not a graft checkpoint; weights that do not fit their architecture and
    classes; or a model card whose architecture or classes disagree with the weights. Raises
    RevisionError (a GraftError) when git fails.
    """
    try:
        target: Target | None
        if Path(ref).exists():
            data, card = _from_disk(Path(ref))
            digest = sha256_hex(data)
            target = _published_with(root, digest)
        else:
            data, card, target = _from_revision(root, ref)
            digest = sha256_hex(data)
        name = f"{ref} (model.pt)" if target is None else f"{ref} at {target.commit[:12]}"
        state, meta = checkpoint_from_bytes(data, name)
        _check_card(card, meta, name)
        model = model_from_state(state, meta, name).eval()
    except (CheckpointError, LineageError) as error:
        raise ModelSourceError(f"model {ref}: {error}") from None
    version = target.version.tag if target is not None and target.version else UNPUBLISHED
    settings = _settings(root, target.commit if target else None)
    commit = target.commit if target is not None else None
    return model, ModelSource(ref, version, commit, digest, meta, settings)


def _from_disk(path: Path) -> tuple[bytes, dict[str, Any] | None]:
    """A package folder's or model file's bytes, and its card when beside it."""
    weights = path / WEIGHTS if path.is_dir() else path
    if not weights.is_file():
        raise ModelSourceError(f"model {path}: a folder without {WEIGHTS} (not a package)")
    if weights.suffix == ".pt2":
        raise ModelSourceError(
            f"model {path}: the exported program (for use without graft); give the package "
            f"folder or its {WEIGHTS}"
        )
    data = weights.read_bytes()
    card_path = weights.parent / CARD_JSON
    try:
        card = json.loads(card_path.read_text(encoding="utf-8")) if card_path.is_file() else None
    except (OSError, ValueError) as error:
        raise ModelSourceError(f"model {path}: cannot read its {CARD_JSON}: {error}") from None
    return data, card


def _published_with(root: Path, digest: str) -> Target | None:
    """The published version whose weights have the sha256 ``digest``; None when none does
    or ``root`` is no project."""
    if not (root / "params.yaml").is_file() or not (root / ".git").exists():
        return None
    try:
        if not list_versions(root):
            return None
        with open_index(index_path(root)) as index:
            refresh(index, root)
            tags = versions_with_weights(index, digest)
        return resolve(root, tags[-1]) if tags else None
    except GraftError:  # an unreadable registry does not stop predicting with a file at hand
        return None


def _from_revision(root: Path, ref: str) -> tuple[bytes, dict[str, Any], Target]:
    """The package's model.pt and card as ``ref``'s commit recorded them (DVC cache or remote)."""
    if not (root / ".git").exists():
        raise ModelSourceError(
            f"model {ref}: no such file or folder, and {root.resolve()} is not a git "
            "repository to look a version or revision up in (--root)"
        )
    try:
        target = resolve(root, ref)
    except LineageError:
        if "/" in ref or ref.endswith((".pt", ".pt2")):  # meant as a path, not a version
            raise ModelSourceError(
                f"model {ref}: no such file or folder (a package appears after `dvc repro`, "
                "or `dvc pull` from a DVC remote), nor a version or git revision"
            ) from None
        raise
    try:
        package = str(params_at(root, target.commit)["paths"]["register"]["package"])
    except KeyError:
        raise ModelSourceError(
            f"model {ref}: params.yaml at {target.commit[:12]} names no paths.register.package"
        ) from None
    try:
        data = output_file(root, target.commit, f"{package}/{WEIGHTS}")
        card = output_json(root, target.commit, card_file(package))
    except RevisionError as error:
        raise ModelSourceError(f"model {ref}: {error}") from None
    return data, card, target


def _check_card(card: dict[str, Any] | None, meta: CheckpointMeta, name: str) -> None:
    """A package's card must describe the weights it sits beside: same architecture and
    classes in the same order (a hand-edited or mixed-up package fails here, not later)."""
    if card is None:
        return
    for key, held in (("architecture", meta.arch), ("classes", meta.classes)):
        if key in card and card[key] != held:
            raise ModelSourceError(
                f"model {name}: the model card says {key} {card[key]!r} but the weights hold "
                f"{held!r}: the package is inconsistent"
            )


def _settings(root: Path, commit: str | None) -> CheckSettings:
    """The ``ingest`` limits at ``commit`` (the workspace's params.yaml when None), any key
    missing taking graft's default; all defaults without a readable params.yaml."""
    ingest: dict[str, Any] = {}
    try:
        if commit is not None:
            ingest = params_at(root, commit).get("ingest") or {}
        elif (root / "params.yaml").is_file():
            from graft.config.yaml12 import parse_yaml

            parsed = parse_yaml((root / "params.yaml").read_text(encoding="utf-8"))
            ingest = (parsed or {}).get("ingest") or {}
    except (GraftError, OSError, ValueError, AttributeError):
        ingest = {}
    fields = {field.name for field in dataclasses.fields(CheckSettings)}
    chosen = {key: value for key, value in ingest.items() if key in fields}
    chosen.setdefault("min_side", DEFAULT_MIN_SIDE)
    chosen.setdefault("max_pixels", DEFAULT_MAX_PIXELS)
    return CheckSettings(**chosen)
