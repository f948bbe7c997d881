"""Static figures of a run, drawn with matplotlib: PNG files that any viewer shows offline.

`dvc plots show` draws CSV plots with Vega loaded from a CDN, so on a machine without internet
its page is empty; PNG files declared as image plots are embedded in the page as they are. Each
function here takes the plain contents of one or more report files (a history, predictions,
calibration or ROC table, numbers from metrics.json) and writes one PNG atomically.

The PNG bytes depend on the data only: figures are drawn on the Agg canvas (no display, no
pyplot state), in a fixed style and size, and saved without the Software entry matplotlib
would put in the file, so an unchanged input gives DVC an unchanged output. Fonts are
matplotlib's own (DejaVu Sans), never the machine's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter
from sklearn.metrics import ConfusionMatrixDisplay

from graft.atomic import atomic_path

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

# File names inside the figures folder (paths.figures.folder).
TRAINING_CURVES = "training_curves.png"
TRANSFER = "transfer.png"
CONFUSION = "confusion_matrix.png"
RELIABILITY = "reliability.png"
ROC = "roc.png"

HEAD, UNFREEZE = "head", "unfreeze"  # the fine-tuning phases of a history's ``phase`` column

# What each training stage is, for the training curves' panel titles, in pipeline order.
STAGE_TITLES = {
    "pretrain": "pretrain: backbone on the pretraining corpus",
    "finetune": "finetune: pretrained backbone on the target classes",
    "baseline": "baseline: the finetune recipe from random weights",
}

TRAIN_COLOUR, VAL_COLOUR = "#1f77b4", "#ff7f0e"  # blue and orange: apart for colour-blind eyes too
PRETRAINED_COLOUR, SCRATCH_COLOUR = "#2ca02c", "#7f7f7f"  # green (the model) against grey
DPI = 100

# Fixed settings, so the same data draws the same pixels whatever the user's matplotlibrc says.
_STYLE: dict[RcKeyType, Any] = {
    "font.family": "DejaVu Sans",  # shipped with matplotlib
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 9,
    "legend.framealpha": 0.9,
    "svg.hashsalt": "graft",  # only read by SVG output; set so nothing random could creep in
    "path.simplify": False,
}


def switch_epoch(history: pd.DataFrame) -> int | None:
    """The first epoch of the unfreeze phase in a history table, when a head phase came before.

    ``history`` has the columns of a training stage's history.csv (``phase``, ``epoch``, ...),
    one row per epoch in order. Returns None when there is no head-to-unfreeze switch: a
    pretraining history, or fine-tuning with ``unfreeze.blocks: 0`` or stopped before it.
    """
    phases = history["phase"].tolist()
    for row in range(1, len(phases)):
        if phases[row - 1] == HEAD and phases[row] == UNFREEZE:
            return int(history["epoch"].iloc[row])
    return None


def training_curves(histories: Mapping[str, pd.DataFrame], destination: Path) -> None:
    """Loss and accuracy against epoch, train and validation, one row of panels per stage.

    ``histories`` maps stage names (``pretrain``, ``finetune``, ``baseline``; drawn in that
    order, other names after them) to their history tables; a stage with no rows is drawn as
    an empty panel saying so. Loss is mean cross-entropy in nats per image, on a log scale;
    the head-to-unfreeze switch is a dotted vertical line. Raises ValueError when
    ``histories`` is empty, KeyError when a table lacks a column, OSError when writing fails.
    """
    if not histories:
        raise ValueError("no training history to draw")
    known = [stage for stage in STAGE_TITLES if stage in histories]
    order = known + sorted(set(histories) - STAGE_TITLES.keys())
    with _style():
        figure = Figure(figsize=(11, 3.2 * len(order)), layout="constrained")
        axes = figure.subplots(len(order), 2, squeeze=False)
        for (loss_axes, accuracy_axes), stage in zip(axes, order, strict=True):
            history = histories[stage]
            title = STAGE_TITLES.get(stage, stage)
            loss_axes.set_title(f"{title}: loss", loc="left")
            accuracy_axes.set_title(f"{title}: accuracy", loc="left")
            if history.empty:
                for empty in (loss_axes, accuracy_axes):
                    _say(empty, "no epochs ran")
                continue
            epochs = history["epoch"]
            for split, colour in (("train", TRAIN_COLOUR), ("val", VAL_COLOUR)):
                name = "training batches" if split == "train" else "validation set"
                style = {"color": colour, "marker": "o", "markersize": 3, "label": name}
                loss_axes.plot(epochs, history[f"{split}_loss"], **style)
                accuracy_axes.plot(epochs, history[f"{split}_accuracy"], **style)
            # A log scale, not clipped limits: an early spike (on the demo, pretrain's epoch-2
            # validation loss is over a hundred times its later values) stays in view without
            # flattening the rest, and every point is still drawn where it is.
            loss_axes.set_yscale("log")
            loss_axes.set_ylabel("cross-entropy (nats per image, log scale)")
            accuracy_axes.set_ylabel("accuracy")
            accuracy_axes.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
            accuracy_axes.set_ylim(0, 1.02)
            switch = switch_epoch(history)
            for panel in (loss_axes, accuracy_axes):
                panel.set_xlabel("epoch")
                panel.xaxis.set_major_locator(MaxNLocator(integer=True))
                if switch is not None:
                    _mark_switch(panel, switch, "black")
            loss_axes.legend(loc="upper right")
            accuracy_axes.legend(loc="lower right")
        _save(figure, destination)


def transfer_curves(
    finetune: pd.DataFrame, baseline: pd.DataFrame, gain: Mapping[str, float], destination: Path
) -> None:
    """Validation accuracy against epoch of the pretrained backbone (``finetune``'s history)
    and of the same recipe from random weights (``baseline``'s), on one chart.

    ``gain`` is metrics.json's ``transfer_gain`` (``pretrained_accuracy``, ``scratch_accuracy``,
    ``gain``: fractions of the test split): their test accuracies are in the legend and the gain
    in the title, its sign spelt out. Each curve's head-to-unfreeze switch is a dotted line in
    its colour. Raises KeyError when a key or column is missing, OSError when writing fails.
    """
    pretrained, scratch = gain["pretrained_accuracy"], gain["scratch_accuracy"]
    difference = gain["gain"]
    with _style():
        figure = Figure(figsize=(9, 5), layout="constrained")
        panel = figure.subplots()
        runs = (
            ("finetune", finetune, PRETRAINED_COLOUR, f"pretrained backbone: {pretrained:.1%}"),
            ("baseline", baseline, SCRATCH_COLOUR, f"random weights: {scratch:.1%}"),
        )
        for stage, history, colour, label in runs:
            panel.plot(
                history["epoch"], history["val_accuracy"], color=colour, marker="o",
                markersize=3, label=f"{label} on test ({stage})",
            )  # fmt: skip
            switch = switch_epoch(history)
            if switch is not None:  # in the legend: the two switches can be an epoch apart
                panel.axvline(
                    switch - 0.5, color=colour, linestyle=":", linewidth=1.5,
                    label=f"{stage}: head | unfreeze from epoch {switch}",
                )  # fmt: skip
        verdict = "pretraining helps" if difference > 0 else "pretraining does not help"
        if difference == 0:
            verdict = "no difference"
        panel.set_title(
            f"Transfer: {verdict}, test accuracy {difference * 100:+.1f} percentage points "
            f"({pretrained:.1%} pretrained vs {scratch:.1%} from scratch)",
            loc="left",
        )
        panel.set_xlabel("epoch (head phase, then unfreeze phase)")
        panel.set_ylabel("validation accuracy")
        panel.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
        panel.set_ylim(0, 1.02)
        panel.xaxis.set_major_locator(MaxNLocator(integer=True))
        panel.legend(loc="lower right")
        _save(figure, destination)


def confusion_matrix(predictions: pd.DataFrame, destination: Path) -> None:
    """The confusion matrix of a predictions table (``actual`` and ``predicted`` columns of
    class names), with the count of test images in every cell and the class names on the axes.

    Classes are those seen in either column, sorted as text (as the checkpoints order them).
    Raises ValueError when the table has no rows, OSError when writing fails.
    """
    if predictions.empty:
        raise ValueError("no predictions to draw a confusion matrix of")
    actual = predictions["actual"].astype(str)
    predicted = predictions["predicted"].astype(str)
    classes = _classes(predictions)
    right = float((actual == predicted).mean())
    side = min(4.0 + 0.6 * len(classes), 24.0)  # cells stay readable as classes grow
    with _style({"axes.grid": False}):
        figure = Figure(figsize=(side + 1.0, side), layout="constrained")
        panel = figure.subplots()
        display = ConfusionMatrixDisplay.from_predictions(
            actual, predicted, labels=classes, ax=panel, cmap="Blues", colorbar=True,
            values_format="d",
        )  # fmt: skip
        display.ax_.set_xlabel("predicted class")
        display.ax_.set_ylabel("actual class")
        display.ax_.set_title(
            f"Confusion matrix: {len(predictions)} test images, {right:.1%} on the diagonal "
            "(predicted right)",
            loc="left",
        )
        _save(figure, destination)


def reliability_diagram(calibration: pd.DataFrame, ece: float | None, destination: Path) -> None:
    """Accuracy against confidence per confidence bin, with the diagonal a calibrated model
    lies on, above a bar chart of how many test images each bin holds (the count on each bar).

    ``calibration`` is evaluate's calibration table (``lower``, ``upper``, ``images``,
    ``confidence``, ``accuracy``; one row per non-empty bin, fractions); ``ece`` the expected
    calibration error for the title (None: left out). Raises KeyError when a column is missing,
    OSError when writing fails.
    """
    total = int(calibration["images"].sum())
    with _style():
        figure = Figure(figsize=(7, 8), layout="constrained")
        top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
        widths = calibration["upper"] - calibration["lower"]
        top.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1, label="calibrated")
        top.bar(
            calibration["lower"], calibration["accuracy"], width=widths, align="edge",
            color=TRAIN_COLOUR, alpha=0.35, edgecolor=TRAIN_COLOUR, label="accuracy of the bin",
        )  # fmt: skip
        top.plot(
            calibration["confidence"], calibration["accuracy"], color=VAL_COLOUR, marker="o",
            linestyle="", label="mean confidence, accuracy",
        )  # fmt: skip
        top.set_xlim(0, 1)
        top.set_ylim(0, 1.02)
        top.set_ylabel("accuracy in the bin")
        top.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
        top.legend(loc="upper left")
        error = "" if ece is None else f"ECE {ece:.3f}, "
        top.set_title(f"Reliability diagram: {error}{total} test images", loc="left")
        bars = bottom.bar(
            calibration["lower"], calibration["images"], width=widths, align="edge",
            color=SCRATCH_COLOUR, edgecolor="white",
        )  # fmt: skip
        bottom.bar_label(bars, fontsize=8, padding=1)
        bottom.set_ylabel("test images")
        bottom.set_xlabel("top-class confidence")
        bottom.xaxis.set_major_formatter(PercentFormatter(xmax=1.0))
        if total:
            bottom.set_ylim(0, calibration["images"].max() * 1.25)  # room for the counts
        else:
            _say(top, "no test images")
        _save(figure, destination)


def roc_curve(
    roc: pd.DataFrame, auc: float | None, positive: str | None, destination: Path
) -> bool:
    """The ROC curve (``fpr``, ``tpr`` columns) with the chance diagonal, when ``roc`` has rows.

    evaluate writes ROC rows only for two classes; with more there is nothing to draw, and
    this writes nothing (no empty panel) and returns False. ``auc`` and ``positive`` (the
    positive class) go in the title when given. Returns True when it wrote
    ``destination``; raises OSError when writing fails.
    """
    if roc.empty:
        return False
    with _style():
        figure = Figure(figsize=(6, 6), layout="constrained")
        panel = figure.subplots()
        panel.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1, label="chance")
        # Straight lines between the points, as the AUC's trapezoids are.
        panel.plot(roc["fpr"], roc["tpr"], color=TRAIN_COLOUR, label="model")
        panel.set_xlabel("false positive rate")
        panel.set_ylabel("true positive rate (recall)")
        panel.set_xlim(0, 1)
        panel.set_ylim(0, 1.02)
        panel.set_aspect("equal")
        score = "" if auc is None else f": AUC {auc:.3f}"
        of = "" if positive is None else f", positive class {positive}"
        panel.set_title(f"ROC curve{score}{of}", loc="left")
        panel.legend(loc="lower right")
        _save(figure, destination)
    return True


def write_figures(
    folder: Path,
    histories: Mapping[str, pd.DataFrame],
    predictions: pd.DataFrame,
    calibration: pd.DataFrame,
    roc: pd.DataFrame,
    metrics: Mapping[str, object],
) -> list[Path]:
    """Draw every figure into ``folder``, replacing it whole (atomically), and list the files.

    ``histories`` maps the training stages to their history tables (``finetune`` and
    ``baseline`` are required: the transfer chart compares them); ``predictions``,
    ``calibration`` and ``roc`` are evaluate's tables and ``metrics`` its metrics.json (``ece``,
    ``transfer_gain``, ``roc_auc`` when there are two classes). A new folder holds no file of
    an earlier run, so with more than two classes there is no ROC figure at all. Raises
    KeyError when a required table, column or metric is missing, OSError when writing fails.
    """
    gain = metrics["transfer_gain"]
    if not isinstance(gain, Mapping):
        raise KeyError("transfer_gain")
    ece, auc = metrics.get("ece"), metrics.get("roc_auc")
    classes = _classes(predictions)
    positive = classes[1] if len(classes) == 2 else None  # evaluate's: the second in sorted order
    with atomic_path(folder, directory=True) as temporary:
        training_curves(histories, temporary / TRAINING_CURVES)
        transfer_curves(histories["finetune"], histories["baseline"], gain, temporary / TRANSFER)
        confusion_matrix(predictions, temporary / CONFUSION)
        reliability_diagram(
            calibration, float(ece) if isinstance(ece, int | float) else None,
            temporary / RELIABILITY,
        )  # fmt: skip
        score = float(auc) if isinstance(auc, int | float) else None
        drew_roc = roc_curve(roc, score, positive, temporary / ROC)
        names = [TRAINING_CURVES, TRANSFER, CONFUSION, RELIABILITY] + ([ROC] if drew_roc else [])
    return [folder / name for name in names]


def _classes(predictions: pd.DataFrame) -> list[str]:
    """The class names in either column of a predictions table, sorted as text."""
    columns = (predictions[column].astype(str) for column in ("actual", "predicted"))
    return sorted(set().union(*columns))


@contextmanager
def _style(extra: dict[RcKeyType, Any] | None = None) -> Iterator[None]:
    # rc_context restores the caller's settings afterwards: nothing global is left changed.
    with rc_context({**_STYLE, **(extra or {})}):
        yield


def _mark_switch(panel: Axes, epoch: int, colour: str) -> None:
    """A dotted vertical line just before ``epoch``, the first of the unfreeze phase."""
    x = epoch - 0.5  # between the last head epoch and the first unfreeze one
    panel.axvline(x, color=colour, linestyle=":", linewidth=1.5)
    panel.annotate(
        "head | unfreeze", xy=(x, 1.0), xycoords=("data", "axes fraction"), xytext=(0, -2),
        textcoords="offset points", ha="center", va="top", fontsize=8, color=colour,
        bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none"},
    )  # fmt: skip


def _say(panel: Axes, message: str) -> None:
    panel.text(0.5, 0.5, message, transform=panel.transAxes, ha="center", va="center")


def _save(figure: Figure, destination: Path) -> None:
    # No "Software" text chunk (it names the matplotlib version): the bytes depend on the
    # drawing only. PNG files from matplotlib carry no date.
    with atomic_path(destination) as temporary:
        figure.savefig(temporary, format="png", dpi=DPI, metadata={"Software": None})
