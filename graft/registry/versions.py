"""Published model versions: git tags in GTO's format, read with plain git.

A version is an annotated tag ``<name>@vX.Y.Z`` on the commit whose ``dvc.lock`` pins it; a stage
is an annotated tag ``<name>#<stage>#<n>``; ``<name>@vX.Y.Z!#<n>`` deregisters a version. These
are GTO's own formats (``gto show`` and ``dvc artifacts get`` read them). Reading them here with
one ``git for-each-ref`` keeps ``graft lineage`` fast: importing gto costs about a second.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graft.registry.revisions import git

_NAME = r"[a-zA-Z0-9](?:[a-zA-Z0-9-/_]*[a-zA-Z0-9])?"
_SEMVER = r"(\d+)\.(\d+)\.(\d+)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?"
VERSION_TAG = re.compile(rf"^(?P<name>{_NAME})@(?P<version>v{_SEMVER})(?P<cancel>!)?(?:#\d+)?$")
VERSION_REF = re.compile(rf"^(?P<name>{_NAME})@(?P<version>v{_SEMVER}|latest)$")
STAGE_REF = re.compile(rf"^(?P<name>{_NAME})#(?P<stage>{_NAME})$")
RECORD_KEY = "graft_publish"  # marks the JSON publish record in a version tag's message


@dataclass(frozen=True)
class Version:
    """One registered version, as :func:`list_versions` reads it from its git tag.

    ``name`` is the model's, ``version`` is like ``v1.2.0``, ``tag`` is ``<name>@<version>``,
    ``commit`` the commit the tag points at and ``created`` the tag's time (unix seconds).
    """

    name: str
    version: str
    tag: str
    tag_object: str  # the annotated tag's own hash: changes if the tag is re-created
    commit: str
    created: int  # unix time of the tag

    @property
    def semver(self) -> tuple[int, int, int]:
        """(major, minor, patch) of this version, for ordering. Raises ValueError when the
        version is not semantic, which never happens for one :func:`list_versions` read."""
        return semver(self.version)


@dataclass(frozen=True)
class StagedVersion:
    """The version GTO finds in a stage: ``version`` (like ``v1.2.0``) and the ``commit`` it
    was registered at."""

    version: str
    commit: str


def is_version(text: str) -> bool:
    """Whether ``text`` is a version as GTO writes it: ``v`` and a semantic version (such as
    ``v1.2.0`` or ``v1.0.0-rc.1``). Raises nothing."""
    return re.fullmatch(rf"v{_SEMVER}", text) is not None


def semver(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a version like ``v1.2.0``; pre-release and build parts are
    ignored. Raises ValueError when ``version`` is not a semantic version with its ``v``."""
    match = re.match(rf"^v{_SEMVER}", version)
    if not match:
        raise ValueError(f"not a semantic version: {version!r}")
    return int(match[1]), int(match[2]), int(match[3])


def list_versions(root: Path, name: str | None = None) -> list[Version]:
    """Every registered, not deregistered version in the git repository ``root``.

    Only the versions of the model ``name`` when given, otherwise of every model. Returns them
    sorted by model name, then version, then tag time. Raises RevisionError when git fails.
    """
    listing = git(
        root,
        "for-each-ref",
        "refs/tags",
        "--format=%(refname:strip=2)%00%(objecttype)%00%(objectname)%00%(*objectname)"
        "%00%(creatordate:unix)",
    )
    registered: dict[tuple[str, str], Version] = {}
    cancelled: set[tuple[str, str]] = set()
    for line in listing.splitlines():
        tag, kind, tag_object, commit, created = line.split("\0")
        match = VERSION_TAG.match(tag)
        if not match or kind != "tag" or (name and match["name"] != name):
            continue  # GTO ignores lightweight tags too
        key = (match["name"], match["version"])
        if match["cancel"]:
            cancelled.add(key)
        else:
            registered[key] = Version(key[0], key[1], tag, tag_object, commit, int(created))
    active = [v for key, v in registered.items() if key not in cancelled]
    return sorted(active, key=lambda v: (v.name, v.semver, v.created))


def next_version(existing: list[Version], bump: str) -> str:
    """The version after the greatest of ``existing``, bumping ``bump`` ("major", "minor";
    anything else bumps the patch); the first version is v1.0.0. Raises nothing."""
    if not existing:
        return "v1.0.0"
    major, minor, patch = max(v.semver for v in existing)
    if bump == "major":
        return f"v{major + 1}.0.0"
    if bump == "minor":
        return f"v{major}.{minor + 1}.0"
    return f"v{major}.{minor}.{patch + 1}"


def publish_record(root: Path, tag: str) -> dict[str, Any] | None:
    """The JSON record ``graft publish`` wrote into the message of the version tag ``tag``.

    Returns None when the tag has no such record (a version tagged by other means). Raises
    RevisionError when git fails.
    """
    message = git(root, "tag", "-l", "--format=%(contents)", tag)
    start = message.find("{")
    if start < 0:
        return None
    try:
        record = json.loads(message[start:])
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and RECORD_KEY in record else None


def version_in_stage(root: Path, name: str, stage: str) -> StagedVersion | None:
    """The version of the model ``name`` that GTO finds in ``stage`` (e.g. ``prod``) in the
    git repository ``root``, or None when no version is in that stage or the model has no
    versions at all. Imports gto (about a second), so only callers that need a stage call it.
    Raises what GTO raises for an unreadable repository."""
    import gto.api
    from gto.exceptions import ArtifactNotFound

    try:
        found = gto.api.find_versions_in_stage(str(root), name, stage)
    except ArtifactNotFound:  # nothing published under this name yet
        return None
    if not found:
        return None
    first = found[0] if isinstance(found, list) else found
    return StagedVersion(str(first.version), str(first.commit_hexsha))
