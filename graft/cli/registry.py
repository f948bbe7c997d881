"""The ``graft publish`` and ``graft lineage`` commands: arguments and printed reports."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from graft.cli.help_format import HelpFormatter
from graft.errors import GraftError

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _print_json(payload: Any) -> None:
    json.dump(payload, sys.stdout, indent=1, default=str)
    print()


def _publish(arguments: argparse.Namespace) -> None:
    from graft.registry.publish import publish

    published = publish(
        arguments.root,
        bump=arguments.bump,
        version=arguments.version,
        stage=arguments.stage,
        push=not arguments.no_push,
        allow_dirty=arguments.allow_dirty,
    )
    print(f"published {published.tag} at commit {published.commit[:12]}")
    if published.stage_tag:
        print(f"stage: {published.stage_tag}")
    if published.pushed:
        print("data pushed to the DVC remote")
    else:
        print("data not pushed (--no-push)" if arguments.no_push else "no DVC remote: not pushed")
    print("share it: git push --follow-tags (and `dvc push` where data was not pushed)")


def _show(arguments: argparse.Namespace) -> None:
    from graft.registry.lineage import index_path, resolve, show
    from graft.registry.lineage_index import open_index

    root = arguments.root.resolve()
    made_by = _predictions_model(root, Path(arguments.ref))
    with open_index(index_path(root)) as index:
        lineage = show(root, resolve(root, made_by.ref if made_by else arguments.ref, index))
    if made_by is not None:
        lineage["predictions"] = made_by.report(lineage)
    if arguments.json:
        _print_json(lineage)
        return
    if made_by is not None:
        print("\n".join(made_by.lines(lineage)))
    name = lineage["tag"] or f"{lineage['name']} at {lineage['commit'][:12]} (not published)"
    model, finetune, pretrained = lineage["model"], lineage["finetune"], lineage["pretrained"]
    split, dataset, code = lineage["split"], lineage["dataset"], lineage["code"]
    provenance = (pretrained.get("provenance") or {}).get("backbone", {})
    lines = [
        f"{name}",
        f"  model      {model['path']}  sha256 {model['sha256']}",
        f"  finetune   stage {finetune.get('stage')}  from {finetune.get('init')}",
        f"             params {json.dumps(finetune.get('params'), sort_keys=True)}",
        f"  pretrained {pretrained['path']}  sha256 {pretrained['sha256']}",
        f"             origin {provenance.get('init')}, "
        f"extra {json.dumps(provenance.get('extra'))}",
        f"  split      {split['path']}  sha256 {split['sha256']}  md5 {split['md5']}",
    ]
    for role, splits in (split.get("counts") or {}).items():
        counts = ", ".join(f"{s} {c['total']}" for s, c in splits.items())
        lines.append(f"             {role}: {counts}")
    lines.append(
        f"  dataset    {dataset['path']}  md5 {dataset['md5']}  "
        f"manifest sha256 {dataset['manifest_sha256']}"
    )
    for role, accepted in (dataset.get("accepted") or {}).items():
        rejected = (dataset.get("rejected") or {}).get(role, {})
        reasons = ", ".join(f"{k} {v}" for k, v in rejected.items()) or "none"
        # Versions since the duplicates were counted apart; before, "rejected" held them.
        duplicates = (dataset.get("duplicates") or {}).get(role)
        kept_once = "" if duplicates is None else f"; duplicates {duplicates} (kept once)"
        lines.append(
            f"             {role}: {accepted['total']} images {accepted['classes']}; "
            f"rejected {reasons}{kept_once}"
        )
    for source in lineage["sources"]:
        if "sha256" in source:  # the scan stage's fingerprint
            pinned = f"{source['files']} files, fingerprint sha256 {source['sha256']}"
        else:  # before the scan stage: DVC's hash of the folder
            pinned = f"md5 {source['md5']}"
        lines.append(f"  source     {source['role']}: {source['path']}  {pinned}")
    dirty = {None: "unknown (not published)", True: "dirty", False: "clean"}[code["dirty"]]
    lines.append(f"  code       commit {code['commit']}  tree {dirty}")
    metrics = lineage["metrics"] or {}
    scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    lines.append(f"  metrics    {json.dumps(scalars)}")
    env = lineage["environment"]
    if env:
        packages = env.get("packages", {})
        lines.append(
            f"  environment python {env.get('python')}, torch {packages.get('torch')}, "
            f"torchvision {packages.get('torchvision')}, cuda {env.get('cuda')}, "
            f"cudnn {env.get('cudnn')}, device {env.get('device')}, seed {env.get('seed')}"
        )
    print("\n".join(lines))


def _predictions_model(root: Path, path: Path) -> Any:
    """The model behind the prediction file ``path`` (graft/inference/records.py), or None
    when ``path`` is not one. Raises GraftError when its rows name several models."""
    if not path.is_file():
        return None
    from graft.registry.prediction_lineage import predictions_model

    return predictions_model(root, path)


def _which_models(arguments: argparse.Namespace) -> None:
    from graft.hashing import file_sha256
    from graft.registry.lineage import index_path
    from graft.registry.lineage_index import open_index
    from graft.registry.lineage_queries import which_models

    root = arguments.root.resolve()
    image = arguments.image
    if Path(image).is_file():
        digest = file_sha256(Path(image))
    elif _SHA256.match(image.lower()):
        digest = image.lower()
    else:
        raise GraftError(f"{image} is neither a file nor a sha256 (64 hex digits)")
    with open_index(index_path(root)) as index:
        report = which_models(index, root, digest)
    if arguments.json:
        _print_json({"image": image, "sha256": digest, "versions": report})
        return
    print(f"image sha256 {digest}")
    for version in report:
        where = "; ".join(
            f"{e['role']}/{e['split']} ({e['path']})"
            if e["split"]
            else f"{e['role']} rejected: {e['verdict']} ({e['reason']}) {e['path']}"
            for e in version["entries"]
        )
        print(f"{version['tag']}\t{version['status']}\t{where or version.get('error', '')}")


def _diff(arguments: argparse.Namespace) -> None:
    from graft.registry.lineage import diff, index_path, resolve
    from graft.registry.lineage_index import open_index

    root = arguments.root.resolve()
    with open_index(index_path(root)) as index:
        a, b = resolve(root, arguments.a, index), resolve(root, arguments.b, index)
        changes = diff(root, index, a, b)
    if arguments.json:
        _print_json(changes)
        return
    print(f"{arguments.a} ({a.commit[:12]}) -> {arguments.b} ({b.commit[:12]})")
    print("images:")
    for group, change in changes["images"].items():
        for kind, sign in (("added", "+"), ("removed", "-")):
            for row in change[kind]:
                print(f"  {sign} {group}\t{row['sha256'][:16]}\t{row['path']}")
    print("params:")
    for key, values in changes["params"].items():
        print(f"  {key}: {values['a']} -> {values['b']}")
    print("code:")
    for commit in changes["code"]["commits"]:
        print(f"  {commit['commit'][:12]} {commit.get('subject', '')}")
    for path in changes["code"]["files"]:
        print(f"  changed {path}")
    print("metrics:")
    for key, values in changes["metrics"].items():
        delta = f" ({values['delta']:+.4f})" if values["delta"] is not None else ""
        print(f"  {key}: {values['a']} -> {values['b']}{delta}")


def _image(arguments: argparse.Namespace) -> None:
    from graft.atomic import atomic_path
    from graft.registry.images import image_bytes

    data = image_bytes(arguments.root.resolve(), arguments.sha256, arguments.rev)
    with atomic_path(arguments.out) as temporary:
        temporary.write_bytes(data)
    # image_bytes checked the bytes against the sha256 asked for: no second hash here.
    print(f"{arguments.out}: {len(data)} bytes, sha256 {arguments.sha256.lower()}")


ROOT_HELP = "the project root: the git repository holding dvc.yaml and params.yaml"

REF_FORMS = """\
REF names a model version in one of these forms (NAME is params.yaml's register.name):
  digits-5-9@v1.2.0        a published version: NAME@vX.Y.Z
  digits-5-9@latest        the highest published version of NAME
  digits-5-9#prod          the version assigned the stage prod (graft publish --stage prod)
  HEAD~3                   any git revision: a commit, branch or tag, published or not
  models/package/model.pt  a model file: the published version whose weights have its sha256
  predictions.csv          a `graft predict` output: the version its rows name (show only)
"""


def _parser(commands: Any, name: str, help: str, description: str | None = None) -> Any:
    return commands.add_parser(
        name, help=help, description=description, formatter_class=HelpFormatter
    )


def add_commands(commands: Any) -> None:
    """Add ``publish`` and ``lineage`` (show, which-models, diff, image) to ``commands``, the
    ``graft`` parser's subparsers; each parsed command carries its ``handler``. Raises
    argparse.ArgumentError when a command of the same name is already there."""
    publish = _parser(
        commands,
        "publish",
        help="publish the registered model as a new version (git tag in GTO's format)",
        description="Refuses unless `dvc status` is clean and the register gate passed. Pushes "
        "data to the default DVC remote when one is configured, then commits dvc.lock (with "
        "params.yaml and dvc.yaml) and tags <name>@vX.Y.Z; the first version is v1.0.0. A "
        "failure at any step leaves git as it was.",
    )
    publish.add_argument(
        "--bump",
        choices=("patch", "minor", "major"),
        default="patch",
        help="which part of the last version's vX.Y.Z goes up",
    )
    publish.add_argument("--version", help="explicit version, e.g. v2.0.0 (instead of --bump)")
    publish.add_argument(
        "--stage", metavar="NAME", help="also assign this registry stage, e.g. dev or prod"
    )
    publish.add_argument("--no-push", action="store_true", help="do not run `dvc push`")
    publish.add_argument(
        "--allow-dirty", action="store_true", help="publish with uncommitted tracked changes"
    )
    publish.add_argument("--root", type=Path, default=Path("."), help=ROOT_HELP)
    publish.set_defaults(handler=_publish)

    lineage = _parser(
        commands,
        "lineage",
        help="audit published model versions",
        description="What produced a model version, which versions trained on an image, what "
        "changed between two versions, and any ingested image byte for byte.\n\n" + REF_FORMS,
    )
    actions = lineage.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = _parser(
        actions,
        "show",
        help="what produced a version: weights, params, data, sources, code, environment",
        description=REF_FORMS,
    )
    show.add_argument("ref", metavar="REF", help="the version: see the forms above")
    which = _parser(
        actions,
        "which-models",
        help="every published version whose data held an image, and in which split",
        description="Builds or updates the index (paths.register.lineage_index) for versions "
        "it has not seen or could not read.",
    )
    which.add_argument(
        "image", metavar="IMAGE", help="an image file (its sha256 is taken) or a sha256"
    )
    diff = _parser(
        actions,
        "diff",
        help="images, params, code and metrics from A to B",
        description=REF_FORMS.replace("REF names", "A and B each name"),
    )
    diff.add_argument("a", metavar="A", help="the earlier version: see the forms above")
    diff.add_argument("b", metavar="B", help="the later version: see the forms above")
    image = _parser(
        actions,
        "image",
        help="one ingested image, byte for byte, at any revision (from the DVC cache or remote)",
    )
    image.add_argument(
        "sha256",
        metavar="SHA256",
        help="the image's content hash, as the manifest and lineage list it",
    )
    image.add_argument("--rev", default="HEAD", help="git revision or version tag")
    image.add_argument("-o", "--out", type=Path, required=True, help="file to write")
    image.add_argument("--root", type=Path, default=Path("."), help=ROOT_HELP)
    image.set_defaults(handler=_image)
    for parser, handler in ((show, _show), (which, _which_models), (diff, _diff)):
        parser.add_argument("--json", action="store_true", help="print JSON")
        parser.add_argument("--root", type=Path, default=Path("."), help=ROOT_HELP)
        parser.set_defaults(handler=handler)
