"""Seeded, reproducible runs without process-wide side effects from the library.

:func:`seeded` is what the library's training and evaluation cores use: it seeds every random
number generator a run draws from and puts their previous states back afterwards, so calling a
core leaves the caller's RNGs as they were. :func:`use_deterministic_kernels` flips torch's
process-wide switches; only entry points (``tasks/<stage>.py``, benchmarks, tests) call it.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed Python's, numpy's and torch's global generators (CPU and CUDA) for the block.

    On exit every one of them is back in the state it had before, whatever the block drew.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    # Every CUDA device's generator too: manual_seed seeds them all.
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def use_deterministic_kernels() -> None:
    """Ask torch for deterministic kernels in this process (an entry point's decision).

    cuBLAS is deterministic only with a fixed workspace, which must be configured before its
    first use; kernels without a deterministic version warn instead of failing.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
