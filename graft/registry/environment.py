"""The software and hardware a version was published from: Python, torch, CUDA, the device."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from typing import Any


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(device_setting: str, seed: int) -> dict[str, Any]:
    """The environment of this process, for a publish record: Python, platform, the versions
    of the packages that shape a result, CUDA, cuDNN and the GPU (None without CUDA), the
    device that ``device_setting`` (params' ``common.device``) resolves to here, and ``seed``.
    Returns a JSON-ready dict. Raises RuntimeError when torch cannot parse ``device_setting``."""
    import torch  # heavy: only when a record is made

    from graft.training.device import resolve_device

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": platform.platform(),
        "packages": {
            name: _version(name)
            for name in ("torch", "torchvision", "dvc", "gto", "pandas", "pillow", "graft")
        },
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "device": str(resolve_device(device_setting)),
        "device_setting": device_setting,
        "seed": seed,
    }
