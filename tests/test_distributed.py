"""Data-parallel training without processes: how batches are shared between ranks, and which
settings a machine cannot honour (named before any work)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import tiny_params

from graft.config.checks import check_machine, distributed_problems
from graft.config.params import Augment, Common, Params, ParamsError, parse_params
from graft.data.loaders import ImageSet, InMemoryImages, make_loader
from graft.training.fit_state import FitState
from graft.training.group import Group

COMMON = Common(seed=5, image_size=12, mean=(0.5,) * 3, std=(0.25,) * 3, device="cpu")
AUGMENT = Augment(rotation=15, translate=0.1, hflip=True)


def image_set(count: int) -> ImageSet:
    pixels = torch.randint(0, 256, (count, 3, 12, 12), generator=torch.Generator().manual_seed(1))
    targets = torch.arange(count) % 3
    names = [f"{i}" for i in range(count)]
    return ImageSet(InMemoryImages(pixels.to(torch.uint8)), targets, ["a", "b", "c"], names, names)


def epoch(images: ImageSet, group: Group, **options: object) -> list[tuple[torch.Tensor, ...]]:
    batches = make_loader(images, COMMON, batch_size=8, group=group, **options)  # type: ignore[arg-type]
    return [pair for _ in range(2) for pair in batches]  # two epochs: new draws each


@pytest.mark.parametrize(("count", "world"), [(29, 2), (25, 3), (16, 2), (33, 4)])
def test_ranks_share_each_batch_and_augment_it_as_one_process_would(count: int, world: int) -> None:
    # 25 images in batches of 8 leave a last batch of 1, fewer than 3 ranks: it joins the one
    # before, so that each rank trains on something in every step. Its augmentation is then
    # drawn for 9 images, not 8 and 1: the same images in the same order, other draws.
    images = image_set(count)
    joined = bool(count % 8 and count % 8 < world)
    options = {"augment": None if joined else AUGMENT, "shuffle": True}
    alone = epoch(images, Group(), **options)
    shares = [epoch(images, Group(rank, world), **options) for rank in range(world)]
    steps = {len(share) for share in shares}
    assert len(steps) == 1  # every rank takes the same number of steps
    assert steps.pop() == len(alone) - (2 if joined else 0)
    together = [
        (torch.cat([s[step][0] for s in shares]), torch.cat([s[step][1] for s in shares]))
        for step in range(len(shares[0]))
    ]
    flat_alone = torch.cat([inputs for inputs, _ in alone])
    flat_together = torch.cat([inputs for inputs, _ in together])
    # The same images, in the same order, with the same augmentation (within float rounding
    # of the resampling, which does not depend on the batch here: exactly equal).
    assert torch.equal(flat_alone, flat_together)
    assert torch.equal(torch.cat([t for _, t in alone]), torch.cat([t for _, t in together]))
    assert all(len(s[step][1]) >= 1 for s in shares for step in range(len(s)))


def test_shares_name_the_positions_each_rank_reads_in_order() -> None:
    images = image_set(21)
    per_rank = []
    for rank in range(2):
        batches = make_loader(images, COMMON, batch_size=8, group=Group(rank, 2))
        read = torch.cat([targets for _, targets in batches])
        shares = batches.shares()
        assert torch.equal(images.targets[shares[rank]], read)
        per_rank.append(shares)
    assert all(torch.equal(a, b) for a, b in zip(*per_rank, strict=True))  # same on each rank
    assert sorted(torch.cat(per_rank[0]).tolist()) == list(range(21))
    with pytest.raises(ValueError, match="shuffled"):
        make_loader(images, COMMON, batch_size=8, shuffle=True).shares()


def test_a_resumed_rank_gets_its_own_random_state_back() -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    from graft.training.fit_state import Optimisation
    from graft.training.history import EarlyStopping, trainable_state

    optimisation = Optimisation(
        optimizer,
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2),
        torch.amp.GradScaler("cpu", enabled=False),
        None,
    )
    states = [torch.manual_seed(seed).get_state() for seed in (1, 2)]
    saved = FitState.capture(model, optimisation, EarlyStopping(1, trainable_state(model)), False)
    saved.torch_rng = torch.stack(states)  # as two ranks gathered them
    for rank in (0, 1):
        saved.restore(model, optimisation, 1, rank)
        assert torch.equal(torch.get_rng_state(), states[rank])


def distributed(sources: Path, **settings: object) -> Params:
    raw = tiny_params(sources)
    raw["common"]["distributed"] = settings
    return parse_params(raw)


def test_a_bad_distributed_setting_is_named(sources: Path) -> None:
    raw = tiny_params(sources)
    raw["common"]["distributed"] = {"nproc_per_node": 0, "nodes": 2}
    with pytest.raises(ParamsError) as error:
        parse_params(raw)
    assert "common.distributed.nproc_per_node" in str(error.value)
    assert "common.distributed.nodes: unknown key" in str(error.value)
    raw["common"]["distributed"] = {"nproc_per_node": 2}
    raw["run"]["distributed"] = {"master_port": 70000}
    with pytest.raises(ParamsError, match=r"run\.distributed\.master_port"):
        parse_params(raw)


def test_settings_this_machine_cannot_honour_are_named_before_any_work(sources: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    too_many = distributed(sources, nproc_per_node=cores + 1)
    assert [key for key, _ in distributed_problems(too_many)] == [
        "common.distributed.nproc_per_node"
    ]
    synced = distributed(sources, nproc_per_node=1, nnodes=2, sync_batchnorm=True)
    problems = dict(distributed_problems(synced, node_rank=2))
    assert "SyncBatchNorm needs CUDA" in problems["common.distributed.sync_batchnorm"]
    assert "0 to 1" in problems["--node-rank"]
    raw = tiny_params(sources)
    raw["common"]["distributed"] = {"nnodes": 2}
    raw["pretrain"]["batch_size"] = 1
    assert [key for key, _ in distributed_problems(parse_params(raw))] == ["pretrain.batch_size"]
    one = distributed(sources)
    assert distributed_problems(one) == []
    assert (
        one.common.processes.world_size == 1
        and parse_params(tiny_params(sources)).common.distributed is None
    )


def test_graft_check_and_the_flow_name_them_too(sources: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    with pytest.raises(ParamsError, match=r"common\.distributed\.nproc_per_node: .* CPU cores"):
        check_machine(distributed(sources, nproc_per_node=cores + 1))
    check_machine(distributed(sources, nproc_per_node=1))


def test_batches_per_epoch_are_counted_as_they_are_drawn() -> None:
    for count in range(1, 40):
        for batch_size in (1, 3, 8):
            for world in (1, 2, 3, 5):
                batches = make_loader(
                    image_set(count), COMMON, batch_size=batch_size, group=Group(0, world)
                )
                assert len(batches) == len(list(batches.positions)), (count, batch_size, world)
