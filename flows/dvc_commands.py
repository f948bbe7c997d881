"""DVC's data commands (push, pull, checkout) and its cache setting, run in this process.

A `dvc` command started as a process spends about half a second importing DVC before it
does anything, twice that on a machine busy training; a placed stage's hand-over started
five of them (benchmarks/placement.py), and their start-up was most of its cost. These call
DVC's own Repo API instead: the code the `dvc` command runs, with the same repository lock,
and the remote's connection is kept for the next call in this process.

Targets are made absolute first: DVC resolves a relative target against the process's
working directory, not against the repository, and the threads of one flow run share one
working directory. Nothing here changes it.

The orchestrating workspace's own `dvc repro` stays a process (flows/stages.py): a stage
may run there, and a process is what a timeout or an interrupt can stop with all it started.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flows.stages import DvcLocked


class DvcDataError(RuntimeError):
    """A DVC data command failed: the message names the command, the project and DVC's
    reason (a remote that cannot be reached, an object missing from it, ...)."""


def push(root: Path, paths: list[str]) -> None:
    """`dvc push` of ``paths`` (outputs, relative to the project ``root``) to its default
    remote. Raises DvcLocked while another DVC command holds the repository, DvcDataError
    when DVC fails (no default remote, an upload failed)."""
    _call(root, "push", paths, lambda repo, targets: repo.push(targets=targets))


def push_stage(root: Path, stage: str) -> None:
    """`dvc push --run-cache <stage>`: the outputs of ``stage`` of the project ``root`` and
    the run-cache entries of its cache (another clone's `dvc repro` of the same stage, deps
    and params then restores the outputs instead of running it). Raises as :func:`push`."""
    target = f"{root.resolve() / 'dvc.yaml'}:{stage}"
    with _repo(root, f"push --run-cache {stage}") as repo:
        repo.push(targets=[target], run_cache=True)


def pull(root: Path, paths: list[str]) -> None:
    """`dvc pull` of ``paths`` (as for :func:`push`) from the default remote into the
    project's cache and working tree, at the versions its dvc.lock records. Raises
    DvcLocked and DvcDataError as :func:`push` does (a download failed, an object is missing
    from the remote)."""
    _call(root, "pull", paths, lambda repo, targets: repo.pull(targets=targets))


def checkout(root: Path, paths: list[str]) -> None:
    """`dvc checkout` of ``paths`` (as for :func:`push`) from the project's cache into its
    working tree, at the versions its dvc.lock records. Raises DvcLocked and DvcDataError
    (an object missing from the cache)."""
    _call(root, "checkout", paths, lambda repo, targets: repo.checkout(targets=targets))


def cache_dir(root: Path) -> Path:
    """The DVC cache folder of the project ``root``, as its merged DVC config says (default
    ``.dvc/cache``), absolute. Raises DvcDataError when DVC cannot read the project."""
    with _repo(root, "cache dir") as repo:
        return Path(repo.cache.local_cache_dir).resolve()


def set_local_cache_dir(root: Path, cache: Path) -> None:
    """Point the project ``root`` at the cache folder ``cache``, in its local config
    (``.dvc/config.local``, which git does not track), as `dvc config --local cache.dir`
    does. Raises DvcDataError when DVC cannot read or write the config."""
    with _repo(root, "config --local cache.dir") as repo, repo.config.edit("local") as config:
        config["cache"]["dir"] = str(cache)


def _call(
    root: Path, command: str, paths: list[str], step: Callable[[Any, list[str]], object]
) -> None:
    # The project folder is resolved, the paths in it are not: with DVC's symlink cache
    # type an output is a link into the cache, and must be named as the output.
    targets = [str(root.resolve() / path) for path in paths]
    with _repo(root, f"{command} {' '.join(paths)}") as repo:
        step(repo, targets)


@contextmanager
def _repo(root: Path, command: str) -> Iterator[Any]:
    """DVC's Repo of ``root`` for one command; its failures as DvcLocked or DvcDataError."""
    from dvc.exceptions import DvcException
    from dvc.lock import LockError
    from dvc.repo import Repo

    try:
        with Repo(str(root.resolve())) as repo:
            yield repo
    except LockError as error:
        raise DvcLocked(f"`dvc {command}` in {root}: {error}") from None
    except DvcException as error:
        # DVC's message says what failed ("2 files failed to download"); its cause says why.
        cause = f" ({error.__cause__})" if error.__cause__ else ""
        raise DvcDataError(f"`dvc {command}` in {root} failed: {error}{cause}") from error
