"""Shared fixtures: small real image folders, a params writer, a real git + DVC project copy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import copy_demo_subset, make_dvc_project


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
def dvc_project(tmp_path: Path, sources: Path) -> Path:
    """A real git + DVC repository holding this project's pipeline, with tiny params.

    The image sources live outside the repository, as a user's own folders would.
    """
    return make_dvc_project(tmp_path / "repo", sources)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests where there is no CUDA device; run them where a GPU is lent."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
