"""Calling the training library leaves the caller's global state as it was."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_params

from graft.config.params import parse_params
from graft.data.ingest import ingest
from graft.data.split import make_splits
from graft.training.determinism import seeded
from graft.training.pretrain import pretrain
from graft.training.trained import TrainedModel


def test_pretrain_restores_the_rngs_and_sets_no_process_wide_switch(
    sources: Path, tmp_path: Path
) -> None:
    params = parse_params(tiny_params(sources))
    manifest, _ = ingest(params.ingest, tmp_path / "ingested", tmp_path / "cache")
    splits = make_splits(manifest, params.split, params.common.seed)

    def seed_and_draw(between: Callable[[], None] | None = None) -> list[float]:
        """A caller's own seeding and draws, with ``between`` called in between."""
        random.seed(123)
        np.random.seed(123)
        torch.manual_seed(123)
        if between is not None:
            between()
        return [random.random(), *np.random.random_sample(2).tolist(), *torch.rand(2).tolist()]

    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    environment = dict(os.environ)
    trained: list[TrainedModel] = []

    def train() -> None:
        trained.append(pretrain(splits, tmp_path / "ingested", params.pretrain, params.common))

    assert seed_and_draw(train) == seed_and_draw()  # pretrain drew from each, then put it back
    assert trained[0].outcome.history  # it did train
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert torch.is_deterministic_algorithms_warn_only_enabled() == warn_only
    assert dict(os.environ) == environment


def test_a_seeded_block_restores_the_generators_even_when_it_raises() -> None:
    before = torch.get_rng_state(), random.getstate()
    with pytest.raises(RuntimeError), seeded(7):
        torch.rand(3)
        random.random()
        raise RuntimeError("a failing core")
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
