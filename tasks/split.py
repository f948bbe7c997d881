"""Stage ``split``: assign every accepted image to train, val or test (see graft.data.split)."""

from __future__ import annotations

from graft import atomic
from graft.config.params import load_params
from graft.data.layout import read_manifest
from graft.data.split import count_table, make_splits, render_summary
from graft.errors import run_main


def main() -> None:
    """Split the manifest's accepted images and write ``paths.split.*``; run from the root.

    Raises ParamsError on bad params, TableError on a damaged manifest and SplitError when a
    class has too few images for the fractions.
    """
    params = load_params()
    manifest = read_manifest(params.paths.ingest.dataset)
    splits = make_splits(manifest, params.split, params.common.seed)
    atomic.write_csv(params.paths.split.splits, splits)
    atomic.write_json(params.paths.split.metrics, count_table(splits))
    atomic.write_text(params.paths.split.summary, render_summary(splits))
    print(splits.groupby(["role", "split"]).size().to_string())


if __name__ == "__main__":
    run_main(main)
