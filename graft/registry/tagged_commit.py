"""A commit that lands with its tags or not at all, for ``graft publish``.

The commit is built on a scratch index, so neither HEAD nor the user's index (which may hold
other staged changes) moves until the tags can follow; moving HEAD and tagging are undone
together when either fails. Commit hooks do not run (``git commit-tree`` is plumbing).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from graft.registry.revisions import RevisionError, git


def _scratch_git(root: Path, index: Path, *args: str) -> str:
    """``git <args>`` in ``root`` on the index file ``index`` instead of the repository's own;
    returns its standard output. Raises RevisionError when git fails."""
    env = {**os.environ, "GIT_INDEX_FILE": str(index)}
    result = subprocess.run(["git", *args], cwd=root, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RevisionError(f"git {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def build_commit(root: Path, files: tuple[str, ...], message: str, parent: str | None) -> str:
    """A commit in the repository ``root``: the tree of ``parent`` (None in a repository
    without commits) with the working tree's ``files`` (those that exist), as a commit object
    that no branch points at yet, or ``parent`` itself when those files are unchanged. Returns
    its hash. Raises RevisionError when git fails."""
    present = [name for name in files if (root / name).exists()]
    # A scratch index, so that neither HEAD nor the user's index (which may hold other staged
    # changes) moves before the version is tagged; `git add` still applies git's filters.
    with tempfile.TemporaryDirectory(prefix="graft-publish-") as scratch:
        index = Path(scratch) / "index"
        _scratch_git(root, index, "read-tree", parent or "--empty")
        _scratch_git(root, index, "add", "--", *present)
        tree = _scratch_git(root, index, "write-tree").strip()
    if parent and tree == git(root, "rev-parse", f"{parent}^{{tree}}").strip():
        return parent
    parents = ["-p", parent] if parent else []
    return git(root, "commit-tree", tree, *parents, "-m", message).strip()


def commit_and_tag(
    root: Path,
    files: tuple[str, ...],
    parent: str | None,
    commit: str,
    tag: Callable[[], tuple[str, str | None]],
) -> tuple[str, str | None]:
    """Make ``commit`` (from :func:`build_commit` of ``files``) the head of the branch checked
    out in ``root`` in place of ``parent``, then call ``tag`` to tag it; all or nothing.

    Returns what ``tag`` returns. Raises what git or ``tag`` raise, after undoing every step
    that was done: the tags made on ``commit`` are deleted and HEAD moved back.
    """
    moves = commit != parent
    # HEAD moves first and the tags follow; a failure undoes both. A process killed in between
    # leaves an untagged commit whose tree the next publish finds unchanged, so it tags that
    # commit (tags first would leave a version on a commit outside every branch). Both moves
    # are compare-and-swap (an empty old value: the branch must not exist yet), so a commit
    # made meanwhile by someone else is never lost.
    if moves:
        git(root, "update-ref", "-m", "graft publish", "HEAD", commit, parent or "")
    before = set(git(root, "tag", "--points-at", commit).split())
    try:
        tags = tag()
    except BaseException:  # Ctrl-C too: never a commit without its tag
        made = set(git(root, "tag", "--points-at", commit).split()) - before
        if made:
            git(root, "tag", "-d", *sorted(made))
        if moves:
            undo = ["HEAD", parent, commit] if parent else ["-d", "HEAD", commit]
            git(root, "update-ref", "-m", "graft publish undone", *undo)
        raise
    # Stage what was committed, as `git commit` would have (the index was never touched).
    git(root, "reset", "-q", "--", *[n for n in files if (root / n).exists()])
    return tags
