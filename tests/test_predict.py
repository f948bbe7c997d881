"""graft predict on a package on disk: verdicts as ingest gives them, predictions as the model
computes them from training's preprocessing, rows in input order naming the model, atomic
output, bad references and inputs refused with their name, interrupts that leave nothing.

Published versions, fresh clones and the lineage of a prediction file: tests/test_lineage.py.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DEMO, tool_env
from odd_files import gradient, jpeg_with_bad_exif, png_with_bad_crc, sixteen_bit_gray
from PIL import Image

from graft.cli.predict import project_root
from graft.data.augment import BatchTransform
from graft.data.decoding import decode_square
from graft.data.image_check import check_image_bytes
from graft.hashing import file_sha256
from graft.inference.model_source import ModelSourceError, load_model
from graft.inference.predict import PredictOptions, gather_inputs, predict_files
from graft.inference.records import csv_columns, models_in
from graft.registry.lineage import LineageError
from graft.registry.package_layout import CARD_JSON, WEIGHTS
from graft.registry.prediction_lineage import predictions_model
from graft.training.checkpoints import CheckpointMeta, model_from_checkpoint, save_checkpoint
from graft.training.models import build_model

CLASSES = ["5", "6", "7", "8", "9"]
SIZE = 32


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A package folder: a graft checkpoint (resnet18, random weights, the demo's input) and a
    model card that agrees with it."""
    folder = tmp_path_factory.mktemp("package")
    torch.manual_seed(3)
    meta = CheckpointMeta("resnet18", CLASSES, SIZE, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3], 0, {}, "x")
    save_checkpoint(folder / WEIGHTS, build_model("resnet18", len(CLASSES)), meta)
    card = {"name": "t", "architecture": "resnet18", "classes": CLASSES}
    (folder / CARD_JSON).write_text(json.dumps(card))
    return folder


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo digits and the odd files real folders hold, in nested folders."""
    folder = tmp_path_factory.mktemp("images")
    for label in ("5", "9"):
        for source in sorted((DEMO / "target" / label).glob("digit-*.png"))[:4]:
            shutil.copy(source, folder / f"{label}-{source.name}")
    odd = folder / "odd" / "deeper"
    odd.mkdir(parents=True)
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, np.linspace(0, 255, 30, dtype=np.uint8)
    (odd / "rgba.png").write_bytes(_png(rgba, "RGBA"))
    (odd / "rotated.jpg").write_bytes(jpeg_with_bad_exif(orientation=6))
    (odd / "sixteen.png").write_bytes(sixteen_bit_gray(gradient(24, 16, peak=4095), "PNG"))
    (odd / "bad_crc.png").write_bytes(png_with_bad_crc())
    (odd / "empty.jpg").write_bytes(b"")
    (odd / "notes.png").write_text("not an image")
    (odd / "tiny.png").write_bytes(_png(np.zeros((4, 4), np.uint8)))
    truncated = (DEMO / "target" / "5" / "digit-0005.png").read_bytes()
    (odd / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
    (odd / ".hidden.png").write_bytes(truncated)
    return folder


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _graft(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "graft.cli.main", *args]
    return subprocess.run(command, cwd=cwd, env=tool_env(), capture_output=True, text=True)


def _eager(package: Path, path: Path) -> list[float]:
    """What the checkpoint gives one image by the plain route: decode as training does,
    normalise, run the network alone."""
    model, meta = model_from_checkpoint(package / WEIGHTS)
    pixels = torch.from_numpy(decode_square(path.read_bytes(), meta.image_size))
    inputs = BatchTransform(tuple(meta.mean), tuple(meta.std), None)(pixels.permute(2, 0, 1)[None])
    with torch.no_grad():
        return torch.softmax(model.eval()(inputs), dim=1)[0].tolist()


@pytest.mark.parametrize("batch_size", [1, 3, 256])
def test_rows_follow_the_inputs_with_ingests_verdicts_and_the_models_probabilities(
    package: Path, images: Path, batch_size: int
) -> None:
    model, source = load_model(images, str(package))
    inputs = gather_inputs([images / "odd", images / "5-digit-0005.png"])
    options = PredictOptions(batch_size=batch_size, top_k=5, workers=2, device="cpu")
    rows = list(predict_files(model, source, inputs.files, options))

    walked = sorted(
        p for p in (images / "odd").rglob("*") if p.is_file() and "hidden" not in p.name
    )
    assert [r.path for r in rows] == [
        f"{images}/odd/{p.relative_to(images / 'odd')}" for p in walked
    ] + [f"{images}/5-digit-0005.png"]
    assert inputs.skipped == 1  # the hidden file
    for row in rows:
        data = Path(row.path).read_bytes()
        expected = check_image_bytes(data, min_side=8, max_pixels=89478485)
        assert (row.verdict, row.reason) == (expected.verdict, expected.reason), row.path
        assert row.sha256 == file_sha256(Path(row.path))
        if row.verdict != "accepted":
            assert row.top == ()
            continue
        probabilities = dict(row.top)
        assert [p for _, p in row.top] == sorted(probabilities.values(), reverse=True)
        eager = _eager(package, Path(row.path))
        assert [probabilities[c] for c in CLASSES] == pytest.approx(eager, abs=1e-5)
    verdicts = {Path(r.path).name: r.verdict for r in rows}
    assert verdicts == {
        "bad_crc.png": "corrupt", "empty.jpg": "zero_byte", "notes.png": "not_image",
        "rgba.png": "accepted", "rotated.jpg": "accepted", "sixteen.png": "accepted",
        "tiny.png": "too_small", "truncated.png": "corrupt", "5-digit-0005.png": "accepted",
    }  # fmt: skip


def test_the_command_writes_csv_and_json_lines_naming_the_model_on_every_row(
    package: Path, images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out" / "predictions.csv"
    result = _graft(
        "predict", str(package), str(images), "--out", str(out), "--top-k", "2", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    rows = _rows(out)
    assert list(rows[0]) == csv_columns(2)
    visible = [p for p in images.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert len(rows) == len(visible)  # the hidden file skipped
    weights = file_sha256(package / WEIGHTS)
    for row in rows:
        assert (row["model_version"], row["model_commit"], row["weights_sha256"]) == (
            "unpublished",
            "",
            weights,
        )
        if row["verdict"] == "accepted":
            assert row["class"] == row["class_1"] in CLASSES
            assert float(row["probability"]) >= float(row["probability_2"])
        else:
            assert row["class"] == row["class_1"] == row["probability"] == ""
    accepted = sum(row["verdict"] == "accepted" for row in rows)
    assert f"{len(visible)} files: accepted {accepted}, " in result.stderr
    assert "1 hidden or system files skipped" in result.stderr

    lines = tmp_path / "predictions.jsonl"
    result = _graft("predict", str(package), str(images / "odd"), "-o", str(lines), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in lines.read_text().splitlines()]
    assert len(records) == 8
    good = [r for r in records if r["verdict"] == "accepted"]
    assert all(len(r["top_k"]) == 3 and r["top_k"][0]["class"] == r["class"] for r in good)
    assert all(r["weights_sha256"] == weights for r in records)
    assert all(r["class"] is None and r["top_k"] == [] for r in records if r not in good)

    printed = _graft(
        "predict", str(package), str(images / "5-digit-0005.png"), "--format", "jsonl", cwd=tmp_path
    )
    assert json.loads(printed.stdout)["path"].endswith("5-digit-0005.png")
    rejected = _graft(
        "predict",
        str(package),
        str(images / "odd"),
        "--fail-on-rejected",
        "-o",
        str(tmp_path / "r.csv"),
        cwd=tmp_path,
    )
    assert rejected.returncode == 3 and len(_rows(tmp_path / "r.csv")) == 8


def test_bad_references_and_inputs_are_named_and_nothing_is_written(
    package: Path, images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "predictions.csv"
    cases = {
        "no-such-model@v1.0.0": ("error: model no-such-model@v1.0.0", str(images)),
        str(package): ("error: input", str(tmp_path / "missing.png")),
        str(images): ("folder without model.pt", str(images)),
        str(images / "5-digit-0005.png"): ("is not a graft checkpoint", str(images)),
    }
    for model, (message, given) in cases.items():
        result = _graft("predict", model, given, "--out", str(out), cwd=tmp_path)
        assert result.returncode == 1 and message in result.stderr, (model, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # no traceback
        assert not out.exists() and not list(tmp_path.glob(".predictions.csv*"))
    missing = _graft("predict", str(package), str(tmp_path / "missing.png"), cwd=tmp_path)
    assert f"input {tmp_path / 'missing.png'} does not exist" in missing.stderr


def test_out_never_replaces_what_is_not_a_prediction_file(
    package: Path, images: Path, tmp_path: Path
) -> None:
    image = images / "5-digit-0005.png"
    before = image.read_bytes()
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    refused = {
        str(image): "is one of the inputs",
        str(fifo): "is not a regular file",
        str(folder): "is not a regular file",
    }
    for out, message in refused.items():
        result = _graft("predict", str(package), str(images), "--out", out, cwd=tmp_path)
        assert result.returncode == 1 and message in result.stderr, result.stderr
    assert image.read_bytes() == before and fifo.is_fifo() and folder.is_dir()

    target = tmp_path / "kept" / "rows.csv"  # a link's target is written; the link stays
    target.parent.mkdir()
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    assert (
        _graft("predict", str(package), str(image), "--out", str(link), cwd=tmp_path).returncode
        == 0
    )
    assert link.is_symlink() and len(_rows(target)) == 1
    nested = tmp_path / "new" / "deeper" / "rows.csv"  # missing folders are made
    assert (
        _graft("predict", str(package), str(image), "-o", str(nested), cwd=tmp_path).returncode == 0
    )
    assert len(_rows(nested)) == 1
    dash = _graft("predict", str(package), str(image), "--out", "-", cwd=tmp_path)
    assert dash.stdout.startswith("path,sha256,") and not (tmp_path / "-").exists()


def test_options_no_run_could_use_are_refused_before_any_work(
    package: Path, images: Path, tmp_path: Path
) -> None:
    for option, value in (("--batch-size", "0"), ("--top-k", "-1"), ("--workers", "x")):
        result = _graft("predict", str(package), str(images), option, value, cwd=tmp_path)
        assert result.returncode == 2 and option in result.stderr, result.stderr
    if not torch.cuda.is_available():
        result = _graft("predict", str(package), str(images), "--device", "cuda", cwd=tmp_path)
        assert result.returncode == 1
        assert result.stderr.strip() == "error: --device cuda: no cuda device here; try auto or cpu"
    program = tmp_path / "model.pt2"
    program.write_bytes(b"PK")
    with pytest.raises(ModelSourceError, match="the exported program"):
        load_model(tmp_path, str(program))
    many = _graft(
        "predict",
        str(package),
        str(images / "odd" / "deeper" / "rgba.png"),
        "--top-k",
        "9",
        cwd=tmp_path,
    )
    assert many.stdout.splitlines()[0] == ",".join(csv_columns(len(CLASSES)))


def test_the_project_is_found_from_a_folder_inside_it(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("{}")
    (tmp_path / ".git").mkdir()
    inside = tmp_path / "data" / "incoming"
    inside.mkdir(parents=True)
    assert project_root(inside) == tmp_path
    assert project_root(tmp_path.parent) == tmp_path.parent  # none above: the folder itself


def test_a_package_whose_card_or_classes_do_not_fit_its_weights_is_refused(
    package: Path, tmp_path: Path
) -> None:
    mixed = tmp_path / "mixed"
    shutil.copytree(package, mixed)
    card = json.loads((mixed / CARD_JSON).read_text())
    (mixed / CARD_JSON).write_text(json.dumps({**card, "classes": ["cat", "dog"]}))
    with pytest.raises(ModelSourceError, match="the model card says classes"):
        load_model(tmp_path, str(mixed))

    state = torch.load(package / WEIGHTS, weights_only=True)
    state["meta"]["classes"] = ["a", "b", "c"]  # the head still has five outputs
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(ModelSourceError, match="weights do not fit resnet18 with 3 classes"):
        load_model(tmp_path, str(tmp_path / "model.pt"))


@pytest.mark.parametrize(
    ("signum", "whole_group"),
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["ctrl-c", "kill"],
)
def test_a_stop_signal_leaves_no_output_and_no_worker(
    package: Path, tmp_path: Path, signum: int, whole_group: bool
) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    data = (DEMO / "target" / "5" / "digit-0005.png").read_bytes()
    for index in range(3000):  # distinct names, same bytes: enough work to interrupt
        (folder / f"{index:05d}.png").write_bytes(data)
    out = tmp_path / "predictions.csv"
    process = subprocess.Popen(
        [sys.executable, "-m", "graft.cli.main", "predict", str(package), str(folder),
         "-o", str(out), "--batch-size", "8"],
        cwd=tmp_path, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".predictions.csv.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # rows are being written
    children = _descendants(process.pid)
    assert children, "no decoding process was running"
    if whole_group:  # Ctrl-C in a terminal: every process of the group
        os.killpg(process.pid, signum)
    else:
        os.kill(process.pid, signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, stderr
    last = stderr.strip().splitlines()[-1]
    assert last == f"graft predict: interrupted by {signal.Signals(signum).name}; {out} not written"
    assert "Traceback" not in stderr
    assert not out.exists() and not list(tmp_path.glob(".predictions.csv*"))
    deadline = time.monotonic() + 10
    while _alive(children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(children), [
        Path(f"/proc/{pid}/cmdline").read_text() for pid in _alive(children)
    ]


def _alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def _descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").iterdir():
            children = (task / "children").read_text().split()
            found += [int(c) for c in children]
            frontier += [int(c) for c in children]
    return found


def test_a_prediction_file_names_its_model_and_mixed_files_are_told_apart(tmp_path: Path) -> None:
    columns = csv_columns(1)
    one = {c: "" for c in columns} | {"path": "a.png", "verdict": "accepted"}
    v1 = one | {"model_version": "m@v1.0.0", "model_commit": "a" * 40, "weights_sha256": "1" * 64}
    v2 = one | {"model_version": "m@v1.0.1", "model_commit": "b" * 40, "weights_sha256": "2" * 64}
    same, mixed = tmp_path / "same.csv", tmp_path / "mixed.csv"
    for path, rows in ((same, [v1, v1, v1]), (mixed, [v1, v2, v1])):
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, columns)
            writer.writeheader()
            writer.writerows(rows)
    found = predictions_model(tmp_path, same)
    assert found is not None and (found.ref, found.rows) == ("m@v1.0.0", 3)
    with pytest.raises(
        LineageError, match=r"rows disagree on the model: 2 rows by m@v1.0.0 .*; 1 rows by m@v1.0.1"
    ):
        predictions_model(tmp_path, mixed)
    lines = tmp_path / "p.jsonl"
    lines.write_text(json.dumps(v2 | {"top_k": []}) + "\n")
    assert models_in(lines) is not None and predictions_model(tmp_path, lines).ref == "m@v1.0.1"  # type: ignore[union-attr]
    header_only = tmp_path / "header.csv"
    header_only.write_text(",".join(columns) + "\n")
    with pytest.raises(LineageError, match="a prediction file without rows names no model"):
        predictions_model(tmp_path, header_only)
    for other in (DEMO / "target" / "5" / "digit-0005.png", tmp_path / "plain.csv"):
        if not other.exists():
            other.write_text("a,b\n1,2\n")
        assert predictions_model(tmp_path, other) is None
