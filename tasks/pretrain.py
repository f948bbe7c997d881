"""Stage ``pretrain``: train the backbone on the pretraining corpus (graft.training.pretrain)."""

from __future__ import annotations

from graft.config.params import load_params
from graft.data import schemas
from graft.data.layout import manifest_path
from graft.errors import run_main
from graft.training.pretrain import pretrain
from graft.training.stage import run_training_stage


def main() -> None:
    params = load_params()
    splits = schemas.read_table(params.paths.split.splits, schemas.SPLITS_TABLE)
    dataset = params.paths.ingest.dataset
    run_training_stage(
        "pretrain",
        params.paths.pretrain,
        [params.pretrain, params.common],
        [params.paths.split.splits, manifest_path(dataset)],
        lambda resume: pretrain(splits, dataset, params.pretrain, params.common, resume=resume),
    )


if __name__ == "__main__":
    run_main(main)
