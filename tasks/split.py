"""Stage ``split``: assign every accepted image to train, val or test (see graft.data.split)."""

from __future__ import annotations

from graft import atomic
from graft.config.params import load_params
from graft.data.layout import read_manifest
from graft.data.split import render_summary, split_dataset, split_metrics
from graft.errors import run_main


def main() -> None:
    """Split the manifest's accepted images and write ``paths.split.*``; run from the root.

    Raises ParamsError on bad params, TableError on a damaged manifest and SplitError when a
    class has too few images for the fractions or its near-duplicate groups split it apart.
    """
    params = load_params()
    manifest = read_manifest(params.paths.ingest.dataset)
    outcome = split_dataset(manifest, params.split, params.common.seed)
    atomic.write_csv(params.paths.split.splits, outcome.splits)
    atomic.write_json(params.paths.split.metrics, split_metrics(outcome))
    atomic.write_text(params.paths.split.summary, render_summary(outcome))
    print(outcome.splits.groupby(["role", "split"]).size().to_string())


if __name__ == "__main__":
    run_main(main)
