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
  class           the predicted class; probability: its softmax probability, 0-1
  class_N         the N-th most probable class and probability_N its probability, N = 1..K
                  (JSON lines: top_k, a list of {class, probability})
  model_version   the published version (NAME@vX.Y.Z), or "unpublished"
  model_commit    the git commit the model was read at (empty for an unpublished file)
  weights_sha256  the sha256 of the model.pt whose weights predicted
`graft lineage show PREDICTIONS_FILE` tells what produced the model behind a file of rows.

exit status: 0; with --fail-on-rejected, 3 when any input was rejected; 1 for an error (a \
MODEL that names nothing, an INPUT that does not exist), 2 for bad arguments.

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
    from graft.inference.records import prediction_output

    options = PredictOptions(
        arguments.batch_size, arguments.top_k, arguments.workers, arguments.device
    )
    check_options(options)
    form = arguments.format or _format_of(arguments.out)
    inputs = gather_inputs(arguments.inputs)  # every path checked before the model is read
    if not inputs.files:
        raise GraftError(f"no files in {', '.join(map(str, arguments.inputs))}")
    model, source = load_model(arguments.root, arguments.model)
    verdicts: Counter[str] = Counter()
    from graft.cli.main import STOP_SIGNALS, Interrupted, raise_on_signals

    # Every stop signal unwinds as an exception: the workers are stopped, the partial output
    # removed (prediction_output), and the command ends with one line instead of a traceback.
    raise_on_signals(STOP_SIGNALS, Interrupted, once=True, quiet=True)
    try:
        with prediction_output(arguments.out, form, options.top_k, source) as writer:
            for row in predict_files(model, source, inputs.files, options):
                writer.write(row)
                verdicts[row.verdict] += 1
    except Interrupted as stop:
        kept = f"; {arguments.out} not written" if arguments.out else ""
        print(f"graft predict: interrupted by {stop}{kept}", file=sys.stderr)
        sys.exit(128 + stop.signum)
    _summary(arguments, source, verdicts, inputs.skipped)
    rejected = sum(n for verdict, n in verdicts.items() if verdict != "accepted")
    if arguments.fail_on_rejected and rejected:
        print(f"{rejected} files rejected: exit status {REJECTED_EXIT}", file=sys.stderr)
        sys.exit(REJECTED_EXIT)


def _format_of(out: Path | None) -> str:
    return "jsonl" if out is not None and out.suffix.lower() in (".jsonl", ".ndjson") else "csv"


def _summary(
    arguments: argparse.Namespace, source: Any, verdicts: Counter[str], skipped: int
) -> None:
    counts = ", ".join(f"{verdict} {n}" for verdict, n in verdicts.most_common())
    where = f" -> {arguments.out}" if arguments.out else ""
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
        help="file to write, whole or not at all (written beside it, then renamed); "
        "standard output when left out",
    )
    parser.add_argument(
        "--format",
        choices=("csv", "jsonl"),
        help="output format; left out: jsonl for an --out ending .jsonl or .ndjson, else csv",
    )
    parser.add_argument("--top-k", type=int, default=3, metavar="K", help="ranked classes per row")
    parser.add_argument(
        "--batch-size", type=int, default=256, metavar="IMAGES", help="images per forward pass"
    )
    parser.add_argument(
        "--workers",
        type=int,
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
        default=Path("."),
        help="the project root (git repository with params.yaml) MODEL is looked up in",
    )
    parser.set_defaults(handler=_predict)
