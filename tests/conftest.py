"""Shared fixtures: small real image folders, a params writer, a real git + DVC project copy, a
real Prefect server per module that asks for one."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pytest
import yaml
from helpers import copy_demo_subset, make_dvc_project, tiny_params

from graft.config.params import Params, parse_params
from graft.data.ingest import ingest
from graft.data.split import make_splits

if TYPE_CHECKING:
    from deployed import Server


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    """Child processes a test starts (it appends them); any still running at its end are
    killed, and every one is waited for, so none outlives its test."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    """Small real image folders (12 digits per class plus the demo's broken files)."""
    return copy_demo_subset(tmp_path / "sources", per_class=12)


@pytest.fixture
def write_params(tmp_path: Path) -> Callable[[dict[str, Any]], Path]:
    def write(params: dict[str, Any]) -> Path:
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return path

    return write


@pytest.fixture
def prepared(sources: Path, tmp_path: Path) -> tuple[Params, pd.DataFrame, Path]:
    """Tiny params, the sources ingested into ``tmp_path`` and split: (params, splits, dataset)."""
    params = parse_params(tiny_params(sources))
    dataset = tmp_path / "ingested"
    manifest, _ = ingest(params.ingest, dataset, tmp_path / "cache")
    return params, make_splits(manifest, params.split, params.common.seed), dataset


@pytest.fixture
def dvc_project(tmp_path: Path, sources: Path) -> Path:
    """A real git + DVC repository holding this project's pipeline, with tiny params.

    The image sources live outside the repository, as a user's own folders would.
    """
    return make_dvc_project(tmp_path / "repo", sources)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real Prefect server for the module that asks for it: one per module, not per test."""
    from deployed import prefect_server  # Prefect only for the modules that need it

    with prefect_server(tmp_path_factory.mktemp("prefect-home")) as started:
        yield started


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests where there is no CUDA device; run them where a GPU is lent."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
