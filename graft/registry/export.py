"""The portable export of a fine-tuned model: one ``torch.export`` program that needs torch only.

The program (``model.pt2`` in the register stage's package) holds the network together with
graft's preprocessing constants, so a user without graft feeds it decoded pixels and gets
class probabilities. Its input is what ``torch.from_numpy(np.asarray(image))[None]`` gives for
an S x S RGB PIL image: uint8 (N, S, S, 3), HWC, RGB, 0-255, S the checkpoint's image size.
Inside it permutes to NCHW, scales to 0-1, normalises with the checkpoint's mean and std, runs
the network and returns softmax probabilities, float32 (N, classes) in the classes' index order.
The batch size N is dynamic (1 or more).

The archive also holds ``graft.json`` (:data:`METADATA`): the classes, image size, mean, std,
architecture, the input and output described in words and the sha256 of the checkpoint it was
exported from. Read it with ``torch.export.load(path, extra_files={"graft.json": ""})``.

Decoding a file into those pixels is not part of the program: graft's decoding (EXIF rotation,
alpha composited on black, high-bit-depth stretch, bilinear resize) stays graft's.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graft.hashing import file_sha256
from graft.registry.package_layout import PROGRAM
from graft.training.checkpoints import CheckpointMeta, model_from_checkpoint

FORMAT = "torch.export"
METADATA = "graft.json"  # the metadata file inside the program's archive
METADATA_FORMAT = "graft-export/1"
INPUT_LAYOUT = "uint8 (N, S, S, 3): HWC RGB pixels 0-255, S = image_size, any batch size N >= 1"
OUTPUT = "float32 (N, classes): softmax probabilities, classes in index order"
EXAMPLE_BATCH = 2  # torch.export specialises sizes 0 and 1: trace with a batch above both


class Preprocessed(nn.Module):
    """``network`` behind graft's normalisation and a softmax.

    Input: uint8 (N, S, S, 3), HWC RGB 0-255. Output: float32 (N, classes), probabilities.
    ``mean`` and ``std`` are per RGB channel on the 0-1 scale.
    """

    mean: torch.Tensor  # buffers, float32 (1, 3, 1, 1): saved in the program with the weights
    std: torch.Tensor

    def __init__(self, network: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Probabilities, float32 (N, classes), of uint8 ``images`` (N, S, S, 3)."""
        pixels = images.permute(0, 3, 1, 2).to(torch.float32)
        # x * (1 / 255), then - mean, / std: the very operations of training's normalisation
        # (graft.data.augment), in its order, so the results agree bit for bit.
        normalised = pixels.mul(1.0 / 255).sub(self.mean).div(self.std)
        return torch.softmax(self.network(normalised), dim=1)


def metadata(meta: CheckpointMeta, weights_sha256: str) -> dict[str, Any]:
    """The program's ``graft.json``: what a user needs to feed it and read its output, from the
    checkpoint's ``meta`` and the sha256 (hex) of the checkpoint file. Raises nothing."""
    return {
        "format": METADATA_FORMAT,
        "arch": meta.arch,
        "classes": meta.classes,
        "image_size": meta.image_size,
        "mean": meta.mean,
        "std": meta.std,
        "input": INPUT_LAYOUT,
        "output": OUTPUT,
        "weights_sha256": weights_sha256,
    }


def card_section(image_size: int) -> dict[str, Any]:
    """The model card's ``export`` section: the program's file in the package, its format, the
    metadata file inside it, its input (layout, and ``image_size`` S in pixels) and output.
    Raises nothing."""
    return {
        "file": PROGRAM,
        "format": FORMAT,
        "metadata": METADATA,
        "input": {"layout": INPUT_LAYOUT, "image_size": image_size},
        "output": OUTPUT,
    }


def export_program(checkpoint: Path) -> bytes:
    """The exported program of the graft checkpoint at ``checkpoint``, as the bytes of a
    ``torch.export`` archive with ``graft.json`` inside (see the module's docstring for its
    input and output). Traced in eval mode on the CPU; the same checkpoint gives the same
    bytes wherever graft is installed (no source paths are kept). Raises CheckpointError when
    the checkpoint is missing, not graft's or its weights do not fit, and torch's errors when
    the network cannot be exported."""
    # Building the network draws random initial weights; keep the caller's RNG as it was.
    with torch.random.fork_rng(devices=[]):
        network, meta = model_from_checkpoint(checkpoint)
    module = Preprocessed(network, meta.mean, meta.std).eval()
    size = meta.image_size
    example = torch.zeros((EXAMPLE_BATCH, size, size, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    # Each node records the source lines that made it, with their files' absolute paths: the
    # same model exported from another checkout (a work tree, another machine's clone) would
    # differ in bytes, and DVC would see a new package. Debug information only.
    for node in program.graph.nodes:
        node.meta.pop("stack_trace", None)
    facts = metadata(meta, file_sha256(checkpoint))
    buffer = io.BytesIO()  # not a file path: torch would write the file's name into the zip
    torch.export.save(
        program, buffer, extra_files={METADATA: json.dumps(facts, indent=2, sort_keys=True)}
    )
    return buffer.getvalue()


def load_program(path: Path) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """The exported program at ``path`` and its parsed ``graft.json``. Call
    ``program.module()(images)`` to classify. Raises OSError when the file cannot be read,
    RuntimeError (torch's) when it is not an exported program, and ValueError when it holds
    no valid ``graft.json``."""
    extra = {METADATA: ""}
    program = torch.export.load(path, extra_files=extra)
    if not extra[METADATA]:
        raise ValueError(f"{path} holds no {METADATA}: not exported by graft")
    return program, json.loads(extra[METADATA])
