"""Checks of validated params against this machine: the file system and the installed packages.

:func:`graft.config.params.parse_params` only checks what the file says; whether its source
folders exist here and whether this torchvision knows its architecture depends on where it
runs. Each entry point checks what it needs, right after loading the params and before any
work: ingest the sources, the training stages the architecture, ``graft check`` both. Every
check raises :class:`~graft.config.params.ParamsError` naming every bad key at once, in the
same format as a validation error.
"""

from __future__ import annotations

from pathlib import Path

from graft.config.params import ROLES, Params, ParamsError, describe_problems


def source_problems(params: Params, root: Path = Path(".")) -> list[tuple[str, str]]:
    """``(key, message)`` for every source folder that is missing or not a folder.

    A relative ``ingest.sources.<role>.uri`` is taken relative to ``root``, the folder holding
    params.yaml; an absolute one as it is. Returns an empty list when every folder exists.
    """
    problems = []
    for role in ROLES:
        uri = params.ingest.sources.for_role(role).uri
        if not (root / uri).is_dir():
            message = f"source folder {str(uri)!r} does not exist or is not a folder"
            problems.append((f"ingest.sources.{role}.uri", message))
    return problems


def arch_problems(params: Params) -> list[tuple[str, str]]:
    """``(key, message)`` when this torchvision has no classifier named ``pretrain.arch``.

    The message suggests known names sharing the first three letters (or the first few names).
    Returns an empty list when the architecture is known. Imports torchvision on first use.
    """
    # Imported here: torchvision takes seconds to import, and most callers never need it.
    from graft.training.models import unknown_architecture

    problem = unknown_architecture(params.pretrain.arch)
    return [("pretrain.arch", problem)] if problem else []


def check_sources(params: Params, root: Path = Path("."), *, origin: str = "params") -> None:
    """Raise ParamsError naming every ``ingest.sources.<role>.uri`` that is not a folder.

    ``root`` is the folder holding params.yaml (relative source paths are relative to it);
    ``origin`` names the params file in the message.
    """
    _raise_if_any(origin, source_problems(params, root))


def check_arch(params: Params, *, origin: str = "params") -> None:
    """Raise ParamsError when this torchvision does not know ``pretrain.arch``.

    ``origin`` names the params file in the message.
    """
    _raise_if_any(origin, arch_problems(params))


def check_machine(params: Params, root: Path = Path("."), *, origin: str = "params") -> None:
    """Run every check of this module; raise one ParamsError naming every bad key at once.

    ``root`` and ``origin`` as for :func:`check_sources`.
    """
    _raise_if_any(origin, source_problems(params, root) + arch_problems(params))


def _raise_if_any(origin: str, problems: list[tuple[str, str]]) -> None:
    if problems:
        raise ParamsError(describe_problems(origin, problems))
