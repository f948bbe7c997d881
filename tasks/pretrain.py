"""Stage ``pretrain``: train the backbone on the pretraining corpus (graft.training.pretrain)."""

from __future__ import annotations

from graft.config.architecture import check_arch
from graft.config.params import load_params
from graft.data import schemas
from graft.data.decoding import PillowLimits, configure_pillow
from graft.data.layout import manifest_path
from graft.training.determinism import use_deterministic_kernels
from graft.training.group import LOCAL, Group
from graft.training.launch import run_stage
from graft.training.pretrain import pretrain
from graft.training.stage import run_training_stage


def main(group: Group = LOCAL) -> None:
    """Run the ``pretrain`` stage with the project's params.yaml, from the project root, as
    one process or as one rank of a data-parallel ``group`` (graft.training.launch)."""
    use_deterministic_kernels()
    params = load_params()
    check_arch(params)  # before any work: pretrain.arch must be known to torchvision
    configure_pillow(PillowLimits.of(params.ingest))  # as ingest decoded
    splits = schemas.read_table(params.paths.split.splits, schemas.SPLITS_TABLE)
    dataset = params.paths.ingest.dataset
    run_training_stage(
        "pretrain",
        params.paths.pretrain,
        [params.pretrain, params.common],
        [params.paths.split.splits, manifest_path(dataset)],
        lambda resume: pretrain(
            splits,
            dataset,
            params.pretrain,
            params.common,
            resume=resume,
            decoded=params.paths.decoded,
            group=group,
        ),
        group=group,
    )


if __name__ == "__main__":
    run_stage("pretrain", main)
