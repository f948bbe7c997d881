"""``graft publish``: make the workspace's registered model a version in git, in GTO's format.

Refuses unless the pipeline is up to date (``dvc status`` clean), the register stage's package
exists (its gate passed) and the model is not worse than the production version by more than
``register.max_drop_vs_prod``. Then pushes the data to the default DVC remote when one is
configured, commits ``dvc.lock`` with the params and pipeline it pins, and tags the commit
``<name>@vX.Y.Z`` (optionally ``<name>#<stage>#<n>``); a failure at any step leaves git as it
was (see graft.registry.tagged_commit). The tag's message holds the publish record: code commit,
dirty flag, environment and the production comparison, which must not live in a DVC output
(they would make ``dvc.lock`` differ between machines and clones).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from graft.config.params import Params, load_params
from graft.data.fingerprint import fingerprint_sources
from graft.errors import GraftError
from graft.processes import run_dvc
from graft.registry.environment import environment
from graft.registry.package_layout import CARD_JSON, card_file
from graft.registry.register import gate_failures
from graft.registry.revisions import git, output_json, params_at, resolve_commit
from graft.registry.tagged_commit import build_commit, commit_and_tag
from graft.registry.versions import (
    RECORD_KEY,
    Version,
    is_version,
    list_versions,
    next_version,
    semver,
    version_in_stage,
)

Bump = Literal["patch", "minor", "major"]
# What publish commits: the lock and the declarations it was made from.
PUBLISHED_FILES = ("dvc.lock", "params.yaml", "dvc.yaml")
PRODUCTION = "prod"


class PublishError(GraftError):
    """The workspace cannot be published as a model version."""


class AlreadyPublished(PublishError):
    """Nothing new: the commit that would be tagged already is a published version."""


ALWAYS_CHANGED = "always changed"  # what dvc status says of a stage marked always_changed
SCAN_STAGE = "scan"  # the stage that fingerprints the source folders (dvc.yaml)


@dataclass(frozen=True)
class Published:
    """A version :func:`publish` created: the model ``name``, its ``version`` and ``tag``, the
    ``commit`` tagged, the stage tag (or None), whether data was pushed to the DVC remote, and
    the publish ``record`` written into the tag's message."""

    name: str
    version: str
    tag: str
    commit: str
    stage_tag: str | None
    pushed: bool
    record: dict[str, Any] = field(repr=False)


def stale_stages(root: Path, params: Params) -> dict[str, Any]:
    """What changed in the project ``root`` since the pipeline last ran, by stage; empty when
    it is up to date. Raises PublishError when ``dvc status`` fails.

    ``dvc status`` says it, except for the ``scan`` stage, which it reports as "always
    changed" whatever happened: scan is stale only when the source folders' fingerprints
    (graft.data.fingerprint, with ``params``' sources) differ from the ones it last wrote.
    """
    result = run_dvc(root, "status", "--json")
    if result.returncode != 0:
        raise PublishError(f"dvc status failed: {result.stderr.strip()}")
    status = json.loads(result.stdout or "{}")
    status = status if isinstance(status, dict) else {}
    changed = {stage: why for stage, why in status.items() if why != [ALWAYS_CHANGED]}
    if SCAN_STAGE in status and sources_changed(root, params):  # a pipeline with a scan
        changed[SCAN_STAGE] = ["the source folders changed since the last scan"]
    return changed


def sources_changed(root: Path, params: Params) -> bool:
    """Whether the source folders' fingerprints now differ from the ones the ``scan`` stage
    last wrote (``paths.scan.sources`` under ``root``; a missing file counts as changed)."""
    written = root / params.paths.scan.sources
    if not written.is_file():
        return True
    now = fingerprint_sources(params.ingest.sources, params.paths.ingest.cache, root)
    # Through JSON, as the stage wrote them: tuples and lists, ints and floats compare equal.
    return bool(json.loads(written.read_text(encoding="utf-8")) != json.loads(json.dumps(now)))


def dirty_files(root: Path) -> list[str]:
    """Tracked files of the git repository ``root`` with uncommitted changes, other than those
    publish commits itself (PUBLISHED_FILES), sorted. Raises RevisionError when git fails."""
    listing = git(root, "status", "--porcelain=v1", "-z", "--untracked-files=no")
    paths = [entry[3:] for entry in listing.split("\0") if entry]
    return sorted(p for p in paths if p not in PUBLISHED_FILES)


def production_failures(
    accuracy: float, production: dict[str, Any] | None, max_drop: float
) -> list[str]:
    """Why a model of test ``accuracy`` (0-1) may not replace ``production`` (as
    :func:`production_version` returns it, or None) when it may fall at most ``max_drop``
    below it. Returns the reasons; empty when there is no production version or the model is
    close enough. Raises KeyError when ``production`` lacks its accuracy or tag."""
    if production is None:
        return []
    floor = production["accuracy"] - max_drop
    if accuracy < floor - 1e-12:
        return [
            f"accuracy {accuracy:.4f} is more than register.max_drop_vs_prod {max_drop} below "
            f"the production version {production['tag']} ({production['accuracy']:.4f})"
        ]
    return []


def production_version(root: Path, name: str) -> dict[str, Any] | None:
    """The version of the model ``name`` in stage ``prod``: its tag, commit and test accuracy
    (0-1, from the model card at its own commit). None when no version is in ``prod``. Raises
    RevisionError when that commit's params or model card cannot be read."""
    staged = version_in_stage(root, name, PRODUCTION)
    if staged is None:
        return None
    package = params_at(root, staged.commit)["paths"]["register"]["package"]
    card = output_json(root, staged.commit, card_file(package))
    return {
        "tag": f"{name}@{staged.version}",
        "commit": staged.commit,
        "accuracy": float(card["metrics"]["accuracy"]),
    }


def _choose_version(existing: list[Version], bump: Bump, version: str | None) -> str:
    if version is None:
        return next_version(existing, bump)
    if not is_version(version):
        raise PublishError(f"--version {version!r} is not a semantic version like v1.2.0")
    if any(v.version == version for v in existing):
        raise PublishError(f"version {version} already exists")
    if existing and semver(version) <= max(v.semver for v in existing):
        raise PublishError(f"version {version} is not above the latest, {existing[-1].version}")
    return version


def _check_publishable(root: Path, params: Params, allow_dirty: bool) -> dict[str, Any]:
    stale = stale_stages(root, params)
    if stale:
        raise PublishError(
            "the pipeline is not up to date; run `dvc repro` (or `graft run`) first. "
            f"Changed: {', '.join(sorted(stale))}"
        )
    card_path = root / params.paths.registry.package / CARD_JSON
    if not card_path.is_file():
        raise PublishError(
            f"no registered model at {card_path.parent}: the register stage has not passed its gate"
        )
    card: dict[str, Any] = json.loads(card_path.read_text(encoding="utf-8"))
    failures = gate_failures(card["metrics"], params.registry)
    if failures:
        raise PublishError("gate failed:\n  " + "\n  ".join(failures))
    dirty = dirty_files(root)
    if dirty and not allow_dirty:
        raise PublishError(
            "uncommitted changes to tracked files (commit them, or pass --allow-dirty to "
            f"publish anyway and record the tree as dirty): {', '.join(dirty)}"
        )
    return card


def default_remote(root: Path) -> str | None:
    """The name of the default DVC remote of the project ``root`` (``core.remote`` in DVC's
    merged system, global, project and local config), or None when none is set. Raises
    PublishError when DVC cannot read the project or its config."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo  # about half a second to import: only when publishing

    # `dvc config core.remote` exits 0 with no output when no remote is set, so its exit code
    # says nothing; DVC's own merged config does.
    try:
        with Repo(str(root)) as repo:
            remote = repo.config.get("core", {}).get("remote")
    except DvcException as error:
        raise PublishError(f"cannot read the DVC config: {error}") from None
    return str(remote) if remote else None


def _push_data(root: Path) -> bool:
    if default_remote(root) is None:
        return False  # no default remote: nothing to push to
    result = run_dvc(root, "push")
    if result.returncode != 0:
        raise PublishError(
            f"dvc push failed; nothing was committed or tagged: {result.stderr.strip()}"
        )
    return True


def _record(
    root: Path,
    params: Params,
    card: dict[str, Any],
    version: str,
    commit: str,
    production: dict[str, Any] | None,
) -> dict[str, Any]:
    """The publish record: what the model card cannot hold (see the module docstring)."""
    name = params.registry.name
    return {
        RECORD_KEY: 1,
        "name": name,
        "version": version,
        "commit": commit,
        "dirty": bool(dirty_files(root)),
        "dirty_files": dirty_files(root),
        "published_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "weights_sha256": card["inputs_sha256"]["weights"],
        "metrics": {k: v for k, v in card["metrics"].items() if isinstance(v, int | float)},
        "production": production,
        "max_drop_vs_prod": params.registry.max_drop_vs_prod,
        "environment": environment(params.common.device, params.common.seed),
    }


def _tag(
    root: Path, name: str, version: str, commit: str, record: dict[str, Any], stage: str | None
) -> tuple[str, str | None]:
    """Create the version tag, its message holding ``record``, and with ``stage`` the stage
    tag; return both tags (the stage tag None without ``stage``)."""
    import gto.api  # about a second to import: only when publishing

    message = f"Registering artifact {name} version {version}\n\n" + json.dumps(
        record, indent=1, sort_keys=True
    )
    registration = gto.api.register(str(root), name, commit, version=version, message=message)
    if not stage:
        return registration.tag, None
    note = f"Assigning stage {stage} to artifact {name} version {version}"
    assignment = gto.api.assign(str(root), name, stage, version=version, message=note)
    return registration.tag, assignment.tag


def publish(
    root: Path,
    bump: Bump = "patch",
    version: str | None = None,
    stage: str | None = None,
    push: bool = True,
    allow_dirty: bool = False,
) -> Published:
    """Publish the registered model of the project ``root`` as its next version.

    ``bump`` picks the next version ("patch", "minor", "major") unless ``version`` names it
    (like ``v2.0.0``); ``stage`` also assigns a stage; ``push`` runs `dvc push` when a
    default DVC remote is configured; ``allow_dirty`` publishes with uncommitted tracked
    changes (recorded as dirty). Returns what was published. Raises PublishError when the
    workspace may not be published (see the module docstring), AlreadyPublished when its
    commit already is a version, ParamsError for bad params.yaml and RevisionError when git
    fails.
    """
    root = root.resolve()
    params = load_params(root / "params.yaml")
    name = params.registry.name
    card = _check_publishable(root, params, allow_dirty)
    existing = list_versions(root, name)
    new_version = _choose_version(existing, bump, version)
    production = production_version(root, name)
    failures = production_failures(
        card["metrics"]["accuracy"], production, params.registry.max_drop_vs_prod
    )
    if failures:
        raise PublishError("not published: " + "; ".join(failures))

    parent = resolve_commit(root, "HEAD")
    commit = build_commit(root, PUBLISHED_FILES, f"Publish {name} {new_version}", parent)
    already = [v for v in existing if v.commit == commit]
    if already:
        raise AlreadyPublished(f"this commit is already published as {already[0].tag}")
    # The data goes to the remote before any ref moves: a tag never points at missing data.
    pushed = _push_data(root) if push else False
    record = _record(root, params, card, new_version, commit, production)
    tag, stage_tag = commit_and_tag(
        root,
        PUBLISHED_FILES,
        parent,
        commit,
        lambda: _tag(root, name, new_version, commit, record, stage),
    )
    return Published(name, new_version, tag, commit, stage_tag, pushed, record)
