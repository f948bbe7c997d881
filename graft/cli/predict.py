"""The ``graft predict`` command: classify image files with any model version."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from graft.cli.help_format import HelpFormatter
from graft.errors import GraftError

REJECTED_EXIT = 3  # as graft verify --fail-on-rejected: some input was rejected

DESCRIPTION = """\
Classifies image files with a model version. MODEL is any reference `graft lineage show` takes:
  digits-5-9@v1.2.0        a published version: NAME@vX.Y.Z
  digits-5-9@latest        the highest published version of NAME
  digits-5-9#prod          the version assigned the stage prod
  HEAD~3                   any git revision: its registered package, published or not
  models/package           a package folder, or its model.pt file, used as it is on disk
A version or revision is read at its own commit from the DVC cache, else from the DVC remote. \
INPUTS are image files and folders (walked at any depth; hidden and system files skipped).

Every file is verified as the ingest stage verifies it (a full decode, under the same memory \
and time limits: params.yaml's ingest section at the model's commit) and preprocessed exactly \
as the model was trained (EXIF rotation, mode rule, resize, mean and std from its checkpoint). \
A file that fails gets a row with its verdict and no class; the run goes on.

output (CSV, or JSON lines with --format jsonl), one row per input file, in input order:
  path            the file as given, or joined to the folder given
  sha256          its content hash (empty when it could not be read)
  verdict         accepted, or why not: zero_byte, not_image, corrupt, unsupported, too_small,
                  too_large, timeout, unreadable (README: Ingest verdicts)
  reason          what was wrong (for accepted files: empty, or a warning)
  class           the predicted class; probability: its softmax probability, 0-1, rounded to
                  6 decimals
  class_N         the N-th most probable class and probability_N its probability, N = 1..K
                  (JSON lines: top_k, a list of {class, probability})
  model_version   the published version (NAME@vX.Y.Z), or "unpublished"
  model_commit    the git commit the model was read at (empty for an unpublished file)
  weights_sha256  the sha256 of the model.pt whose weights predicted
`graft lineage show PREDICTIONS_FILE` tells what produced the model behind a file of rows.

exit status: 0; with --fail-on-rejected, 3 when any input was rejected; 1 for an error (a \
MODEL that names nothing, an INPUT that does not exist, an --out that cannot be written), 2 \
for bad arguments; 128 + the signal when stopped (130 for Ctrl-C, 143 for SIGTERM), with \
nothing written to --out and no process left behind.

examples:
  graft predict digits-5-9@latest data/demo/target --out predictions.csv
  graft predict digits-5-9#prod photo.jpg --top-k 1
"""


def _predict(arguments: argparse.Namespace) -> None:
    from graft.inference.model_source import load_model
    from graft.inference.predict import (
        PredictOptions,
        check_options,
        gather_inputs,
        predict_files,
    )
    from graft.inference.records import output_target, prediction_output

    options = PredictOptions(
        arguments.batch_size, arguments.top_k, arguments.workers, arguments.device
    )
    check_options(options)
    form = arguments.format or _format_of(arguments.out)
    inputs = gather_inputs(arguments.inputs)  # every path checked before the model is read
    if not inputs.files:
        raise GraftError(f"no files in {', '.join(map(str, arguments.inputs))}")
    out = output_target(arguments.out, {file.path for file in inputs.files})
    root = arguments.root if arguments.root is not None else project_root(Path.cwd())
    model, source = load_model(root, arguments.model)
    top_k = min(options.top_k, len(source.meta.classes))
    verdicts: Counter[str] = Counter()
    from graft.cli.main import STOP_SIGNALS, Interrupted, raise_on_signals

    # Every stop signal unwinds as an exception: the workers are stopped, the partial output
    # removed (prediction_output), and the command ends with one line instead of a traceback.
    raise_on_signals(STOP_SIGNALS, Interrupted, once=True, quiet=True)
    try:
        with prediction_output(out, form, top_k, source) as writer:
            for row in predict_files(model, source, inputs.files, options):
                writer.write(row)
                verdicts[row.verdict] += 1
    except Interrupted as stop:
        kept = f"; {out} not written" if out else ""
        print(f"graft predict: interrupted by {stop}{kept}", file=sys.stderr)
        sys.exit(128 + stop.signum)
    except BrokenPipeError:
        raise  # the reader stopped early (`| head`): graft's main ends quietly
    except OSError as error:  # the disk is full, the folder went away, ...
        where = out or "standard output"
        raise GraftError(
            f"cannot write {where}: {error.strerror or error}; nothing written"
        ) from None
    _summary(out, source, verdicts, inputs.skipped)
    rejected = sum(n for verdict, n in verdicts.items() if verdict != "accepted")
    if arguments.fail_on_rejected and rejected:
        print(f"{rejected} files rejected: exit status {REJECTED_EXIT}", file=sys.stderr)
        sys.exit(REJECTED_EXIT)


def project_root(start: Path) -> Path:
    """The project ``start`` is in: the nearest folder, ``start`` or above, that holds
    params.yaml and .git; ``start`` itself when none does. Raises nothing."""
    for folder in (start, *start.parents):
        if (folder / "params.yaml").is_file() and (folder / ".git").exists():
            return folder
    return start


def _positive(text: str) -> int:
    return _at_least(text, 1)


def _not_negative(text: str) -> int:
    return _at_least(text, 0)


def _at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def _format_of(out: Path | None) -> str:
    return "jsonl" if out is not None and out.suffix.lower() in (".jsonl", ".ndjson") else "csv"


def _summary(out: Path | None, source: Any, verdicts: Counter[str], skipped: int) -> None:
    counts = ", ".join(f"{verdict} {n}" for verdict, n in verdicts.most_common())
    where = f" -> {out}" if out else ""
    print(
        f"{sum(verdicts.values())} files: {counts}; {skipped} hidden or system files skipped; "
        f"model {source.version} (weights sha256 {source.weights_sha256[:12]}, "
        f"{source.meta.arch}, {len(source.meta.classes)} classes){where}",
        file=sys.stderr,
    )


def add_command(commands: Any) -> None:
    """Add ``predict`` to ``commands``, the ``graft`` parser's subparsers; the parsed command
    carries its ``handler``. Raises argparse.ArgumentError when the name is taken."""
    parser = commands.add_parser(
        "predict",
        help="classify image files with a model version; one row per file, with its lineage",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="the model: see the forms above")
    parser.add_argument(
        "inputs", metavar="INPUT", nargs="+", type=Path, help="image files and folders"
    )
    parser.add_argument(
        "-o",
        "--out",
        type=Path,
        help="file to write, whole or not at all (written beside it, then renamed; its folder "
        "is created; a link's target is written); standard output when left out or -",
    )
    parser.add_argument(
        "--format",
        choices=("csv", "jsonl"),
        help="output format; left out: jsonl for an --out ending .jsonl or .ndjson, else csv",
    )
    parser.add_argument(
        "--top-k",
        type=_positive,
        default=3,
        metavar="K",
        help="ranked classes per row (at most the model's classes)",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive,
        default=256,
        metavar="IMAGES",
        help="images per forward pass",
    )
    parser.add_argument(
        "--workers",
        type=_not_negative,
        default=0,
        metavar="N",
        help="decoding processes; 0: half the cores on the CPU (torch gets the rest), all on a GPU",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps"
    )
    parser.add_argument(
        "--fail-on-rejected",
        action="store_true",
        help=f"exit with status {REJECTED_EXIT} when any input is rejected (for scripts)",
    )
    parser.add_argument(
        "--root",
        type=Path,
        help="the project (git repository with params.yaml) MODEL is looked up in; left out: "
        "the nearest one at or above the current folder",
    )
    parser.set_defaults(handler=_predict)
