"""Time ``graft lineage which-models`` on 10 published versions of a 25,000-image dataset.

Training ten models would take hours and measure training, not lineage, so the versions are
synthesised: a real git + DVC repository whose ``dvc.yaml`` declares graft's three outputs that
the lineage index reads (the ingested dataset folder holding ``manifest.csv``, ``splits.csv``
and the model package holding ``model_card.json``), at the paths of the project's own
``params.yaml``. For each version the script writes a manifest of --images accepted images
(plus a few rejected files) and its splits table, with 1% of the images replaced since the
previous version, runs ``dvc commit`` (real hashes in ``dvc.lock``, real DVC cache), commits
with git and creates the annotated GTO tag ``<name>@vX.Y.Z`` that ``graft publish`` creates.
``which-models`` then reads every version through the same code as for real ones: tags from
git, ``dvc.lock`` and ``params.yaml`` at each tagged commit, the tables from the DVC cache.
The images themselves are not written: which-models never opens them.

Measures the ``graft lineage which-models`` command (a fresh process, as a user runs it):
cold (no index: every version is read and indexed), warm (index up to date; best of
--repeat), and after publishing one more version (only that one is indexed). Prints a table
and, last, one JSON line with the figures.

    python benchmarks/lineage.py --versions 10 --images 25000 --dir /tmp/graft-lineage-bench
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
NAME = "bench-model"
SPLITS = ("train", "val", "test")
DVC_YAML = """\
stages:
  ingest:
    cmd: echo synthesised by benchmarks/lineage.py
    outs: [data/ingested]
  split:
    cmd: echo synthesised by benchmarks/lineage.py
    deps: [data/ingested]
    outs: [data/splits.csv]
  register:
    cmd: echo synthesised by benchmarks/lineage.py
    deps: [data/splits.csv]
    outs: [models/package]
"""


def run(command: list[str], cwd: Path) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def image_sha(number: int) -> str:
    return hashlib.sha256(f"image-{number}".encode()).hexdigest()


def write_version(repo: Path, first: int, count: int, version: int) -> None:
    """Images ``first`` .. ``first + count - 1``, half pretrain, half target, ten classes each."""
    manifest = ["role,path,sha256,label,width,height,mode,format,bytes,verdict,reason"]
    splits = ["role,sha256,label,split,path"]
    for number in range(first, first + count):
        role = "pretrain" if number % 2 else "target"
        label = f"{role[0]}{number % 10}"
        sha, path = image_sha(number), f"{label}/img-{number:06d}.jpg"
        manifest.append(f"{role},{path},{sha},{label},500,375,RGB,JPEG,32000,accepted,")
        split = SPLITS[hashlib.sha256(sha.encode()).digest()[0] % 3]
        splits.append(f"{role},{sha},{label},{split},{path}")
    for broken in range(30):  # a few rejected files, as a real ingest has
        manifest.append(f"target,t0/broken-{broken}.jpg,,t0,,,,,0,zero_byte,file is empty")
    dataset = repo / "data" / "ingested"
    dataset.mkdir(parents=True, exist_ok=True)
    (dataset / "manifest.csv").write_text("\n".join(manifest) + "\n")
    (repo / "data" / "splits.csv").write_text("\n".join(splits) + "\n")
    package = repo / "models" / "package"
    package.mkdir(parents=True, exist_ok=True)
    weights = hashlib.sha256(f"weights-{version}".encode()).hexdigest()
    card = {"name": NAME, "inputs_sha256": {"weights": weights}, "metrics": {"accuracy": 0.9}}
    (package / "model_card.json").write_text(json.dumps(card))


def publish_version(repo: Path, version: int, images: int, churn: int) -> None:
    write_version(repo, first=version * churn, count=images, version=version)
    run([sys.executable, "-m", "dvc", "commit", "-f", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", f"version {version}"], repo)
    tag = f"{NAME}@v1.{version}.0"
    run(
        ["git", "tag", "-a", tag, "-m", f"Registering artifact {NAME} version v1.{version}.0"], repo
    )


def build(repo: Path, versions: int, images: int, churn: int) -> None:
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    run(["git", "init", "-q", "-b", "main"], repo)
    run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / ".gitignore").write_text("/data/\n/models/\n/.graft/\n")
    for version in range(versions):
        publish_version(repo, version, images, churn)


def which_models(repo: Path, sha: str) -> tuple[float, dict[str, object]]:
    command = [sys.executable, "-m", "graft.cli.main", "lineage", "which-models", sha, "--json"]
    start = time.perf_counter()
    output = run([*command, "--root", str(repo)], ROOT)
    return time.perf_counter() - start, json.loads(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--versions", type=int, default=10)
    parser.add_argument("--images", type=int, default=25_000)
    parser.add_argument("--churn", type=int, default=250, help="images replaced per version")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/graft-lineage-bench"))
    arguments = parser.parse_args()
    repo = arguments.dir / "repo"

    start = time.perf_counter()
    build(repo, arguments.versions, arguments.images, arguments.churn)
    build_s = time.perf_counter() - start
    # In versions 0-2 only: version 3 starts at image 3 * churn.
    probe = image_sha(2 * arguments.churn)
    index = repo / ".graft" / "lineage.sqlite"
    index.unlink(missing_ok=True)

    cold_s, report = which_models(repo, probe)
    statuses = [v["status"] for v in report["versions"]]  # type: ignore[attr-defined]
    expected = ["used"] * 3 + ["absent"] * (arguments.versions - 3)
    if statuses != expected:
        raise SystemExit(f"wrong answer: {statuses}")
    warm_s = min(which_models(repo, probe)[0] for _ in range(arguments.repeat))
    publish_version(repo, arguments.versions, arguments.images, arguments.churn)
    incremental_s, _ = which_models(repo, probe)

    rows = [
        ("which-models, cold (index built for every version)", cold_s),
        (f"which-models, warm (best of {arguments.repeat})", warm_s),
        ("which-models after one more version (indexes only it)", incremental_s),
    ]
    print(
        f"{arguments.versions} versions x {arguments.images} images "
        f"({arguments.churn} replaced per version); repository built in {build_s:.0f}s\n"
    )
    print("| command | seconds |\n| --- | --- |")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.2f} |")
    print(
        json.dumps(
            {
                "versions": arguments.versions,
                "images": arguments.images,
                "index_mb": round(index.stat().st_size / 1e6, 1),
                "cold_s": round(cold_s, 2),
                "warm_s": round(warm_s, 2),
                "incremental_s": round(incremental_s, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
