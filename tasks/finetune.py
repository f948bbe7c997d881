"""Stage ``finetune``: graft the pretrained backbone onto a new head for the target classes.

Freeze and train the head, then unfreeze the deepest blocks at a low learning rate (see
graft.training.finetune).
"""

from __future__ import annotations

from graft.config.architecture import check_arch
from graft.config.params import load_params
from graft.data import schemas
from graft.data.decoding import PillowLimits, configure_pillow
from graft.data.layout import manifest_path
from graft.training.determinism import use_deterministic_kernels
from graft.training.finetune import finetune
from graft.training.group import LOCAL, Group
from graft.training.launch import run_stage
from graft.training.stage import run_training_stage


def main(group: Group = LOCAL) -> None:
    """Run the ``finetune`` stage with the project's params.yaml, from the project root, as
    one process or as one rank of a data-parallel ``group`` (graft.training.launch)."""
    use_deterministic_kernels()
    params = load_params()
    check_arch(params)  # before any work: pretrain.arch must be known to torchvision
    configure_pillow(PillowLimits.of(params.ingest))  # as ingest decoded
    splits = schemas.read_table(params.paths.split.splits, schemas.SPLITS_TABLE)
    dataset, backbone = params.paths.ingest.dataset, params.paths.pretrain.checkpoint
    run_training_stage(
        "finetune",
        params.paths.finetune,
        [params.finetune, params.common],
        [params.paths.split.splits, manifest_path(dataset), backbone],
        lambda resume: finetune(
            splits,
            dataset,
            params.finetune,
            params.common,
            backbone=backbone,
            arch=params.pretrain.arch,
            resume=resume,
            decoded=params.paths.decoded,
            group=group,
        ),
        group=group,
    )


if __name__ == "__main__":
    run_stage("finetune", main)
