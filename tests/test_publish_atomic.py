"""`graft publish` with and without a DVC remote, and all or nothing when a step fails.

Publish needs a clean `dvc status`, a model card in the register stage's package and a valid
params.yaml; what trained the model is no concern of it. So each test builds a tiny real git +
DVC project whose one stage writes such a package (seconds, where the pipeline takes minutes),
and calls publish in-process, with the real git, DVC and GTO.
"""

from __future__ import annotations

from pathlib import Path

import gto.api
import pytest
import yaml
from helpers import run, tiny_params

from graft.registry.publish import AlreadyPublished, PublishError, default_remote, publish

NAME = "digits-5-9"  # register.name in the project's params.yaml
PIPELINE = """\
stages:
  register:
    cmd: python make_package.py
    deps: [make_package.py]
    outs: [models/package]
"""
MAKE_PACKAGE = """\
import json, pathlib
package = pathlib.Path("models/package")
package.mkdir(parents=True, exist_ok=True)
(package / "model.pt").write_bytes(b"weights")
card = {
    "metrics": {"accuracy": 0.9, "per_class": {"5": {"recall": 0.9}}},
    "inputs_sha256": {"weights": "ab" * 32},
}
(package / "model_card.json").write_text(json.dumps(card))
"""


@pytest.fixture(autouse=True)
def _no_dvc_analytics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")  # publish runs dvc itself, in-process


def tiny_project(repo: Path, remote: Path | None = None, first_commit: bool = True) -> Path:
    """A git + DVC project at ``repo`` whose one stage writes a registered package, run and
    up to date; the pipeline (and ``remote`` as the default DVC remote) committed unless not
    ``first_commit``, its dvc.lock left for publish to commit."""
    repo.mkdir()
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(repo / "sources")))
    (repo / "dvc.yaml").write_text(PIPELINE)
    (repo / "make_package.py").write_text(MAKE_PACKAGE)
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["git", "config", "user.name", "graft tests"], repo)
    run(["git", "config", "user.email", "tests@graft.invalid"], repo)
    run(["dvc", "init", "-q"], repo)
    if remote is not None:
        run(["dvc", "remote", "add", "-d", "store", str(remote)], repo)
    if first_commit:
        run(["git", "add", "-A"], repo)
        run(["git", "commit", "-q", "-m", "pipeline"], repo)
    else:
        run(["git", "rm", "-r", "-q", "--cached", "."], repo)  # what `dvc init` staged
    run(["dvc", "repro", "-q"], repo)
    return repo


def git_state(repo: Path) -> dict[str, str]:
    """Everything publish may change in git: HEAD, the index, the status and the tags."""
    head = run(["git", "rev-parse", "--verify", "-q", "HEAD"], repo, check=False).stdout
    return {
        "head": head,
        "index": run(["git", "ls-files", "--stage"], repo).stdout,
        "status": run(["git", "status", "--porcelain"], repo).stdout,
        "tags": run(["git", "tag", "-l"], repo).stdout,
    }


def test_without_a_remote_publish_commits_and_tags(tmp_path: Path) -> None:
    repo = tiny_project(tmp_path / "repo")
    assert default_remote(repo) is None  # `dvc config core.remote` exits 0 here too
    parent = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    published = publish(repo)
    assert (published.tag, published.pushed) == (f"{NAME}@v1.0.0", False)
    head = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    tagged = run(["git", "rev-parse", f"{published.tag}^{{commit}}"], repo).stdout.strip()
    assert head == tagged == published.commit
    assert run(["git", "rev-parse", "HEAD~1"], repo).stdout.strip() == parent
    assert run(["git", "log", "-1", "--format=%s"], repo).stdout.strip() == (
        f"Publish {NAME} v1.0.0"
    )
    assert "dvc.lock" in run(["git", "show", "--name-only", "--format=", "HEAD"], repo).stdout
    # The index holds what was committed, as after `git commit`: nothing staged, nothing dirty.
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], repo).stdout == ""
    with pytest.raises(AlreadyPublished, match=f"{NAME}@v1.0.0"):
        publish(repo)


def test_with_a_remote_the_data_is_pushed(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    repo = tiny_project(tmp_path / "repo", remote)
    assert default_remote(repo) == "store"
    published = publish(repo, stage="prod")
    assert published.pushed and published.stage_tag == f"{NAME}#prod#1"
    card = (repo / "models/package/model_card.json").read_bytes()
    pushed = [p.read_bytes() for p in (remote / "files").rglob("*") if p.is_file()]
    assert card in pushed


def test_a_failed_push_leaves_git_as_it_was(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    remote.write_text("a file, where DVC needs a folder")
    repo = tiny_project(tmp_path / "repo", remote)
    with (repo / ".dvcignore").open("a") as dvcignore:
        dvcignore.write("# a change staged by hand: not published, and still staged after\n")
    run(["git", "add", ".dvcignore"], repo)
    before = git_state(repo)
    with pytest.raises(PublishError, match="dvc push failed"):
        publish(repo, allow_dirty=True)
    assert git_state(repo) == before
    remote.unlink()  # now the remote can be written: the same workspace publishes
    published = publish(repo, allow_dirty=True)
    assert published.tag == f"{NAME}@v1.0.0" and published.record["dirty_files"] == [".dvcignore"]
    assert run(["git", "diff", "--cached", "--name-only"], repo).stdout == ".dvcignore\n"


@pytest.mark.parametrize(
    ("failing", "stage", "first_commit"),
    [("register", None, True), ("assign", "prod", True), ("register", None, False)],
    ids=["version-tag", "stage-tag", "no-commit-yet"],
)
def test_a_failure_after_the_commit_undoes_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    failing: str,
    stage: str | None,
    first_commit: bool,
) -> None:
    repo = tiny_project(tmp_path / "repo", first_commit=first_commit)
    before = git_state(repo)
    real = getattr(gto.api, failing)
    calls = []

    def fail(*args: object, **kwargs: object) -> object:
        calls.append(args)
        if failing == "assign":  # the version tag exists by now: it must go too
            assert f"{NAME}@v1.0.0" in run(["git", "tag", "-l"], repo).stdout
        raise RuntimeError("injected")

    monkeypatch.setattr(gto.api, failing, fail)
    with pytest.raises(RuntimeError, match="injected"):
        publish(repo, stage=stage)
    assert calls and git_state(repo) == before
    monkeypatch.setattr(gto.api, failing, real)
    published = publish(repo, stage=stage)  # nothing left behind stands in the way
    assert published.tag == f"{NAME}@v1.0.0"
    assert run(["git", "rev-parse", "HEAD"], repo).stdout.strip() == published.commit


def test_a_version_left_untagged_by_a_killed_publish_is_tagged_next_time(tmp_path: Path) -> None:
    repo = tiny_project(tmp_path / "repo")
    # What a publish killed between moving HEAD and tagging leaves: HEAD on the publish commit,
    # untagged, and the index as it was before (without dvc.lock).
    run(["git", "add", "dvc.lock"], repo)
    tree = run(["git", "write-tree"], repo).stdout.strip()
    run(["git", "rm", "-q", "--cached", "dvc.lock"], repo)
    message = f"Publish {NAME} v1.0.0"
    head = run(["git", "commit-tree", tree, "-p", "HEAD", "-m", message], repo).stdout.strip()
    run(["git", "update-ref", "HEAD", head], repo)
    published = publish(repo)
    assert published.commit == head and published.tag == f"{NAME}@v1.0.0"
    assert run(["git", "rev-parse", "HEAD"], repo).stdout.strip() == head
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], repo).stdout == ""
