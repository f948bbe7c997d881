"""Stage ``baseline``: the finetune recipe started from random weights instead of the backbone.

Same target data, same two phases, same params and the same architecture as the pretrained
backbone (``pretrain.arch``); only the starting weights differ. ``evaluate`` scores it beside
the fine-tuned model, and the difference is the transfer gain: what pretraining bought. It
does not read the pretrained checkpoint, so re-running pretrain never re-trains it. The work
is graft.training.finetune's, with no backbone.
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
    """Run the ``baseline`` stage with the project's params.yaml, from the project root, as
    one process or as one rank of a data-parallel ``group`` (graft.training.launch)."""
    use_deterministic_kernels()
    params = load_params()
    check_arch(params)  # before any work: pretrain.arch must be known to torchvision
    configure_pillow(PillowLimits.of(params.ingest))  # as ingest decoded
    splits = schemas.read_table(params.paths.split.splits, schemas.SPLITS_TABLE)
    dataset, arch = params.paths.ingest.dataset, params.pretrain.arch
    run_training_stage(
        "baseline",
        params.paths.baseline,
        [params.finetune, params.common, arch],
        [params.paths.split.splits, manifest_path(dataset)],
        lambda resume: finetune(
            splits,
            dataset,
            params.finetune,
            params.common,
            backbone=None,
            arch=arch,
            resume=resume,
            decoded=params.paths.decoded,
            group=group,
        ),
        group=group,
    )


if __name__ == "__main__":
    run_stage("baseline", main)
