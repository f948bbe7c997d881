"""``graft lineage``: what produced a model version, and what changed between two.

Everything is read from git and DVC at the version's own commit (``dvc.lock``, ``params.yaml``,
the model card inside the package, the publish record in the version tag), never from the
workspace, so a version published a year ago reads exactly as it was.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graft.config.params import load_params
from graft.errors import GraftError
from graft.hashing import file_sha256
from graft.registry.lineage_index import refresh, table_keys
from graft.registry.lineage_queries import split_table, versions_with_weights
from graft.registry.package_layout import WEIGHTS, card_file
from graft.registry.revisions import (
    git,
    lock_at,
    output_hash,
    output_json,
    params_at,
    resolve_commit,
    stage_writing,
)
from graft.registry.versions import (
    STAGE_REF,
    VERSION_REF,
    Version,
    list_versions,
    publish_record,
    version_in_stage,
)


class LineageError(GraftError):
    """A reference names no version, revision or model file."""


@dataclass(frozen=True)
class Target:
    """A resolved reference: ``ref`` as given, the ``commit`` to read, and the ``version``
    published at that commit (None when it is not a published version)."""

    ref: str
    commit: str
    version: Version | None


def index_path(root: Path) -> Path:
    """Where the lineage index of the project ``root`` lives: ``root`` joined with params.yaml's
    ``paths.register.lineage_index``. Raises ParamsError when params.yaml is missing or bad."""
    return root / load_params(root / "params.yaml").paths.registry.lineage_index


def _stage_version(root: Path, name: str, stage: str) -> str:
    staged = version_in_stage(root, name, stage)  # imports gto: only for stage references
    if staged is None:
        raise LineageError(f"no version of {name} is in stage {stage!r}")
    return staged.version


def resolve(root: Path, ref: str, index: sqlite3.Connection | None = None) -> Target:
    """What ``ref`` names in the git repository ``root``: ``name@vX.Y.Z``, ``name@latest``,
    ``name#stage``, a model file (found by its sha256 in ``index``, which is refreshed; without
    ``index`` a file path is read as a git revision), or any git revision.

    Returns the commit to read and the version published there, if any. Raises LineageError
    when ``ref`` names no published version, stage, model file or git revision, and
    RevisionError when git fails.
    """
    versions = list_versions(root)
    by_tag = {v.tag: v for v in versions}
    wanted: str | None = None
    if match := VERSION_REF.match(ref):
        named = [v for v in versions if v.name == match["name"]]
        wanted = named[-1].tag if match["version"] == "latest" and named else ref
    elif match := STAGE_REF.match(ref):
        wanted = f"{match['name']}@{_stage_version(root, match['name'], match['stage'])}"
    elif Path(ref).is_file() and index is not None:
        digest = file_sha256(Path(ref))
        refresh(index, root)  # the file is found by its hash among indexed versions
        tags = versions_with_weights(index, digest)
        if not tags:
            raise LineageError(f"{ref} (sha256 {digest}) is not the model of a published version")
        wanted = tags[-1]
    if wanted is not None:
        if wanted not in by_tag:
            raise LineageError(f"no published version {wanted}")
        version = by_tag[wanted]
        return Target(ref, version.commit, version)
    commit = resolve_commit(root, ref)
    if commit is None:
        raise LineageError(f"{ref!r} is not a version, a stage, a model file or a git revision")
    same = [v for v in versions if v.commit == commit]
    return Target(ref, commit, same[-1] if same else None)


def _out(lock: dict[str, Any], path: str) -> dict[str, Any]:
    _, md5, _ = output_hash(lock, path)
    return {"path": path, "md5": md5}


def _stage(lock: dict[str, Any], path: str) -> dict[str, Any]:
    found = stage_writing(lock, path)
    if found is None:
        return {}
    name, entry = found
    return {
        "stage": name,
        "params": entry.get("params", {}).get("params.yaml", {}),
        "deps": [{"path": d["path"], "md5": d.get("md5")} for d in entry.get("deps", [])],
    }


def _model(lock: dict[str, Any], package: str, card: dict[str, Any]) -> dict[str, Any]:
    return {
        "path": f"{package}/{WEIGHTS}",
        "sha256": card.get("inputs_sha256", {}).get("weights"),
        "package": _out(lock, package),
        "architecture": card.get("architecture"),
        "classes": card.get("classes"),
        "input": card.get("input"),
    }


def _training(lock: dict[str, Any], paths: dict[str, Any], card: dict[str, Any]) -> dict[str, Any]:
    """The ``finetune`` and ``pretrained`` sections: the stages, params and starting weights."""
    pretrained = str(paths["pretrain"]["checkpoint"])
    return {
        "finetune": {
            **_stage(lock, str(paths["finetune"]["checkpoint"])),
            "init": card.get("training", {}).get("init"),
        },
        "pretrained": {
            **_out(lock, pretrained),
            "sha256": card.get("inputs_sha256", {}).get("pretrained_weights"),
            "provenance": card.get("weights_provenance"),
            **_stage(lock, pretrained),
        },
    }


def _data(lock: dict[str, Any], params: dict[str, Any], card: dict[str, Any]) -> dict[str, Any]:
    """The ``split``, ``dataset`` and ``sources`` sections: from source folders to splits."""
    paths, hashes, data = params["paths"], card.get("inputs_sha256", {}), card.get("data", {})
    dataset, splits = str(paths["ingest"]["dataset"]), str(paths["split"]["splits"])
    ingest = _stage(lock, dataset)
    return {
        "split": {
            **_out(lock, splits),
            "sha256": hashes.get("splits"),
            "counts": data.get("splits"),
            **_stage(lock, splits),
        },
        "dataset": {
            **_out(lock, dataset),
            "manifest_sha256": hashes.get("manifest"),
            "accepted": data.get("accepted"),
            "rejected": data.get("rejected"),
            "duplicates": data.get("duplicates"),
            "params": ingest.get("params"),
        },
    }


def _sources(root: Path, commit: str, lock: dict[str, Any], params: dict[str, Any]) -> list[Any]:
    """The ``sources`` section: each role's source folder and what pinned its content.

    Since the ``scan`` stage, its output (``paths.scan.sources``, read at ``commit`` from the
    DVC cache or remote) holds each folder's fingerprint: ``sha256`` of every file's path and
    content hash, with the file count, bytes and class folders. Before it, ``ingest`` depended
    on the folders themselves and ``dvc.lock`` holds DVC's ``md5`` of each. Raises
    RevisionError when the scan's output can be in neither the cache nor the remote.
    """
    sources = params.get("ingest", {}).get("sources", {})
    scanned = params["paths"].get("scan", {}).get("sources")
    if scanned is not None and stage_writing(lock, str(scanned)) is not None:
        found = output_json(root, commit, str(scanned))
        return [
            {
                "role": role,
                "path": str(found[role]["uri"]),
                "sha256": found[role]["sha256"],
                "files": found[role]["files"],
                "bytes": found[role]["bytes"],
                "classes": found[role]["classes"],
            }
            for role in sources
            if role in found
        ]
    source_dirs = {str(s["uri"]): role for role, s in sources.items()}
    ingest = _stage(lock, str(params["paths"]["ingest"]["dataset"]))
    return [
        {"role": source_dirs[d["path"]], **d}
        for d in ingest.get("deps", [])
        if d["path"] in source_dirs
    ]


def show(root: Path, target: Target) -> dict[str, Any]:
    """The whole chain behind ``target`` in the git repository ``root``, read at its commit.

    Returns a JSON-ready dict: the model (weights' sha256, package), finetune and pretrain
    (stages, params, weights and their provenance), split, dataset and source folders, the
    code commit and dirty flag, metrics, gate, and for a published version the publish time,
    the production comparison and the environment (None otherwise). Raises RevisionError when
    the commit's dvc.lock, params.yaml or model card cannot be read (not in the DVC cache nor
    on the remote), and KeyError when its params.yaml lacks a path the chain needs.
    """
    commit, version = target.commit, target.version
    lock, params = lock_at(root, commit), params_at(root, commit)
    package = str(params["paths"]["register"]["package"])
    card = output_json(root, commit, card_file(package))
    record = publish_record(root, version.tag) if version else None
    return {
        "ref": target.ref,
        "commit": commit,
        "name": card.get("name"),
        "version": version.version if version else None,
        "tag": version.tag if version else None,
        "model": _model(lock, package, card),
        **_training(lock, params["paths"], card),
        **_data(lock, params, card),
        "sources": _sources(root, commit, lock, params),
        "code": {
            "commit": commit,
            "dirty": record.get("dirty") if record else None,
            "dirty_files": record.get("dirty_files") if record else None,
        },
        "metrics": card.get("metrics"),
        "gate": card.get("gate"),
        "published": {k: record.get(k) for k in ("published_at", "production")} if record else None,
        "environment": record.get("environment") if record else None,
    }


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _lock_params(lock: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for stage in lock.get("stages", {}).values():
        merged.update(_flatten(stage.get("params", {}).get("params.yaml", {})))
    return merged


def _code_deps(lock: dict[str, Any]) -> dict[str, str]:
    """Deps that no stage writes and that are files, not source folders: the code."""
    outputs = {o["path"] for s in lock.get("stages", {}).values() for o in s.get("outs", [])}
    return {
        d["path"]: d.get("md5", "")
        for s in lock.get("stages", {}).values()
        for d in s.get("deps", [])
        if d["path"] not in outputs and not str(d.get("md5", "")).endswith(".dir")
    }


def _changed(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        k: {"a": a.get(k), "b": b.get(k)}
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    }


def diff(root: Path, index: sqlite3.Connection, a: Target, b: Target) -> dict[str, Any]:
    """What changed from ``a`` to ``b`` in the git repository ``root``: images added to and
    removed from each role and split (read through the lineage ``index``, which gains any
    table it lacks), params as dvc.lock records them, commits and code files, and metrics
    with their deltas. Returns a JSON-ready dict. Raises RevisionError when either side's
    files cannot be read.
    """
    tables = [split_table(index, table_keys(index, root, t.commit).splits) for t in (a, b)]
    keyed = [{(r["role"], r["split"], r["sha256"]): r for r in rows} for rows in tables]
    images: dict[str, dict[str, list[dict[str, str | None]]]] = {}
    for change, (left, right) in {"added": (1, 0), "removed": (0, 1)}.items():
        for key in sorted(keyed[left].keys() - keyed[right].keys()):
            row = keyed[left][key]
            group = images.setdefault(f"{key[0]}/{key[1]}", {"added": [], "removed": []})
            group[change].append({k: row[k] for k in ("sha256", "label", "path")})
    locks = [lock_at(root, t.commit) for t in (a, b)]
    cards = [show(root, t)["metrics"] or {} for t in (a, b)]
    metrics_a, metrics_b = (_flatten(c) for c in cards)
    commits = git(root, "log", "--format=%H %s", f"{a.commit}..{b.commit}").splitlines()
    return {
        "a": {"ref": a.ref, "commit": a.commit, "tag": a.version.tag if a.version else None},
        "b": {"ref": b.ref, "commit": b.commit, "tag": b.version.tag if b.version else None},
        "images": dict(sorted(images.items())),
        "params": _changed(_lock_params(locks[0]), _lock_params(locks[1])),
        "code": {
            "commits": [
                dict(zip(("commit", "subject"), c.split(" ", 1), strict=False)) for c in commits
            ],
            "files": sorted(_changed(_code_deps(locks[0]), _code_deps(locks[1]))),
        },
        "metrics": {
            key: {
                "a": metrics_a.get(key),
                "b": metrics_b.get(key),
                "delta": _delta(metrics_a.get(key), metrics_b.get(key)),
            }
            for key in sorted(metrics_a.keys() | metrics_b.keys())
            if metrics_a.get(key) != metrics_b.get(key)
        },
    }


def _delta(a: Any, b: Any) -> float | None:
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        return float(b) - float(a)
    return None
