"""A project's files at any git revision: git for tracked files, DVC for pipeline outputs.

Pipeline outputs are found through that revision's ``dvc.lock``: the content hash it records is
looked up in the local DVC cache first (no DVC import, fast), then fetched with ``dvc.api``,
which also reaches the DVC remote. Nothing here reads the workspace, so a past version reads
exactly as it was published.
"""

from __future__ import annotations

import configparser
import json
import subprocess
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

from graft.config.yaml12 import YAMLSyntaxError, parse_yaml
from graft.errors import GraftError

LOCK_FILE = "dvc.lock"
PARAMS_FILE = "params.yaml"


class RevisionError(GraftError):
    """A revision, or a file at a revision, cannot be found."""


def git(root: Path, *args: str) -> str:
    """Run ``git <args>`` in ``root`` and return its standard output (text). Raises
    RevisionError, with git's error message, when git exits with an error."""
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        raise RevisionError(f"git {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def resolve_commit(root: Path, ref: str) -> str | None:
    """The full commit hash the revision ``ref`` names in the git repository ``root`` (a tag
    is followed to its commit), or None when git knows no such revision. Raises nothing."""
    result = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    return result.stdout.strip() if result.returncode == 0 else None


def tracked_file(root: Path, commit: str, path: str) -> bytes | None:
    """The bytes of the git-tracked file ``path`` (relative to ``root``) at ``commit``, or None
    when it is not there. Raises nothing."""
    result = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=root, capture_output=True)
    return result.stdout if result.returncode == 0 else None


@cache
def _yaml_at(root: Path, commit: str, path: str) -> dict[str, Any]:
    """The YAML file ``path`` at ``commit``, parsed; {} when it holds no mapping. Read as DVC
    reads it (UTF-8, YAML 1.2: :mod:`graft.config.yaml12`), so lineage records the values
    that trained and that dvc.lock holds. Raises RevisionError when the file is not committed
    there or is not UTF-8 YAML."""
    data = tracked_file(root, commit, path)
    if data is None:
        raise RevisionError(f"{path} is not committed at {commit[:12]}")
    try:
        parsed = parse_yaml(data.decode("utf-8"))
    except (UnicodeDecodeError, YAMLSyntaxError) as error:
        raise RevisionError(f"{path} at {commit[:12]} is not valid UTF-8 YAML: {error}") from None
    return parsed if isinstance(parsed, dict) else {}


def lock_at(root: Path, commit: str) -> dict[str, Any]:
    """``dvc.lock`` at ``commit`` of the repository ``root``, parsed: the hashes of every
    stage's deps, params and outputs. Cached per commit. Raises RevisionError when it is not
    committed there."""
    return _yaml_at(root, commit, LOCK_FILE)


def params_at(root: Path, commit: str) -> dict[str, Any]:
    """``params.yaml`` at ``commit`` of the repository ``root``, parsed but unvalidated: older
    revisions may predate today's schema. Cached per commit. Raises RevisionError when it is
    not committed there."""
    return _yaml_at(root, commit, PARAMS_FILE)


def stage_writing(lock: dict[str, Any], path: str) -> tuple[str, dict[str, Any]] | None:
    """The (name, lock entry) of the stage in the parsed ``lock`` whose outputs hold ``path``
    (an output, or a file inside an output folder), or None when no stage writes it."""
    target = PurePosixPath(path)
    for name, stage in lock.get("stages", {}).items():
        for out in stage.get("outs", []):
            out_path = PurePosixPath(out["path"])
            if target == out_path or out_path in target.parents:
                return name, stage
    return None


def output_hash(lock: dict[str, Any], path: str) -> tuple[str, str, str]:
    """(output path, its md5, ``path`` relative to it) for ``path``, a pipeline output or a
    file inside one, per the parsed ``lock``; the relative part is "" for the output itself.
    Raises RevisionError when no stage writes ``path``."""
    target = PurePosixPath(path)
    for stage in lock.get("stages", {}).values():
        for out in stage.get("outs", []):
            out_path = PurePosixPath(out["path"])
            if target == out_path or out_path in target.parents:
                relative = "" if target == out_path else str(target.relative_to(out_path))
                return str(out_path), str(out["md5"]), relative
    raise RevisionError(f"{path} is not a pipeline output in {LOCK_FILE}")


def _cache_dir(root: Path) -> Path:
    # The cache may be configured elsewhere (`dvc cache dir`); local config wins over shared.
    for name in ("config.local", "config"):
        parser = configparser.ConfigParser()
        parser.read(root / ".dvc" / name)
        if parser.has_option("cache", "dir"):
            return (root / ".dvc" / parser.get("cache", "dir")).resolve()
    return root / ".dvc" / "cache"


def _cached(root: Path, md5: str) -> bytes | None:
    path = _cache_dir(root) / "files" / "md5" / md5[:2] / md5[2:]
    try:
        return path.read_bytes()
    except OSError:
        return None


def _from_cache(root: Path, md5: str, relative: str) -> bytes | None:
    if not relative:
        return _cached(root, md5)
    listing = _cached(root, md5) if md5.endswith(".dir") else None
    if listing is None:
        return None
    for entry in json.loads(listing):
        if entry["relpath"] == relative:
            return _cached(root, entry["md5"])
    return None


def output_file(root: Path, commit: str, path: str) -> bytes:
    """The bytes of the pipeline output file ``path`` as ``dvc.lock`` at ``commit`` records it:
    from the local DVC cache, else through DVC (which also reaches the remote). Raises
    RevisionError when neither has it, or when no stage writes ``path``."""
    _, md5, relative = output_hash(lock_at(root, commit), path)
    data = _from_cache(root, md5, relative)
    if data is not None:
        return data
    import dvc.api  # slow import: only when the local cache lacks the file

    try:
        return bytes(dvc.api.read(path, repo=str(root), rev=commit, mode="rb"))
    except Exception as error:  # DVC raises many types for missing data or remotes
        raise RevisionError(
            f"{path} at {commit[:12]} is neither in the DVC cache nor on the remote ({error}); "
            "where it was made, `dvc push` it to a DVC remote this project reaches"
        ) from None


def output_json(root: Path, commit: str, path: str) -> Any:
    """The pipeline output file ``path`` at ``commit``, parsed as JSON (see
    :func:`output_file`). Raises RevisionError as that does, and ValueError for bad JSON."""
    return json.loads(output_file(root, commit, path))
