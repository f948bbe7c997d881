"""A PNG grid of the test images the model got wrong most confidently, with their labels.

People would rather look than read: a confident mistake is often a mislabelled image, an
ambiguous one, or a sign of a class the model has not learnt. Drawn with Pillow only.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw, ImageFont, ImageOps

from graft.atomic import atomic_path
from graft.data.decoding import upright_rgb
from graft.data.store import ImageStore

COLUMNS = 4  # the grid is always this many cells wide, so its width never depends on the data
CELL = 96  # pixels of the square each image is fitted into
CAPTION = 44  # three lines of text under each image: source file, true label, prediction
PAD = 8
HEADER = 28
EMPTY_BODY = 40  # height of the message area when nothing is misclassified
WIDTH = PAD + COLUMNS * (CELL + PAD)

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def most_confident_mistakes(predictions: pd.DataFrame, limit: int) -> pd.DataFrame:
    """Wrong predictions, most confident first (ties by hash, so the choice is reproducible).

    ``predictions`` is a predictions table; returns at most ``limit`` of its rows where
    ``actual`` differs from ``predicted``, with a fresh 0-based index.
    """
    wrong = predictions[predictions["actual"] != predictions["predicted"]]
    ordered = wrong.sort_values(["confidence", "sha256"], ascending=[False, True], kind="stable")
    return ordered.head(limit).reset_index(drop=True)


def grid_size(images: int) -> tuple[int, int]:
    """Width and height in pixels of the grid for this many images (0: the message only).

    The width is the same for every count: COLUMNS cells wide, however many images there are.
    """
    if images == 0:
        return WIDTH, HEADER + EMPTY_BODY
    rows = math.ceil(images / COLUMNS)
    return WIDTH, HEADER + rows * (CELL + CAPTION + PAD)


def render_grid(predictions: pd.DataFrame, dataset: Path, limit: int) -> Image.Image:
    """The grid of at most ``limit`` most confident mistakes among ``predictions``.

    Each image is labelled with the file it came from (its ``path`` relative to its source
    folder, shortened in the middle when long), its true label, and the prediction with its
    confidence.

    Images are read from the ingested ``dataset`` folder's store by hash. Returns an RGB image
    of :func:`grid_size` for the number of mistakes shown, with a line saying that nothing was
    misclassified when nothing was. Raises GraftError (StoreError) when a shown image is
    missing.
    """
    mistakes = most_confident_mistakes(predictions, limit)
    wrong = int((predictions["actual"] != predictions["predicted"]).sum())
    canvas = Image.new("RGB", grid_size(len(mistakes)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=12)
    if mistakes.empty:
        title = f"No misclassified images among {len(predictions)} test images"
        draw.text((PAD, HEADER // 2), _fit(draw, title, WIDTH - 2 * PAD, font), "black", font)
        return canvas
    title = f"{len(mistakes)} most confident of {wrong} mistakes in {len(predictions)} test images"
    draw.text((PAD, PAD), _fit(draw, title, WIDTH - 2 * PAD, font), "black", font)
    with ImageStore(dataset) as store:
        thumbnails = [_thumbnail(store.read(str(sha))) for sha in mistakes["sha256"]]
    for i, row in enumerate(mistakes.itertuples(index=False)):
        left = PAD + (i % COLUMNS) * (CELL + PAD)
        top = HEADER + (i // COLUMNS) * (CELL + CAPTION + PAD)
        thumbnail = thumbnails[i]
        offset = ((CELL - thumbnail.width) // 2, (CELL - thumbnail.height) // 2)
        draw.rectangle((left, top, left + CELL - 1, top + CELL - 1), fill=(230, 230, 230))
        canvas.paste(thumbnail, (left + offset[0], top + offset[1]))
        source_line = shorten_middle(draw, str(row.path), CELL, font)
        true_line = _fit(draw, f"true: {row.actual}", CELL, font)
        # Long class names are cut, never the confidence.
        confidence = f" ({row.confidence:.0%})"
        room = CELL - int(draw.textlength(confidence, font=font))
        predicted_line = _fit(draw, f"pred: {row.predicted}", room, font) + confidence
        draw.text((left, top + CELL + 2), source_line, (90, 90, 90), font)
        draw.text((left, top + CELL + 16), true_line, "black", font)
        draw.text((left, top + CELL + 30), predicted_line, (180, 0, 0), font)
    return canvas


def write_grid(destination: Path, predictions: pd.DataFrame, dataset: Path, limit: int) -> None:
    """Render the grid (:func:`render_grid`) and write it to ``destination`` atomically as PNG.

    Raises GraftError when a shown image is missing from ``dataset``.
    """
    grid = render_grid(predictions, dataset, limit)
    with atomic_path(destination) as temporary:
        grid.save(temporary, format="PNG")


def _thumbnail(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        image.seek(0)
        rgb, _ = upright_rgb(image)  # as training saw it
    # Small images (8x8 digits) are enlarged with nearest-neighbour so their pixels stay sharp.
    enlarge = rgb.width <= CELL and rgb.height <= CELL
    method = Image.Resampling.NEAREST if enlarge else Image.Resampling.LANCZOS
    return ImageOps.contain(rgb, (CELL, CELL), method)


def shorten_middle(draw: ImageDraw.ImageDraw, text: str, width: int, font: Font) -> str:
    """``text`` as is when it fits in ``width`` pixels, else its start and end around an ellipsis.

    Cut in the middle, not at the end: a file's class folder and its name's end (numbers,
    extension) tell files apart, and a long path shares its middle with its neighbours.
    """
    if draw.textlength(text, font=font) <= width:
        return text
    head, tail = text[: len(text) // 2], text[len(text) // 2 :]
    while (head or tail) and draw.textlength(f"{head}…{tail}", font=font) > width:
        if len(head) >= len(tail):  # drop from the longer side, keeping both ends
            head = head[:-1]
        else:
            tail = tail[1:]
    return f"{head}…{tail}"


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font: Font) -> str:
    """``text``, cut and ended with an ellipsis if it is wider than ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
