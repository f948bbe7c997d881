"""The exported program (model.pt2) classifies as graft does, with torch alone.

A real resnet18 checkpoint at 32 px is exported; a subprocess in which any import of graft
fails loads the program, classifies graft-decoded pixels (one batch, and one image at a time)
and runs the "Use it without graft" code of the model card on image files. Both must agree
with graft's eager path (the checkpoint's network on decode_square's pixels, normalised as
training normalises them) and with what `graft predict` writes for the same files.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DEMO, ROOT, snippet_of
from PIL import Image

from graft.data.augment import BatchTransform
from graft.data.decoding import decode_square
from graft.hashing import file_sha256
from graft.registry.card_markdown import SNIPPET_IMAGE, export_lines
from graft.registry.export import (
    METADATA,
    card_section,
    export_program,
    load_program,
    metadata,
)
from graft.registry.package_layout import PROGRAM
from graft.training.checkpoints import CheckpointMeta, model_from_checkpoint, save_checkpoint
from graft.training.models import build_model

SIZE = 32  # pixels, as the demo trains
CLASSES = ["5", "6", "7"]
TOLERANCE = 1e-5  # probabilities, 0-1

# Run in the package's folder by a Python that cannot import graft. Argument: a JSON object
# with "files" (images for the card's code) and "snippet" (that code). Prints JSON.
WITHOUT_GRAFT = """
import sys
sys.modules["graft"] = None  # any import of graft (or graft.*) now raises ImportError
import json, shutil
import numpy as np, torch

job = json.loads(sys.argv[1])
try:
    import graft  # noqa: F401
    reachable = True
except ImportError:
    reachable = False
extra = {"graft.json": ""}
program = torch.export.load("model.pt2", extra_files=extra).module()
pixels = torch.from_numpy(np.load("pixels.npy"))
with torch.no_grad():
    batch = program(pixels).tolist()
    single = [program(pixels[i : i + 1])[0].tolist() for i in range(len(pixels))]
snippet = []
for path in job["files"]:
    shutil.copyfile(path, job["image"])
    scope = {}
    exec(job["snippet"], scope)
    snippet.append(scope["probabilities"].tolist())
loaded = sorted(
    name for name, module in sys.modules.items()
    if module is not None and (name == "graft" or name.startswith("graft."))
)
print(json.dumps({"graft_importable": reachable, "graft_modules": loaded,
                  "metadata": json.loads(extra["graft.json"]), "batch": batch,
                  "single": single, "snippet": snippet}))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A graft checkpoint of a randomly initialised resnet18 (seeded), 3 classes, 32 px, with
    mean and std that differ per channel (so a channel mix-up would show)."""
    path = tmp_path_factory.mktemp("checkpoint") / "model.pt"
    torch.manual_seed(7)
    meta = CheckpointMeta(
        arch="resnet18", classes=CLASSES, image_size=SIZE, mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225], epoch=3, metrics={"val_accuracy": 0.9}, init="scratch",
    )  # fmt: skip
    save_checkpoint(path, build_model("resnet18", len(CLASSES)).eval(), meta)
    return path


@pytest.fixture(scope="module")
def package(checkpoint: Path) -> Path:
    """A folder holding the checkpoint's exported program, as the package does."""
    folder = checkpoint.parent / "package"
    folder.mkdir()
    (folder / PROGRAM).write_bytes(export_program(checkpoint))
    return folder


@pytest.fixture(scope="module")
def images(checkpoint: Path) -> list[Path]:
    """Image files: demo target digits (8 px grayscale PNG, one per class), a 48 px RGB PNG,
    an RGB JPEG whose EXIF says to rotate it, and an RGBA PNG with partly transparent pixels
    (last)."""
    folder = checkpoint.parent / "images"
    folder.mkdir()
    # The demo holds broken and odd files on purpose: take plain ones that decode.
    plain = [p for p in sorted((DEMO / "target").rglob("*.png")) if _plain_width(p)]
    digits = [next(p for p in plain if p.parent.name == label) for label in CLASSES]
    rng = np.random.default_rng(3)
    # Not square, and different left to right: a rotation that is not applied shows.
    photo = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated = folder / "rotated.jpg"
    photo.save(rotated, exif=exif, quality=95)
    large = folder / "large.png"  # larger than S: resized down
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(large)
    rgba = rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)
    translucent = folder / "translucent.png"
    Image.fromarray(rgba, "RGBA").save(translucent)
    return [*digits, large, rotated, translucent]


def _plain_width(path: Path) -> int:
    """The width of an 8-bit grayscale or RGB image file that decodes whole; 0 for others."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.width if image.mode in ("L", "RGB") else 0
    except Exception:  # the demo's broken files raise whatever their decoder raises
        return 0


def eager_probabilities(checkpoint: Path, files: Sequence[Path]) -> np.ndarray:
    """Graft's own answer: the checkpoint's network (eval mode) on each file decoded by
    decode_square and normalised by training's BatchTransform; float (files, classes)."""
    network, meta = model_from_checkpoint(checkpoint)
    pixels = np.stack([decode_square(path.read_bytes(), meta.image_size) for path in files])
    transform = BatchTransform(tuple(meta.mean), tuple(meta.std), None)
    with torch.no_grad():
        logits = network.eval()(transform(torch.from_numpy(pixels).permute(0, 3, 1, 2)))
    return torch.softmax(logits, dim=1).numpy()


def graft_predict(checkpoint: Path, files: Sequence[Path]) -> np.ndarray:
    """What `graft predict` (the command, in a subprocess) gives ``files`` with the model
    ``checkpoint``: probabilities, float (files, classes) in the checkpoint's class order."""
    out = checkpoint.parent / "predictions.jsonl"
    command = [sys.executable, "-m", "graft.cli.main", "predict", str(checkpoint), *map(str, files)]
    done = subprocess.run(
        [*command, "--top-k", str(len(CLASSES)), "-o", str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["path"] for row in rows] == [str(path) for path in files]
    ranked = [{top["class"]: top["probability"] for top in row["top_k"]} for row in rows]
    return np.array([[by_class[label] for label in CLASSES] for by_class in ranked])


def without_graft(package: Path, files: Sequence[Path], snippet: str) -> dict:
    """Run WITHOUT_GRAFT in ``package``, a folder with model.pt2 and pixels.npy: its JSON."""
    job = {"files": [str(path) for path in files], "snippet": snippet, "image": SNIPPET_IMAGE}
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_GRAFT, json.dumps(job)],
        cwd=package, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_program_classifies_as_graft_does_without_graft(
    checkpoint: Path, package: Path, images: list[Path]
) -> None:
    expected = eager_probabilities(checkpoint, images)
    pixels = np.stack([decode_square(path.read_bytes(), SIZE) for path in images])
    np.save(package / "pixels.npy", pixels)
    card = "\n".join(export_lines(card_section(SIZE)))
    # The card's code decodes with Pillow's plain convert("RGB"), so it agrees with graft on
    # opaque 8-bit images only: every file but the partly transparent PNG (the last).
    opaque = images[:-1]
    result = without_graft(package, opaque, snippet_of(card))

    assert not result["graft_importable"] and result["graft_modules"] == []
    assert result["metadata"]["classes"] == CLASSES
    # A batch of several, and each image alone (batch of 1), decoded by graft.
    np.testing.assert_allclose(result["batch"], expected, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(result["single"], expected, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(result["snippet"], expected[:-1], atol=TOLERANCE, rtol=0)
    # graft predict, the command, on the same files: its classes and probabilities.
    predicted = graft_predict(checkpoint, images)
    np.testing.assert_allclose(result["batch"], predicted, atol=TOLERANCE, rtol=0)
    # Same classes too, not just close numbers; and the model does not answer one class for
    # every image (the comparison would then prove little).
    top = np.argmax(expected, axis=1)
    assert np.argmax(result["batch"], axis=1).tolist() == np.argmax(predicted, axis=1).tolist()
    assert np.argmax(result["snippet"], axis=1).tolist() == top[:-1].tolist()
    assert len(set(top.tolist())) > 1 or np.ptp(expected, axis=0).max() > 1e-3


def test_the_card_code_loads_the_program_named_in_the_card() -> None:
    section = "\n".join(export_lines(card_section(SIZE)))
    code = snippet_of(section)
    assert f'torch.export.load("{PROGRAM}"' in code and f'"{METADATA}"' in code
    assert f'Image.open("{SNIPPET_IMAGE}")' in code
    assert f"(here S = {SIZE})" in section
    assert "`graft predict` applies graft's full verification" in section


def test_export_gives_the_same_bytes_and_leaves_the_rng_alone(checkpoint: Path) -> None:
    state = torch.get_rng_state()
    first, second = export_program(checkpoint), export_program(checkpoint)
    assert hashlib.sha256(first).hexdigest() == hashlib.sha256(second).hexdigest()
    # Nor on where graft is checked out: a work tree or another clone exports the same bytes
    # (the archive is stored uncompressed, so a path inside it would show here).
    assert b"stack_trace" not in first and str(ROOT).encode() not in first
    assert torch.equal(torch.get_rng_state(), state)


def test_the_metadata_round_trips(checkpoint: Path, package: Path) -> None:
    program, facts = load_program(package / PROGRAM)
    _, meta = model_from_checkpoint(checkpoint)
    assert facts == metadata(meta, file_sha256(checkpoint))
    assert facts["weights_sha256"] == file_sha256(checkpoint)
    assert (facts["classes"], facts["image_size"], facts["arch"]) == (CLASSES, SIZE, "resnet18")
    assert (facts["mean"], facts["std"]) == (meta.mean, meta.std)
    # Any batch size of uint8 S x S RGB images; float32 probabilities out.
    for count in (1, 4):
        images = torch.randint(0, 256, (count, SIZE, SIZE, 3), dtype=torch.uint8)
        with torch.no_grad():
            probabilities = program.module()(images)
        assert probabilities.shape == (count, len(CLASSES))
        assert probabilities.dtype == torch.float32
        torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(count))


def test_a_program_without_graft_metadata_is_refused(tmp_path: Path) -> None:
    program = torch.export.export(torch.nn.Linear(2, 1), (torch.zeros(1, 2),))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    (tmp_path / PROGRAM).write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match=r"holds no graft\.json"):
        load_program(tmp_path / PROGRAM)
