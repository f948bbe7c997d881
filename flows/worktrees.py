"""Stage work trees: a git work tree per stage, so that stages can run at the same time.

DVC holds one lock per repository for the whole of `dvc repro`, so two stages of one
workspace can never run at once. A stage that runs beside another therefore runs in a work
tree of its own, ``.graft/worktrees/<stage>`` (``git worktree``: the same repository, another
checkout), which shares the clone's DVC cache. It gets the orchestrator's ``dvc.lock``, checks
its data dependencies out of the cache (or pulls them from the DVC remote), and runs the stage
with a plain `dvc repro`, which saves the outputs and a run-cache entry into the shared cache.
The orchestrating workspace then runs `dvc repro` of the same stage, which finds the run-cache
entry and checks the outputs out instead of running the stage again: the hand-over is DVC's.

Work trees stay between runs (``.graft/`` is ignored by git and DVC): an interrupted stage
resumes from its work tree's last epoch, and the next run only moves it to another commit.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from flows.dvc_commands import cache_dir, set_local_cache_dir
from graft.atomic import write_text
from graft.config.params import load_params

WORKTREES = Path(".graft", "worktrees")


class WorktreeError(RuntimeError):
    """git could not prepare a stage's work tree; the message says which command."""


def git(root: Path, *args: str, strip: bool = True) -> str:
    """``git <args>`` in ``root``; returns its stdout (``strip``: without surrounding
    whitespace). Raises WorktreeError with git's own message when it fails."""
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip()
        raise WorktreeError(f"`git {' '.join(args)}` in {root} failed: {message}")
    return done.stdout.strip() if strip else done.stdout


def head_commit(root: Path) -> str:
    """The full sha of ``root``'s HEAD. Raises WorktreeError outside a git repository or
    before its first commit."""
    return git(root, "rev-parse", "--verify", "HEAD^{commit}")


def snapshot_commit(root: Path) -> str:
    """A commit holding the working tree of ``root`` as it is now: HEAD when no tracked file
    differs from it, else a commit that `git stash create` makes of the changes (on no branch;
    the working tree, the index and the stash list are left as they are). Untracked files are
    not in it: see :func:`untracked_files`. Raises WorktreeError when git fails."""
    # A file rewritten with the same bytes (DVC rewrites dvc.lock) looks changed until the
    # index's stat data is refreshed; git before 2.40 then exits 1, silently, from `stash
    # create` when it finds nothing to save. Refresh first; its own exit code only says
    # that some files really changed.
    subprocess.run(["git", "update-index", "-q", "--refresh"], cwd=root, capture_output=True)
    done = subprocess.run(["git", "stash", "create"], cwd=root, capture_output=True, text=True)
    if done.returncode == 0 and done.stdout.strip():
        return done.stdout.strip()
    if done.returncode in (0, 1) and not done.stderr.strip():  # nothing to save
        return head_commit(root)
    raise WorktreeError(f"`git stash create` in {root} failed: {done.stderr.strip()}")


def uncommitted(root: Path, paths: list[str]) -> list[str]:
    """Those of ``paths`` (relative to ``root``) whose content is not HEAD's: modified, staged,
    deleted or untracked (ignored files are not looked at), sorted. Raises WorktreeError when
    git fails."""
    return sorted(path for path, _ in _status(root, paths))


def untracked_files(root: Path, paths: list[str]) -> list[str]:
    """Those of ``paths`` (relative to ``root``) that git does not track and does not ignore,
    sorted. Raises WorktreeError when git fails."""
    return sorted(path for path, code in _status(root, paths) if code == "??")


def _status(root: Path, paths: list[str]) -> list[tuple[str, str]]:
    """(path, two-letter status) of each of ``paths`` that differs from HEAD."""
    if not paths:
        return []
    status = git(
        root, "status", "--porcelain=v1", "-z", "--untracked-files=all", "--", *paths, strip=False
    )
    entries = iter(status.split("\0"))
    found = []
    for entry in entries:  # "XY path"; a rename or copy is followed by its old path alone
        if len(entry) > 3:
            found.append((entry[3:], entry[:2]))
            if entry[0] in "RC":
                next(entries, None)
    return found


def stage_worktree(clone: Path, stage: str, commit: str) -> Path:
    """The work tree of ``stage`` in the git clone ``clone``, checked out at ``commit``
    (detached) and sharing the clone's DVC cache, its local DVC config (a remote's
    credentials) and its machine-local state (:func:`_share_machine_state`).

    Creates it the first time and moves it to ``commit`` after; outputs and resume state left
    by an earlier run stay. Returns its path, ``clone/.graft/worktrees/<stage>``. Raises
    WorktreeError when git fails (``commit`` not in the clone, for one), DvcDataError when
    DVC cannot read either project's config.
    """
    path = clone / WORKTREES / stage
    if (path / ".git").is_file():
        git(path, "checkout", "--quiet", "--detach", "--force", commit)
    else:
        git(clone, "worktree", "prune")  # a work tree folder deleted by hand is forgotten
        if path.exists():
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        git(clone, "worktree", "add", "--quiet", "--detach", "--force", str(path), commit)
    local_config = clone / ".dvc" / "config.local"
    if local_config.is_file():
        shutil.copyfile(local_config, path / ".dvc" / "config.local")
    else:
        (path / ".dvc" / "config.local").unlink(missing_ok=True)
    set_local_cache_dir(path, cache_dir(clone))
    _share_machine_state(clone, path)
    return path


def _share_machine_state(clone: Path, worktree: Path) -> None:
    """Link the work tree's machine-local folders to the clone's: the decoded-image cache
    (``paths.decoded``) and ingest's verdict cache, which their builders lock and decoding
    everything again would cost what they exist to save, and the training stages' resume
    folders, so that an interrupted stage resumes wherever it runs next. One run of a stage
    at a time per clone (the workspace lock) keeps a resume folder to one writer."""
    paths = load_params(worktree / "params.yaml").paths
    shared = [paths.decoded, paths.ingest.cache]
    shared += [p.resume for p in (paths.pretrain, paths.finetune, paths.baseline) if p.resume]
    for relative in shared:
        if relative.is_absolute():
            continue  # one folder for every checkout already
        target = (clone / relative).resolve()
        link = worktree / relative
        if link.is_symlink() and link.resolve() == target:
            continue
        target.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.is_dir():
            shutil.rmtree(link)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target, target_is_directory=True)


def write_lock_file(worktree: Path, text: str) -> None:
    """Replace ``worktree``'s dvc.lock with ``text`` (the orchestrator's), atomically; an
    empty ``text`` (no stage recorded yet) removes it. Raises OSError."""
    if text:
        write_text(worktree / "dvc.lock", text)
    else:
        (worktree / "dvc.lock").unlink(missing_ok=True)
